"""The registry: reward name -> metadata + a lazy ``"module:function"`` target.

Importing this module imports no model code. ``load(name, ...)`` imports the target on demand and calls
it as ``factory(weights=..., device=..., dtype=..., **options)``. All built-ins are registered at the
bottom of this file, one line each, so the inventory fits on one screen.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["Entry", "register", "get_entry", "names", "list_rewards", "load", "option_defaults"]

Kind = Literal["reward", "distribution"]


@dataclass(frozen=True)
class Entry:
    """Metadata of a registered reward or metric.

    Attributes:
        name: registry id (lowercase, no whitespace), e.g. ``"pickscore"``.
        kind: ``"reward"`` (per-image ``RewardFn``) or ``"distribution"`` (set-level metric).
        target: lazy ``"module:function"`` factory, called with ``weights, device, dtype, **options``.
        description: one line for ``rewardkit list``.
        higher_is_better: direction of the score.
        differentiable: gradients reach the pixels on the tensor path.
        requires_prompt: the reward needs one prompt per image.
        requires_reference: a paired metric that needs ``reference=`` images.
        requires_source: an edit reward that needs ``source=`` images (the unedited inputs).
        generative: a VLM judge that answers in text which is parsed; a row whose answer cannot be parsed
            scores NaN with the reason in ``details["failure"]``.
        requires_metadata: the reward scores each image against a per-row record passed as ``metadata=``
            (one dict per image, e.g. GenEval's ``tag`` / ``include`` / ``exclude``); a row without one is NaN.
        example_prompt: a prompt of the form the reward reads, where it reads a particular form (``ocr``: the
            target in double quotes); ``None`` = any caption. For demos, tests and ``--tiny`` runs.
        score_range: informational ``(low, high)``; ``None`` for unbounded sides.
        default_weights: the upstream source used when ``weights=None``.
        upstream: where the original implementation lives (cited in docs).
        extras: the pip extra that the reward needs beyond the core install, if any.
        tiny: name of the builder in ``rewardkit.testing`` that makes a tiny checkpoint for it.
    """

    name: str
    kind: Kind
    target: str
    description: str
    higher_is_better: bool = True
    differentiable: bool = True
    requires_prompt: bool = True
    requires_reference: bool = False
    requires_source: bool = False
    generative: bool = False
    requires_metadata: bool = False
    example_prompt: str | None = None
    score_range: tuple[float | None, float | None] = (None, None)
    default_weights: str | None = None
    upstream: str = ""
    extras: str | None = None
    tiny: str | None = None
    default_options: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, Entry] = {}


def register(entry: Entry, *, replace: bool = False) -> Entry:
    """Add ``entry`` to the registry.

    Raises:
        ValueError: an invalid or duplicate name, an unknown kind, or a malformed target.
    """
    name = entry.name
    if not name or name != name.strip() or any(ch.isspace() for ch in name) or name != name.lower():
        raise ValueError(f"invalid reward name {name!r}: use lowercase without whitespace, e.g. 'my-reward'")
    if entry.kind not in ("reward", "distribution"):
        raise ValueError(f"{name}: kind must be 'reward' or 'distribution', got {entry.kind!r}")
    if entry.target.count(":") != 1:
        raise ValueError(f"{name}: target must look like 'package.module:function', got {entry.target!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"reward {name!r} is already registered; pass replace=True to override it")
    _REGISTRY[name] = entry
    return entry


def names(kind: Kind | None = None) -> list[str]:
    """Registered names, sorted; optionally only one kind."""
    return sorted(n for n, e in _REGISTRY.items() if kind is None or e.kind == kind)


def get_entry(name: str) -> Entry:
    """The entry for ``name``.

    Raises:
        KeyError: an unknown name, with close matches suggested.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(f"unknown reward {name!r}{hint} Run `rewardkit list` to see all names.") from None


def list_rewards(kind: Kind | None = None) -> list[dict[str, Any]]:
    """Registry metadata as a list of plain dicts (what ``rewardkit list --json`` prints)."""
    return [asdict(_REGISTRY[n]) for n in names(kind)]


def _import_target(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr)


_CORE_ARGS = ("weights", "device", "dtype")
_VLM_BUILD = ("rewardkit.vlm.build:_LOCAL_OPTIONS", "rewardkit.vlm.build:_SERVED_OPTIONS")
# Factories whose **options go somewhere their signature cannot show (a backend builder, a judge object):
# "module:attr" of a tuple of option names or of a class / function whose keyword parameters are the options.
_FORWARDED_OPTIONS: dict[str, tuple[str, ...]] = {
    "rewardkit.rewards.unified_reward:load_unified_reward_2": (
        "rewardkit.rewards.unified_reward:_UR2_OPTIONS", *_VLM_BUILD),
    "rewardkit.rewards.unified_reward:load_unified_reward_edit": (
        "rewardkit.rewards.unified_reward:_EDIT_OPTIONS", *_VLM_BUILD),
    "rewardkit.rewards.qwen_image_bench:load": _VLM_BUILD,
    "rewardkit.rewards.ocr:load": ("rewardkit.rewards.ocr_backends:VlmOcrBackend", *_VLM_BUILD),
}


def _resolve(annotation: Any, namespace: dict[str, Any]) -> Any:
    """A (possibly string) annotation evaluated in its module's namespace; ``None`` when it cannot be."""
    if not isinstance(annotation, str):
        return annotation
    try:
        return eval(annotation, namespace)  # noqa: S307 - annotations of our own modules, never user input
    except Exception:  # a name imported only under TYPE_CHECKING, a union of such names, ...
        return None


def _keywords(func: Any, skip_required: bool) -> tuple[dict[str, Any], bool]:
    """``({name: default}, takes **kwargs)`` of ``func``'s keyword-capable parameters.

    With ``skip_required`` (a class that a factory builds), parameters without a default are left out (the
    factory supplies them) and a parameter annotated with a config dataclass stands for that dataclass's
    fields, nested ones too, since factories take such fields as options (``rk.load("ssim", sigma=...)``).
    A factory's own parameters are always options as they are.
    """
    sig = inspect.signature(func)
    namespace = getattr(inspect.unwrap(func), "__globals__", {})
    found: dict[str, Any] = {}
    for param in sig.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY) or param.name == "self":
            continue
        if skip_required and param.default is param.empty:
            continue
        kind = _resolve(param.annotation, namespace) if skip_required else None
        found.update(_dataclass_fields(kind) if dataclasses.is_dataclass(kind) else {param.name: param.default})
    return found, any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def _dataclass_fields(cls: Any) -> dict[str, Any]:
    namespace = vars(sys.modules.get(cls.__module__, object()))
    found: dict[str, Any] = {}
    for item in dataclasses.fields(cls):
        kind = _resolve(item.type, dict(namespace))
        default = item.default if item.default is not dataclasses.MISSING else inspect.Parameter.empty
        found.update(_dataclass_fields(kind) if dataclasses.is_dataclass(kind) else {item.name: default})
    return found


def _class_keywords(cls: type) -> dict[str, Any] | None:
    """Keyword options of ``cls(...)``: its ``__init__`` and, while that passes **kwargs up, its bases'."""
    found: dict[str, Any] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        if klass.__module__.split(".")[0] in ("torch", "builtins"):
            return found  # nn.Module / object take no options
        more, open_ended = _keywords(vars(klass)["__init__"], skip_required=True)
        found = {**more, **found}
        if not open_ended:
            return found
    return None


def option_defaults(name: str) -> dict[str, Any] | None:
    """Options that ``rk.load(name, ...)`` accepts besides weights, device and dtype.

    Args:
        name: a registry name or a ``"package.module:factory"`` dotted path.

    Returns:
        ``{option: default}`` (``inspect.Parameter.empty`` where there is none), found in the factory's
        signature and, where it passes ``**options`` on, in the signature of the class it returns (and its
        bases) or in the option lists it forwards to; ``None`` when the set cannot be known (a factory whose
        ``**options`` go somewhere unannotated), in which case the factory checks its options itself.
    """
    target = _target(name)
    factory = _import_target(target)
    found, open_ended = _keywords(factory, skip_required=False)
    if not open_ended:
        return {k: v for k, v in found.items() if k not in _CORE_ARGS}
    if target in _FORWARDED_OPTIONS:
        for source in _FORWARDED_OPTIONS[target]:
            value = _import_target(source)
            found.update(dict.fromkeys(value, inspect.Parameter.empty) if isinstance(value, (tuple, list, set,
                         frozenset)) else _keywords(value, skip_required=True)[0])
        return {k: v for k, v in found.items() if k not in _CORE_ARGS}
    made = _resolve(inspect.signature(factory).return_annotation, getattr(factory, "__globals__", {}))
    more = _class_keywords(made) if isinstance(made, type) else None
    return None if more is None else {k: v for k, v in {**more, **found}.items() if k not in _CORE_ARGS}


def _target(name: str) -> str:
    return name if name not in _REGISTRY and ":" in name else get_entry(name).target


def _check_options(name: str, options: dict[str, Any]) -> None:
    """Raise ``TypeError`` naming the first unknown option, the valid ones and the closest match."""
    valid = option_defaults(name)
    if valid is None:
        return
    for key in options:
        if key not in valid:
            close = difflib.get_close_matches(key, [*valid, *_CORE_ARGS], n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            listed = ", ".join(sorted(valid)) or "none"
            raise TypeError(f"{name}: unknown option {key!r}{hint}; valid options: {listed} "
                            "(and weights=, device=, dtype=)")


def load(name: str, weights: Any = None, device: Any = None, dtype: Any = None, **options: Any) -> Any:
    """Build a registered reward or metric.

    Args:
        name: a registry name (``rewardkit list``), or a ``"package.module:factory"`` dotted path of
            your own factory taking the same arguments.
        weights: local file/folder, ``"hf:owner/repo[/file]"`` or ``"ms:owner/repo[/file]"``;
            ``None`` = the upstream default of the entry.
        device: where the model lives (``None`` = CPU); move it later with ``.to()``.
        dtype: ``None``/``"fp32"`` (exact) or ``"bf16"``/``"fp16"`` (autocast fast mode).
        **options: reward-specific options, e.g. ``config=`` to override the architecture.

    Returns:
        A ``RewardFn`` (kind ``"reward"``) or a ``DistributionMetric`` (kind ``"distribution"``).

    Raises:
        TypeError: an option the reward does not take (checked before any weight is read), with the valid
            options and the closest match.
    """
    target = _target(name)
    if "server" in options and "server" not in (option_defaults(name) or {"server": None}):
        from rewardkit.serve.client import load_remote  # served by `rewardkit serve` / a reward-server

        return load_remote(name, weights=weights, device=device, dtype=dtype, entry=_REGISTRY.get(name), **options)
    if target != name:
        options = {**get_entry(name).default_options, **options}
    _check_options(name, options)
    factory = _import_target(target)
    return factory(weights=weights, device=device, dtype=dtype, **options)


# ---------------------------------------------------------------------------------------------------
# Built-ins. One line each; keep sorted by family.
# ---------------------------------------------------------------------------------------------------
_CLIP = "rewardkit.rewards"
register(Entry("clip-score", "reward", f"{_CLIP}.clip_score:load", "CLIPScore (Hessel et al. 2021): w * max(cos, 0), OpenAI ViT-L/14", score_range=(0.0, 2.5), default_weights="hf:openai/clip-vit-large-patch14", upstream="jmhessel/clipscore; Lightning-AI/torchmetrics CLIPScore", tiny="tiny_clip_score"))
register(Entry("pickscore", "reward", f"{_CLIP}.pickscore:load", "PickScore_v1: exp(logit_scale) * cos on CLIP-H/14 fine-tuned on Pick-a-Pic", default_weights="hf:yuvalkirstain/PickScore_v1", upstream="yuvalkirstain/PickScore", tiny="tiny_pickscore"))
register(Entry("hpsv2", "reward", f"{_CLIP}.hps:load_v2", "HPS v2.0: raw cosine on open_clip ViT-H-14 + HPS checkpoint, letterbox preprocessing", score_range=(-1.0, 1.0), default_weights="hf:xswu/HPSv2/HPS_v2_compressed.pt", upstream="tgxs002/HPSv2 hpsv2.score", tiny="tiny_hpsv2"))
register(Entry("hpsv2.1", "reward", f"{_CLIP}.hps:load_v21", "HPS v2.1: raw cosine on open_clip ViT-H-14 + HPS v2.1 checkpoint", score_range=(-1.0, 1.0), default_weights="hf:xswu/HPSv2/HPS_v2.1_compressed.pt", upstream="tgxs002/HPSv2 hpsv2.score(hps_version='v2.1')", tiny="tiny_hpsv2"))
register(Entry("aesthetic", "reward", f"{_CLIP}.aesthetic:load", "LAION improved aesthetic predictor (sac+logos+ava1-l14-linearMSE) on OpenAI ViT-L/14", requires_prompt=False, default_weights="hf:camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth", upstream="christophschuhmann/improved-aesthetic-predictor", tiny="tiny_aesthetic"))
register(Entry("imagereward", "reward", "rewardkit.rewards.imagereward:load", "ImageReward v1.0: (MLP(BLIP ViT-L/16 + BERT cross-attention [CLS]) - mean) / std", default_weights="hf:THUDM/ImageReward/ImageReward.pt", upstream="THUDM/ImageReward ImageReward.score / score_gard", tiny="tiny_imagereward"))
register(Entry("hpsv3", "reward", "rewardkit.rewards.hpsv3:load", "HPSv3: mu of a regression head on Qwen2-VL-7B read at <|Reward|> (sigma in details), sequential positions", default_weights="hf:MizzenAI/HPSv3/HPSv3.safetensors", upstream="MizzenAI/HPSv3 HPSv3RewardInferencer.reward (hpsv3 1.0.0)", tiny="tiny_hpsv3"))
register(Entry("jpeg-compressibility", "reward", "rewardkit.rewards.jpeg:load_compressibility", "DDPO: minus the JPEG size in kB at quality 95", differentiable=False, requires_prompt=False, score_range=(None, 0.0), upstream="kvablack/ddpo-pytorch rewards.py jpeg_compressibility"))
register(Entry("jpeg-incompressibility", "reward", "rewardkit.rewards.jpeg:load_incompressibility", "DDPO: the JPEG size in kB at quality 95", differentiable=False, requires_prompt=False, score_range=(0.0, None), upstream="kvablack/ddpo-pytorch rewards.py jpeg_incompressibility"))
register(Entry("bioclip", "reward", f"{_CLIP}.bioclip:load", "BioCLIP 2: exp(logit_scale) * cos on open_clip ViT-L-14 trained on TreeOfLife-200M", default_weights="hf:imageomics/bioclip-2", upstream="Imageomics/bioclip-2 (open_clip hf-hub)", tiny="tiny_bioclip"))
_JUDGE = dict(differentiable=False, generative=True)
register(Entry("unified-reward-2", "reward", "rewardkit.rewards.unified_reward:load_unified_reward_2", "UnifiedReward 2.0: greedy VLM judge, mean of Alignment / Coherence / Style (1-5); local weights or server=", score_range=(1.0, 5.0), default_weights="hf:CodeGoat24/UnifiedReward-2.0-qwen35-9b", upstream="CodeGoat24/UnifiedReward inference_qwen/UnifiedReward-2.0-inference", tiny="tiny_unified_reward_2", **_JUDGE))
register(Entry("unified-reward-edit", "reward", "rewardkit.rewards.unified_reward:load_unified_reward_edit", "UnifiedReward Edit: greedy VLM judge of an edit vs source= (task= pointwise 0-25 mean / pairwise rank / pairwise score vs other=)", requires_source=True, default_weights="hf:CodeGoat24/UnifiedReward-Edit-qwen3vl-8b", upstream="CodeGoat24/UnifiedReward UnifiedReward-Edit", tiny="tiny_unified_reward_edit", **_JUDGE))
register(Entry("qwen-image-bench", "reward", "rewardkit.rewards.qwen_image_bench:load", "Qwen-Image-Bench (Q-Judger, 27B): thinking VLM judge, 0/1/2/N-A checklists per dimension -> total 0-100; dims= per prompt; local weights or server=", score_range=(0.0, 100.0), default_weights="hf:Qwen/Qwen-Image-Bench", upstream="QwenLM/Qwen-Image-Bench judge.py + score_utils.py (via DiffSynth-Studio diffsynth/models/qwen_image_bench.py)", tiny="tiny_qwen_image_bench", **_JUDGE))

_METRICS = "rewardkit.metrics"
_PYTORCH_FID_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
_SET = dict(higher_is_better=False, differentiable=False, requires_prompt=False)
register(Entry("fid", "distribution", f"{_METRICS}.fid:load_fid", "FID on the TF inception-2015-12-05 port; resize presets clean (default) / legacy-pytorch / torch-fidelity / torchmetrics / diffsynth", default_weights=_PYTORCH_FID_URL, upstream="mseitzer/pytorch-fid; GaParmar/clean-fid; toshas/torch-fidelity; torchmetrics FrechetInceptionDistance", tiny="tiny_fid_inception", **_SET))
register(Entry("kid", "distribution", f"{_METRICS}.kid:load_kid", "KID: unbiased cubic-kernel MMD on Inception pool3, 100 subsets of 1000, float64; [mean, std]", score_range=(None, None), default_weights=_PYTORCH_FID_URL, upstream="Binkowski et al. 2018; toshas/torch-fidelity metric_kid.py", tiny="tiny_fid_inception", **_SET))
register(Entry("inception-score", "distribution", f"{_METRICS}.inception_score:load_inception_score", "Inception Score on 1008 no-bias logits, 10 splits; [mean, std] (generated images only)", score_range=(1.0, None), default_weights=_PYTORCH_FID_URL, upstream="Salimans et al. 2016; toshas/torch-fidelity metric_isc.py", tiny="tiny_fid_inception", **{**_SET, "higher_is_better": True}))
register(Entry("cmmd", "distribution", f"{_METRICS}.cmmd:load_cmmd", "CMMD: RBF-MMD (sigma 10, x1000) on CLIP ViT-L/14@336 image embeddings", default_weights="hf:openai/clip-vit-large-patch14-336", upstream="google-research/google-research cmmd (Jayasumana et al. 2024)", tiny="tiny_cmmd", **_SET))
register(Entry("fd-dinov2", "distribution", f"{_METRICS}.fd_dinov2:load_fd_dinov2", "FD-DINOv2: Frechet distance on DINOv2 ViT-L/14 CLS features, dgm-eval preprocessing", default_weights="hf:facebook/dinov2-large", upstream="layer6ai-labs/dgm-eval (Stein et al. 2023)", tiny="tiny_fd_dinov2", **_SET))
_PAIRED = dict(requires_prompt=False, requires_reference=True)
register(Entry("ssim", "reward", f"{_METRICS}.ssim:load_ssim", "SSIM vs reference= images; presets wang (= scikit-image, valid region) and torchmetrics", score_range=(-1.0, 1.0), upstream="Wang et al. 2004; scikit-image structural_similarity; torchmetrics SSIM", **_PAIRED))
register(Entry("ms-ssim", "reward", f"{_METRICS}.ssim:load_ms_ssim", "MS-SSIM vs reference= images (5 scales, Wang et al. 2003 weights); presets torchmetrics and pytorch-msssim", score_range=(0.0, 1.0), upstream="Wang et al. 2003; torchmetrics MS-SSIM; VainF/pytorch-msssim", **_PAIRED))
register(Entry("psnr", "reward", f"{_METRICS}.psnr:load_psnr", "PSNR in dB per image vs reference= images, data_range 1 for [0, 1] input", score_range=(None, None), upstream="scikit-image peak_signal_noise_ratio", **_PAIRED))
register(Entry("lpips", "reward", f"{_METRICS}.lpips:load_lpips", "LPIPS v0.1 distance vs reference= images (alex default; vgg, squeeze)", higher_is_better=False, default_weights="torchvision ImageNet trunk + lpips v0.1 heads", upstream="richzhang/PerceptualSimilarity (lpips 0.1)", tiny="tiny_lpips", **_PAIRED))
register(Entry("ocr", "reward", "rewardkit.rewards.ocr:load", "Flow-GRPO OCR: 1 - capped Levenshtein(recognised, quoted target) / len(target); PP-OCRv4 via rapidocr (paddleocr / vlm backends)", differentiable=False, example_prompt='a shop sign that reads "OPEN DAILY"', score_range=(0.0, 1.0), default_weights="rapidocr-onnxruntime wheel: ch_PP-OCRv4_{det,rec}_infer.onnx", upstream="yifan123/flow_grpo flow_grpo/ocr.py OcrScorer", extras="ocr", tiny="tiny_ocr"))
register(Entry("geneval", "reward", "rewardkit.rewards.geneval:load", "GenEval (Ghosh et al. 2023) per image from metadata= (tag/include/exclude): flow_grpo partial score (score=strict|correct); Mask2Former + CLIP ViT-L-14 colours", differentiable=False, requires_prompt=False, requires_metadata=True, score_range=(0.0, 1.0), default_weights="hf:facebook/mask2former-swin-small-coco-instance (+ hf:timm/vit_large_patch14_clip_224.openai)", upstream="djghosh13/geneval evaluation/evaluate_images.py; yifan123/reward-server gen_eval.py", tiny="tiny_geneval"))
