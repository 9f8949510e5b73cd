"""DiffSynth-Studio's ``diffsynth.metrics`` API (v2.1.2, ``modelscope/DiffSynth-Studio`` fed7b18f) on rewardkit.

    from rewardkit.metrics import PickScoreMetric, ModelConfig   # was: from diffsynth.metrics import ...
    PickScoreMetric.from_pretrained(device="cuda").compute("a cat", [image, "b.png"])  # -> [float, float]

Same names, ``from_pretrained`` arguments, default files (``DiffSynth-Studio/ImageMetrics`` on ModelScope)
and list results; scores are rewardkit's EXACT path (``reward.evaluate_pil`` under ``no_grad``), i.e.
upstream's, not DiffSynth's deviations (each class lists them; reference/clip_family.md section 1).
Plumbing differences: downloads go to the hub cache (files already under ``<base>/<model_id>/`` are used in
place); ``torch_dtype=torch.bfloat16`` is bf16 autocast over fp32 weights; ``vram_limit`` and the offload
fields are ignored; arguments after ``device`` are keyword-only.

Checkpoints of another size than the released ones (e.g. the tiny trees of
``rewardkit.testing.build_diffsynth_tree``) say their architecture in one of two ways: ``from_pretrained(...,
config=...)`` (any ``rewardkit.load`` option passes through), or a ``rewardkit.json`` file beside the local weights
(in the folder of a weights file, or in a weights folder) holding a JSON object of ``rewardkit.load`` options,
read as defaults: explicit ``from_pretrained`` arguments win. DiffSynth's real files have no such file, so they
load exactly as without it; the file is never looked for on the hub.

``ModelConfig``, its path resolution and the sidecar reader are defined in ``rewardkit.compat.model_config``
and re-exported here.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from rewardkit import weights as _weights
# ModelConfig, path resolution and the sidecar live in model_config (one way: it imports nothing from here); the
# names are re-exported so that every DiffSynth name and the siblings' helpers still import from this module.
from rewardkit.compat.model_config import (DEFAULT_BASE_PATH, IMAGE_METRICS_REPO, SIDECAR_NAME,  # noqa: F401
                                           ModelConfig, _default, _model_weights, _with_sidecar, sidecar_options)
from rewardkit.image_io import as_rgb_images
from rewardkit.registry import load as _load
from rewardkit.weights import CheckpointMismatchError

__all__ = ["ModelConfig", "Metric", "PickScoreMetric", "CLIPMetric", "HPSv2Metric", "AestheticMetric",
           "BioCLIPMetric", "FIDMetric", "LPIPSMetric", "IMAGE_METRICS_REPO", "DEFAULT_DEVICE", "SIDECAR_NAME",
           "sidecar_options"]

DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # DiffSynth: get_device_type(), at import
CLIP_METRIC_SCALE = 100.0  # torchmetrics CLIPScore's w (rewardkit.rewards.clip_score.TORCHMETRICS_SCALE)
CLIP_CONTEXT_LENGTH = 77  # DiffSynth's max_length default; rewardkit always truncates to CLIP's context
_TOKENIZER_PATTERNS = ("*.json", "*.txt")  # a processor folder without its (GB-sized) weights
_DTYPES = {torch.float32: None, torch.bfloat16: "bf16", torch.float16: "fp16"}
_RK_LOAD_HINT = "pass config=... to rk.load"  # rewardkit.weights.load_state_dict_strict's shape-conflict hint


def _rewardkit_dtype(torch_dtype: Any) -> Any:
    """DiffSynth's ``torch_dtype`` -> rewardkit's ``dtype``: fp32/None exact, bf16/fp16 autocast."""
    if isinstance(torch_dtype, torch.dtype):
        if torch_dtype not in _DTYPES:
            raise ValueError(f"torch_dtype={torch_dtype} is not supported; use None, torch.bfloat16 or torch.float16")
        return _DTYPES[torch_dtype]
    return torch_dtype  # None, or rewardkit's own names ("bf16", ...)


def _compat_hint(message: str, owner: str) -> str:
    """A mismatch message that names ``<owner>.from_pretrained(config=...)``, where compat users pass it."""
    fix = f"pass config=... to {owner}.from_pretrained (rewardkit.load options pass through)"
    if _RK_LOAD_HINT in message:
        return message.replace(_RK_LOAD_HINT, fix)
    return message + f"; with rewardkit.metrics, {fix}"


def load_for(owner: str, name: str, weights: Any, **options: Any) -> Any:
    """``rewardkit.load(name, weights=weights, **options)`` for the compat class ``owner``.

    Sidecar options fill in what ``options`` leaves out, and a checkpoint/architecture mismatch names
    ``<owner>.from_pretrained(config=...)`` instead of ``rk.load`` (the same option, passed through).
    """
    _with_sidecar(weights, options)
    try:
        return _load(name, weights=weights, **options)
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(_compat_hint(str(err), owner), err.missing, err.unexpected,
                                      err.shape_conflicts) from err


class Metric(torch.nn.Module):
    """Base of the DiffSynth-compatible metrics: a rewardkit reward (``self.reward``) on PIL images / paths.

    ``from_pretrained(model_config=None, processor_config=None, torch_dtype=None, device=DEFAULT_DEVICE, *,
    max_length=77, processor_kwargs=None, vram_limit=None, **load_options)``: ``None`` configs mean DiffSynth's
    defaults (``model_pattern`` / ``processor_pattern`` in ``DiffSynth-Studio/ImageMetrics``); weights from
    elsewhere without a ``processor_config`` use the tokenizer next to them (or the upstream one).
    ``load_options`` go to ``rewardkit.load`` (e.g. ``config=`` for another architecture).
    """

    registry_name = ""
    model_pattern = ""
    processor_pattern: str | None = None  # None: the reward reads no processor folder

    def __init__(self, reward: Any) -> None:
        super().__init__()
        self.reward = reward

    @staticmethod
    def tensor_to_list(value: Any) -> list:
        """DiffSynth's ``Metric.tensor_to_list``: a tensor -> a (nested) Python list; scalars wrapped."""
        if torch.is_tensor(value):
            value = value.detach().cpu().tolist()
        return value if isinstance(value, list) else [value]

    @classmethod
    def from_pretrained(cls, model_config: ModelConfig | None = None, processor_config: ModelConfig | None = None,
                        torch_dtype: torch.dtype | None = None, device: Any = DEFAULT_DEVICE, *,
                        max_length: int = CLIP_CONTEXT_LENGTH, processor_kwargs: dict | None = None,
                        vram_limit: float | None = None, **load_options: Any) -> Metric:
        """Build the metric (see the class docstring); ``ValueError`` for unsupported DiffSynth options."""
        name = cls.registry_name
        if max_length != CLIP_CONTEXT_LENGTH:
            raise ValueError(f"{name}: max_length={max_length} is not supported; prompts are truncated to the "
                             f"{CLIP_CONTEXT_LENGTH}-token CLIP context, as upstream does")
        if processor_kwargs:
            raise ValueError(f"{name}: processor_kwargs are not supported; preprocessing follows upstream "
                             "(score tensors with rewardkit.load(...) for custom preprocessing)")
        if vram_limit is not None:
            warnings.warn(f"{name}: vram_limit is ignored by rewardkit (the model is loaded whole)", stacklevel=2)
        model_config = model_config or _default(cls.model_pattern, ModelConfig())
        if processor_config is None and cls.processor_pattern and model_config.model_id == IMAGE_METRICS_REPO:
            processor_config = _default(cls.processor_pattern, model_config)  # that repo's weights come alone
        weights = _model_weights(model_config)
        if cls.processor_pattern and processor_config is not None:
            folder = processor_config.resolve(_TOKENIZER_PATTERNS)
            load_options.setdefault("processor", str(folder.parent if folder.is_file() else folder))
        _with_sidecar(weights, load_options)  # before the class defaults (CLIP's LAION ViT-H/14 for files)
        cls._add_options(weights, load_options)
        dtype = _rewardkit_dtype(model_config.computation_dtype or torch_dtype)
        device = model_config.computation_device or device
        return cls(load_for(cls.__name__, name, weights, device=device, dtype=dtype, **load_options))

    @classmethod
    def _add_options(cls, weights: str, options: dict[str, Any]) -> None:
        """Hook: reward-specific ``rk.load`` options."""

    def _images(self, images: Any) -> list[Image.Image]:
        items, name = (list(images) if isinstance(images, (list, tuple)) else [images]), self.reward.name
        if not items:
            raise ValueError(f"{name}: expected at least one image, got an empty list")
        for i, item in enumerate(items):
            if not isinstance(item, (str, os.PathLike, Image.Image)):
                raise TypeError(f"{name}: images[{i}] is {type(item).__name__}; expected a PIL image or an image "
                                "path (score tensors with rewardkit.load(...)(images, prompts))")
        # DiffSynth converts with Image.convert("RGB"); image_io gives the same RGB for 8-bit images (alpha
        # dropped) and scales 16-bit images instead of clipping them.
        return as_rgb_images(items)

    def _pairs(self, prompt: Any, images: Any) -> tuple[list[Image.Image], list[str] | None]:
        """DiffSynth's pairing: 1 prompt x N images or N prompts x 1 image broadcast, else equal lengths."""
        pils = self._images(images)
        if prompt is None or not self.reward.requires_prompt:
            return pils, None  # evaluate_pil raises if the reward needs a prompt
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if len(prompts) == 1:
            prompts = prompts * len(pils)
        elif len(pils) == 1:
            pils = pils * len(prompts)
        elif len(prompts) != len(pils):
            raise ValueError(f"{self.reward.name}: expected one prompt, one image, or as many prompts as images, "
                             f"got {len(prompts)} prompts and {len(pils)} images")
        return pils, prompts

    def _output(self, prompt: Any, images: Any) -> Any:
        pils, prompts = self._pairs(prompt, images)
        with torch.no_grad():
            return self.reward.evaluate_pil(pils, prompts)

    def _matrix(self, prompt: str | list[str], images: Any, scale: torch.Tensor | float) -> torch.Tensor:
        """``scale * text @ image.T``, ``(n_prompts, n_images)``, from the exact-path embeddings."""
        from rewardkit.preprocess import preprocess_pil

        prompts, reward = [prompt] if isinstance(prompt, str) else list(prompt), self.reward
        with torch.no_grad():
            image_embeds = reward.image_embeds(preprocess_pil(self._images(images), reward.spec).to(reward.device))
            return scale * (reward.text_embeds(prompts) @ image_embeds.T)

    def score(self, prompt: str | list[str], images: Any) -> list[float]:
        """One float per (prompt, image) pair (``_pairs`` broadcasting; ``ValueError`` on a count mismatch)."""
        return self.tensor_to_list(self._output(prompt, images).scores)

    compute = forward = score  # DiffSynth's aliases (subclasses that override score re-alias them)

    def evaluate(self, prompt: str | list[str], images: Any) -> list[dict[str, Any]]:
        """One dict per pair: ``{"score": float, **details}`` (e.g. ``"cosine"``)."""
        out = self._output(prompt, images)
        rows: list[dict[str, Any]] = [{"score": s} for s in self.tensor_to_list(out.scores)]
        for key, values in out.details.items():
            for row, value in zip(rows, self.tensor_to_list(values)):
                row[key] = value
        return rows


class PickScoreMetric(Metric):
    """PickScore_v1: ``exp(logit_scale) * cos(prompt, image)`` (upstream ``calc_probs`` logits).

    Differs from DiffSynth's: exact GELU (DiffSynth builds the towers with QuickGELU); the PIL
    ``CLIPImageProcessor`` (DiffSynth follows the installed transformers, torchvision-backed in 5.x); and a
    list of prompts is PAIRED with the images (DiffSynth returns a prompt x image matrix; for rows per prompt
    use :meth:`probabilities`).
    """

    registry_name = "pickscore"
    model_pattern, processor_pattern = "PickScore/model.safetensors", "PickScore/"

    def probabilities(self, prompt: str | list[str], images: Any) -> list:
        """Softmax of the scores over the images: a flat list for one prompt, a nested list per prompt."""
        if isinstance(prompt, str):
            return self.tensor_to_list(torch.softmax(self._output(prompt, images).scores, dim=-1))
        scale = self.reward.towers.logit_scale.float().exp()
        return self.tensor_to_list(torch.softmax(self._matrix(prompt, images, scale), dim=-1))

    def calc_probs(self, prompt: str | list[str], images: Any) -> list:
        """Same as :meth:`probabilities` (upstream PickScore's name)."""
        return self.probabilities(prompt, images)


class CLIPMetric(Metric):
    """CLIP score on laion CLIP-ViT-H/14: ``100 * max(cos, 0)`` (torchmetrics ``CLIPScore``), paired.

    Differs from DiffSynth's ``exp(logit_scale) * cos`` (no clamp; logit_scale about ln 100, unverified):
    equal for positive cosines if exp(logit_scale) is 100; ``evaluate()`` also gives the raw ``cosine``.
    Exact GELU and the PIL processor, as PickScore. :meth:`similarity_matrix` is ``100 * cos``, unclamped.
    A single HF-keys file is built as laion ViT-H/14 (``nets.clip.LAION_VIT_H_14``) unless ``config=`` is
    given; ``scale=`` (e.g. 2.5, Hessel et al.) is a ``load_options`` too.
    """

    registry_name = "clip-score"
    model_pattern = "CLIP-ViT-H-14-laion2B-s32B-b79K/model.safetensors"
    processor_pattern = "CLIP-ViT-H-14-laion2B-s32B-b79K/"

    @classmethod
    def _add_options(cls, weights: str, options: dict[str, Any]) -> None:
        from rewardkit.nets.clip import LAION_VIT_H_14

        options.setdefault("scale", CLIP_METRIC_SCALE)
        source = _weights.parse_weight_spec(weights)
        single_file = Path(source.location).is_file() if source.kind == "local" else source.filename is not None
        if single_file:  # a file carries no architecture; folders bring their config.json
            options.setdefault("config", LAION_VIT_H_14)

    def similarity_matrix(self, prompt: str | list[str], images: Any) -> list[list[float]]:
        """``scale * cos``, nested list ``n_prompts x n_images`` (no pairing, no clamp)."""
        return self.tensor_to_list(self._matrix(prompt, images, self.reward.scale))


class HPSv2Metric(Metric):
    """HPS v2: the raw cosine that ``hpsv2.score`` returns (about 0.2-0.35 on real images).

    Differs from DiffSynth's: no ``x exp(logit_scale)`` (DiffSynth's values are ~100x larger); upstream's
    letterbox (longest side -> 224, zero pad) instead of a shortest-side center crop; exact GELU.
    ``processor_config`` is accepted and not read (the tokenizer is open_clip's). Whether DiffSynth's
    ``HPSv2/model.safetensors`` holds v2.0 or v2.1 is unverified; either loads.
    """

    registry_name = "hpsv2"
    model_pattern = "HPSv2/model.safetensors"


class AestheticMetric(Metric):
    """LAION aesthetic predictor: ``MLP(normalize(ViT-L/14 image embedding))``; no prompt.

    Differs from DiffSynth's only in preprocessing: OpenAI ``clip.load``'s (PIL resize, round center crop)
    instead of ``CLIPImageProcessor`` (floor crop; torchvision-backed in transformers 5.x), which moves
    scores on sizes such as 832x1216. ``processor_config`` is accepted and not read. ``torch.bfloat16`` works
    (the head runs in fp32), where DiffSynth's is expected to fail with a dtype mismatch (clip_family.md 9.6).
    """

    registry_name = "aesthetic"
    model_pattern = "Aesthetic/model.safetensors"

    def score(self, images: Any) -> list[float]:  # type: ignore[override]
        """One float per image."""
        return Metric.score(self, None, images)

    compute = forward = score

    def evaluate(self, images: Any) -> list[dict[str, Any]]:  # type: ignore[override]
        """One ``{"score": float}`` per image."""
        return Metric.evaluate(self, None, images)


class BioCLIPMetric(Metric):
    """BioCLIP 2: ``exp(logit_scale) * cos(prompt, image)``, paired.

    Same formula and activation as DiffSynth's; unlike it, this runs on transformers 5.x and a prompt /
    image count mismatch raises ``ValueError``. The tokenizer is open_clip's: DiffSynth's ``tokenizer_config``
    (or ``processor_config``) is accepted and not read. Preprocessing is open_clip's eval transform.
    """

    registry_name = "bioclip"
    model_pattern = "BioCLIPv2/open_clip_model.safetensors"

    @classmethod
    def _add_options(cls, weights: str, options: dict[str, Any]) -> None:
        options.pop("tokenizer_config", None)

    def similarity_matrix(self, prompt: str | list[str], images: Any) -> list[list[float]]:
        """``exp(logit_scale) * cos``, nested list ``n_prompts x n_images``."""
        return self.tensor_to_list(self._matrix(prompt, images, self.reward.towers.logit_scale.float().exp()))


# Metric classes defined in sibling modules, which import this one (they subclass Metric or use its helpers):
# resolved lazily so that every DiffSynth name imports from here with no import cycle (the sibling modules
# depend on this one, never the reverse) and no VLM code is imported until asked for.
_SIBLINGS = {
    "FIDMetric": "rewardkit.compat.diffsynth_sets",
    "LPIPSMetric": "rewardkit.compat.diffsynth_sets",
    "ImageRewardMetric": "rewardkit.compat.diffsynth_imagereward",
    "HPSv3Metric": "rewardkit.compat.diffsynth_hpsv3",
    "UnifiedReward2Metric": "rewardkit.compat.diffsynth_unified_reward",
    "UnifiedRewardEditMetric": "rewardkit.compat.diffsynth_unified_reward",
    "QwenImageBenchMetric": "rewardkit.compat.diffsynth_qwen_image_bench",
}


def __getattr__(name: str) -> Any:
    module = _SIBLINGS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SIBLINGS))
