"""flow_grpo's reward contract: the function ``multi_score(device, score_dict)`` returns, in flow_grpo's names and scales.

Upstream: ``yifan123/flow_grpo`` (94e23ee) ``flow_grpo/rewards.py`` ``multi_score`` and its scorers;
``scripts/train_sd3.py`` (ac4c86e) submits ``reward_fn(images, prompts, prompt_metadata, only_strict=True)`` to a
``ThreadPoolExecutor(max_workers=8)`` per sampling batch, reads every key with ``torch.as_tensor(value).float()``
and builds the advantages from ``"avg"`` alone (numpy means and stds per prompt group or batch).

``fn(images, prompts, metadata, ref_images=None, only_strict=True) -> (scores, info)``:

* ``images``: float ``(B, 3, H, W)`` in ``[0, 1]`` (the pipeline's ``output_type="pt"``), a uint8 numpy
  ``(B, H, W, 3)`` array (flow_grpo's other form), or a list of PIL images (any sizes).
* ``scores``: ``{name: [B floats], ..., "avg": [B floats]}`` with ``avg = sum_k w_k * score_k``; GenEval adds
  ``accuracy``, ``strict_accuracy``, ``<tag>_accuracy``, ``<tag>_strict_accuracy`` before its own key, as
  upstream. Every value is a list of Python floats: upstream's values are lists, numpy arrays or tensors
  depending on the scorer, and its loop only passes them through ``torch.as_tensor``.
* ``info``: ``{}`` as upstream, or ``{"failures": {name: {row: reason}}}`` when a row could not be scored.

Names and scales (each scorer's upstream file; rewardkit's registry reward in brackets):

* ``pickscore`` [pickscore]: ``exp(logit_scale) * cos / 26`` (``pickscore_scorer.py``; upstream PickScore has no /26).
* ``clipscore`` [clip-score's tower]: ``exp(logit_scale) * cos / 30`` on openai ViT-L/14 (``clip_scorer.py``;
  not CLIPScore's ``2.5 * max(cos, 0)``), on float pixels with torchvision's *bilinear* tensor resize.
* ``aesthetic`` [aesthetic]: the LAION MLP, unscaled, with transformers' ``CLIPProcessor`` (floor crop) where the
  LAION code uses ``clip.load``'s transform (round crop): one pixel apart on some sizes.
* ``imagereward`` [imagereward]: ``inference_rank``'s normalised score, unscaled (= ``ImageReward.score``).
* ``hpsv2_score`` [hpsv2.1]: raw cosine; upstream runs it under CUDA fp16 autocast, rewardkit in float32
  unless loaded with ``dtype="fp16"`` (``dtypes=``).
* ``jpeg_compressibility`` [jpeg-compressibility, ``convention="flow_grpo"``]: ``-kB / 500`` (ddpo-pytorch: ``-kB``).
* ``ocr`` [ocr]: ``1 - min(Levenshtein, len) / len`` of the quoted target, unscaled (PaddleOCR upstream,
  rapidocr's PP-OCRv4 by default here).
* ``geneval`` [geneval, ``jpeg_quality=75``]: the reward server's partial score, on the JPEG (quality 75) that
  flow_grpo's client sends; plus ``accuracy`` (GenEval), ``strict_accuracy`` (exact counts) and per-tag columns
  (-10.0 on rows of other tags), as upstream. Per-row GenEval ``metadata`` is required.

Refused (no rewardkit equivalent): ``deqa``, ``qwenvl``, ``unifiedreward`` (flow_grpo's UnifiedReward-7b-v1.5
"Final Score" prompt / 5 is not rewardkit's ``unified-reward-2``), ``video_ocr``, ``image_similarity``.

Tensors are quantised as upstream, ``(x * 255).round().clamp(0, 255)`` to uint8 (in float32), and scored on the
rewards' exact (PIL) paths; clipscore alone reads float pixels, as upstream. Values outside ``[0, 1]`` raise.

NaN policy: an unscorable row is NaN in its reward's list (``info["failures"]`` says why). A NaN ``avg`` would make
the advantages of its whole prompt group NaN, so such a row raises ``ValueError`` unless ``nan_value=x`` sets its
``avg`` to ``x`` (e.g. 0.0, what upstream's OCR and UnifiedReward score on failure).

Threads: the adapter keeps no state between calls; rewards keep per-instance caches, so concurrent calls score
one at a time (``serialize=True``; ``False`` for thread-safe rewards). Rewards that declare ``thread_safe`` (a
composition) are not serialized here: a z-score composition orders its statistics by the order calls enter it
(docs/composition.md), which a lock would scramble.
"""

from __future__ import annotations

import difflib
import math
import threading
from dataclasses import replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from rewardkit.errors import check_images, check_prompts, describe
from rewardkit.integrations.ddpo import row_failures

__all__ = ["FlowGRPOReward", "as_flow_grpo_reward", "multi_score", "SUPPORTED", "REFUSED",
           "PICKSCORE_DIVISOR", "CLIPSCORE_DIVISOR", "GENEVAL_JPEG_QUALITY", "OTHER_TAG"]

PICKSCORE_DIVISOR = 26.0  # flow_grpo/pickscore_scorer.py: scores = scores / 26  ("norm to 0-1")
CLIPSCORE_DIVISOR = 30.0  # flow_grpo/clip_scorer.py: outputs.logits_per_image.diagonal() / 30
GENEVAL_JPEG_QUALITY = 75  # flow_grpo rewards.py geneval_score: img.save(buffer, format="JPEG"), Pillow's default
OTHER_TAG = -10.0  # reward-server gen_eval.py: per-tag columns hold -10.0 for rows of other tags
_UINT8_MAX = 255
_NAME = "flow_grpo reward"

# flow_grpo name -> (registry name, rk.load options).
SUPPORTED: dict[str, tuple[str, dict[str, Any]]] = {
    "pickscore": ("pickscore", {}),
    "clipscore": ("clip-score", {}),
    "aesthetic": ("aesthetic", {}),
    "imagereward": ("imagereward", {}),
    "hpsv2_score": ("hpsv2.1", {}),
    "jpeg_compressibility": ("jpeg-compressibility", {"convention": "flow_grpo"}),
    "ocr": ("ocr", {}),
    "geneval": ("geneval", {"jpeg_quality": GENEVAL_JPEG_QUALITY}),
}
REFUSED: dict[str, str] = {
    "deqa": "flow_grpo posts JPEGs to a DeQA-Score server; rewardkit has no DeQA-Score reward",
    "qwenvl": "flow_grpo's QwenVLScorer prompt is not implemented in rewardkit",
    "unifiedreward": ("flow_grpo asks UnifiedReward-7b-v1.5 for a 'Final Score' (/5), which rewardkit does not "
                      "implement; rewardkit's unified-reward-2 is a different model and prompt: pass "
                      "rk.compose({'unified-reward-2': 0.2}) as a rewardkit reward instead"),
    "video_ocr": "video rewards are not part of rewardkit",
    "image_similarity": "rewardkit has no reference-image CLIP similarity reward (flow_grpo's ref_images)",
}


class _Images:
    """One call's images in the forms the scorers need, converted on first use (local to the call)."""

    def __init__(self, images: Any) -> None:
        if isinstance(images, torch.Tensor):
            check_images(_NAME, images)
            self.count = int(images.shape[0])
        elif isinstance(images, np.ndarray):
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
                raise ValueError(f"{_NAME}: a numpy batch must be uint8 (B, H, W, 3) (flow_grpo's NHWC form), got "
                                 f"{describe(images)}; pass float tensors (B, 3, H, W) in [0, 1] otherwise")
            self.count = int(images.shape[0])
        elif isinstance(images, (list, tuple)) and images:
            from rewardkit.image_io import as_rgb_images

            images = as_rgb_images(list(images))
            self.count = len(images)
        else:
            raise TypeError(f"{_NAME}: expected a float tensor (B, 3, H, W) in [0, 1], a uint8 numpy (B, H, W, 3) "
                            f"array or a non-empty list of PIL images, got {describe(images)}")
        self.source = images
        self._pils: list[Any] | None = None

    def pils(self) -> list[Any]:
        """8-bit RGB PIL images, quantised as flow_grpo does: ``(x * 255).round().clamp(0, 255)``."""
        if self._pils is None:
            from PIL import Image

            if isinstance(self.source, torch.Tensor):
                pixels = (self.source.detach().float() * _UINT8_MAX).round().clamp(0, _UINT8_MAX).to(torch.uint8)
                self._pils = [Image.fromarray(a) for a in pixels.permute(0, 2, 3, 1).cpu().numpy()]
            elif isinstance(self.source, np.ndarray):
                self._pils = [Image.fromarray(a) for a in self.source]
            else:
                self._pils = list(self.source)
        return self._pils

    def floats(self) -> list[torch.Tensor]:
        """Float batches in ``[0, 1]``: the tensor itself, or one ``(1, 3, H, W)`` per image (uint8 / 255)."""
        from rewardkit.image_io import pil_to_tensor, to_tensor

        if isinstance(self.source, torch.Tensor):
            return [self.source.detach()]
        if isinstance(self.source, np.ndarray):
            return [to_tensor(self.source, layout="NHWC")]  # flow_grpo: torch.tensor(uint8) / 255.0
        return [pil_to_tensor(image)[None] for image in self.source]


def _clipscore(reward: Any, images: _Images, prompts: list[str]) -> tuple[torch.Tensor, dict]:
    """flow_grpo clip_scorer.py: the processor's sizes (224 for ViT-L/14) as torchvision tensor transforms:
    Resize(S) (bilinear, antialiased) -> CenterCrop(S) (round) -> Normalize -> ``logits_per_image`` / 30."""
    from rewardkit.preprocess import PreprocessSpec, center_crop, normalize, resize, resized_shape

    size = reward.spec.size
    shape_spec = PreprocessSpec(size=size)
    pixels = []
    for batch in images.floats():
        batch = batch.to(reward.device, torch.float32)
        size_hw = resized_shape(int(batch.shape[-2]), int(batch.shape[-1]), shape_spec)
        x = center_crop(resize(batch, size_hw, interpolation="bilinear", antialias=True), size, rounding="round")
        pixels.append(normalize(x, reward.spec.mean, reward.spec.std))
    out = reward.score_pixels(torch.cat(pixels), prompts)
    logit_scale = reward.towers.logit_scale.float().exp()
    return logit_scale * out.details["cosine"] / CLIPSCORE_DIVISOR, {}


def _aesthetic(reward: Any, images: _Images, prompts: list[str]) -> tuple[torch.Tensor, dict]:
    """flow_grpo aesthetic_scorer.py: transformers CLIPProcessor (4.x, PIL resize, floor crop) -> CLIP -> MLP."""
    from rewardkit.preprocess import preprocess_pil

    spec = replace(reward.spec, crop_rounding="floor", pil_backend="hf")
    return reward.score_pixels(preprocess_pil(images.pils(), spec), None).scores, {}


def _pil_path(divisor: float = 1.0) -> Callable[..., tuple[torch.Tensor, dict]]:
    def score(reward: Any, images: _Images, prompts: list[str]) -> tuple[torch.Tensor, dict]:
        out = reward.evaluate_pil(images.pils(), prompts if reward.requires_prompt else None)
        return out.scores / divisor if divisor != 1.0 else out.scores, out.details
    return score


_SCORERS: dict[str, Callable[..., tuple[torch.Tensor, dict]]] = {
    "pickscore": _pil_path(PICKSCORE_DIVISOR), "clipscore": _clipscore, "aesthetic": _aesthetic,
    "imagereward": _pil_path(), "hpsv2_score": _pil_path(), "jpeg_compressibility": _pil_path(), "ocr": _pil_path(),
}


def _floats(values: Any) -> list[float]:
    return [float(v) for v in torch.as_tensor(values).detach().double().cpu().tolist()]


class FlowGRPOReward:
    """flow_grpo's ``multi_score`` function over rewardkit rewards (see the module docstring)."""

    def __init__(self, members: Mapping[str, Any], weights: Mapping[str, float] | None,
                 nan_value: float | None, serialize: bool) -> None:
        self.members = dict(members)  # flow_grpo name (or the reward's name) -> RewardFn
        self.weights = None if weights is None else {k: float(v) for k, v in weights.items()}
        self.nan_value = nan_value
        self._lock = threading.Lock() if serialize and not self._thread_safe() else None
        self.__name__ = "multi_score"

    def _thread_safe(self) -> bool:
        # Compositions declare thread_safe (per-part locks, ticketed z-score statistics): a lock here would hand
        # them calls in lock-acquisition order instead of the order the pool's workers took them.
        return all(getattr(reward, "thread_safe", False) for reward in self.members.values())

    def __call__(self, images: Any, prompts: Sequence[str], metadata: Sequence[Any] | None = None,
                 ref_images: Any = None, only_strict: bool = True) -> tuple[dict[str, list[float]], dict]:
        if ref_images is not None:
            raise ValueError(f"{_NAME}: ref_images= is only read by flow_grpo's image_similarity, which rewardkit "
                             "does not provide; drop it")
        batch = _Images(images)
        texts = prompts if prompts is None or isinstance(prompts, str) else list(prompts)
        needs_prompts = any(getattr(reward, "requires_prompt", True) for reward in self.members.values())
        prompt_list = check_prompts(_NAME, texts, batch.count, needs_prompts)
        if self._lock is None:
            return self._score(batch, prompt_list, metadata, only_strict)
        with self._lock:
            return self._score(batch, prompt_list, metadata, only_strict)

    def _score(self, batch: _Images, prompts: list[str] | None, metadata: Any, only_strict: bool) -> tuple[dict, dict]:
        scores: dict[str, list[float]] = {}
        failures: dict[str, dict[int, str]] = {}
        weighted = []
        with torch.no_grad():
            for name, reward in self.members.items():
                if self.weights is None:  # one rewardkit reward: its own names and scale, its score is avg
                    values, details = _rewardkit_scores(reward, batch, prompts)
                    scores.update({k: _floats(v) for k, v in details.items()
                                   if isinstance(v, torch.Tensor) and v.shape == (batch.count,)})
                elif name == "geneval":
                    values, details = _geneval(reward, batch, prompts, metadata, only_strict, scores)
                else:
                    values, details = _SCORERS[name](reward, batch, prompts)
                scores[name] = _floats(values)
                weighted.append(values.detach().double().cpu() * (1.0 if self.weights is None else self.weights[name]))
                if row_failures(values, details):
                    failures[name] = row_failures(values, details)
        # flow_grpo: avg = sum_k w_k * score_k, row by row (here in float64)
        avg = _floats(torch.stack(weighted).sum(0))
        bad_rows = [i for i, v in enumerate(avg) if math.isnan(v)]
        if bad_rows and self.nan_value is None:
            why = "; ".join(f"{name}: {rows}" for name, rows in failures.items()) or "a reward returned NaN"
            raise ValueError(f"{_NAME}: rows {bad_rows} could not be scored ({why}); a NaN 'avg' makes flow_grpo's "
                             "advantages NaN for the whole prompt group: fix the inputs or pass nan_value=<float>")
        scores["avg"] = [self.nan_value if math.isnan(v) else v for v in avg]
        return scores, ({"failures": failures} if failures else {})

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_lock"] = self._lock is not None  # locks do not pickle; a copy gets its own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        serialize = state.pop("_lock")
        self.__dict__.update(state)
        self._lock = threading.Lock() if serialize and not self._thread_safe() else None


def _rewardkit_scores(reward: Any, batch: _Images, prompts: list[str] | None) -> tuple[torch.Tensor, dict]:
    """A rewardkit reward on its own terms: the tensor path for tensors/arrays, the exact path for PIL lists."""
    from rewardkit.image_io import to_tensor

    texts = prompts if getattr(reward, "requires_prompt", True) else None
    if isinstance(batch.source, list) and hasattr(reward, "evaluate_pil"):
        out = reward.evaluate_pil(batch.source, texts)
        return out.scores, dict(out.details)
    images = batch.source if isinstance(batch.source, torch.Tensor) else to_tensor(
        batch.source, layout="NHWC") if isinstance(batch.source, np.ndarray) else to_tensor(batch.source)
    if hasattr(reward, "evaluate"):
        out = reward.evaluate(images, texts)
        return out.scores, dict(out.details)
    return reward(images, texts), {}


def _geneval(reward: Any, images: _Images, prompts: list[str], metadata: Any, only_strict: bool,
             scores: dict[str, list[float]]) -> tuple[torch.Tensor, dict]:
    """flow_grpo rewards.py ``geneval_score`` + reward-server ``gen_eval.py`` ``compute_geneval``: the partial score
    (the ``geneval`` key, what ``avg`` sums), then ``accuracy``, ``strict_accuracy`` and per-tag columns, added to
    ``scores`` before it in upstream's order. ``only_strict`` only saves upstream's server a check (it then reports
    ``accuracy`` 0.0); rewardkit reads both checks off the same detections, so ``accuracy`` is always real."""
    from rewardkit.rewards.geneval_rules import TAGS

    rows = None if metadata is None else list(metadata)
    out = reward.evaluate_pil(images.pils(), None, metadata=rows)
    details = out.details
    correct, strict = _floats(details["correct"]), _floats(details["strict"])
    scores["accuracy"], scores["strict_accuracy"] = correct, strict
    for suffix, values in (("strict_accuracy", strict), ("accuracy", correct)):
        for tag in TAGS:
            scores[f"{tag}_{suffix}"] = [value if row_tag == tag else math.nan if row_tag is None else OTHER_TAG
                                         for value, row_tag in zip(values, details["tag"])]
    return details["partial"], details


def _check_entry(name: Any, weight: Any) -> None:
    """One score_dict entry: a supported flow_grpo name and a finite weight (checked before any model loads)."""
    if not isinstance(name, str):
        raise TypeError(f"{_NAME}: score_dict keys are flow_grpo reward names (str), got {describe(name)}; compose "
                        "rewardkit rewards with rk.compose and pass the composition instead")
    if name in REFUSED:
        raise ValueError(f"{_NAME}: {name!r} is not supported: {REFUSED[name]}. Supported: {sorted(SUPPORTED)}")
    if name not in SUPPORTED:
        close = difflib.get_close_matches(name, list(SUPPORTED) + list(REFUSED), n=2, cutoff=0.5)
        hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"{_NAME}: unknown flow_grpo reward {name!r}{hint}; supported: {sorted(SUPPORTED)}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ValueError(f"{_NAME}: the weight of {name!r} must be a finite number, got {weight!r}")


def _resolve(name: str, device: Any, dtypes: Mapping[str, Any], checkpoints: Mapping[str, Any],
             models: Mapping[str, Any]) -> Any:
    if name in models:
        for attr, value in SUPPORTED[name][1].items():  # a prebuilt reward must carry flow_grpo's load options
            have = getattr(models[name], attr, None)
            if have != value:
                raise ValueError(f"{_NAME}: models[{name!r}] has {attr}={have!r}; flow_grpo's {name} needs "
                                 f"rk.load({SUPPORTED[name][0]!r}, {attr}={value!r})")
        return models[name]
    from rewardkit.registry import get_entry, load

    registry_name, options = SUPPORTED[name]
    try:
        get_entry(registry_name)
    except KeyError:
        raise ValueError(f"{_NAME}: {name!r} maps to rewardkit's {registry_name!r}, which this installation does not "
                         "register; update rewardkit (or pass models={name: reward})") from None
    return load(registry_name, weights=checkpoints.get(name), device=device, dtype=dtypes.get(name), **options)


def as_flow_grpo_reward(spec_or_reward: Any, device: Any = None, *, nan_value: float | None = None,
                        serialize: bool = True, models: Mapping[str, Any] | None = None,
                        checkpoints: Mapping[str, Any] | None = None,
                        dtypes: Mapping[str, Any] | None = None) -> FlowGRPOReward:
    """A drop-in for flow_grpo's ``multi_score(device, score_dict)`` result.

    Args:
        spec_or_reward: a flow_grpo ``score_dict`` (``{"pickscore": 1.0, "ocr": 0.5}``: flow_grpo names and
            scales, see the module docstring), or a rewardkit RewardFn / composition (its own names and
            scale; ``avg`` is its score).
        device: where rewards named in a ``score_dict`` are loaded (``rk.load(device=...)``).
        nan_value: ``avg`` of rows that a reward could not score; ``None`` raises instead (the default).
        serialize: score calls from several threads one at a time.
        models: prebuilt rewardkit rewards per flow_grpo name (e.g. local or tiny checkpoints).
        checkpoints: ``weights=`` per flow_grpo name for ``rk.load``.
        dtypes: ``dtype=`` per flow_grpo name for ``rk.load`` (e.g. ``{"hpsv2_score": "fp16"}``).

    Returns:
        ``fn(images, prompts, metadata, ref_images=None, only_strict=True) -> (scores, info)``.
    """
    if nan_value is not None and not math.isfinite(float(nan_value)):
        raise ValueError(f"{_NAME}: nan_value must be a finite float or None, got {nan_value!r}")
    nan_value = None if nan_value is None else float(nan_value)
    if isinstance(spec_or_reward, Mapping):
        if not spec_or_reward:
            raise ValueError(f"{_NAME}: empty score_dict; give e.g. {{'pickscore': 1.0}}")
        for name, weight in spec_or_reward.items():
            _check_entry(name, weight)
        members = {name: _resolve(name, device, dtypes or {}, checkpoints or {}, models or {})
                   for name in spec_or_reward}
        return FlowGRPOReward(members, spec_or_reward, nan_value, serialize)
    if isinstance(spec_or_reward, str) or not callable(spec_or_reward):
        raise TypeError(f"{_NAME}: expected a flow_grpo score_dict ({{name: weight}}) or a rewardkit reward, got "
                        f"{describe(spec_or_reward)}; for one flow_grpo name write {{{spec_or_reward!r}: 1.0}}")
    name = getattr(spec_or_reward, "name", type(spec_or_reward).__name__)
    return FlowGRPOReward({name: spec_or_reward}, None, nan_value, serialize)


def multi_score(device: Any, score_dict: Mapping[str, float]) -> FlowGRPOReward:
    """flow_grpo's own signature: ``reward_fn = multi_score(accelerator.device, config.reward_fn)``."""
    return as_flow_grpo_reward(score_dict, device=device)
