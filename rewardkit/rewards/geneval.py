"""``geneval``: GenEval (Ghosh et al. 2023) as a per-image reward and a benchmark, Flow-GRPO's headline task.

Each image needs its prompt's GenEval metadata, passed as ``metadata=`` (one dict per image; flow_grpo's
``dataset/geneval/*.jsonl`` rows, GenEval's ``prompts/evaluation_metadata.jsonl`` rows): ``tag`` and
``include`` / ``exclude`` clauses of ``class``, ``count`` and optional ``color`` / ``position``. Prompts are not
used (upstream's reward server drops them). A row without metadata is NaN with the reason.

Per image: detect objects (:mod:`rewardkit.rewards.geneval_detectors`), keep them by GenEval's thresholds,
classify colours with CLIP (:mod:`rewardkit.rewards.geneval_colors`) and apply the rules
(:mod:`rewardkit.rewards.geneval_rules`). ``score=`` picks the reward:

* ``"partial"`` (default): the partial score of flow_grpo's GenEval reward server (what flow_grpo trains on);
* ``"strict"``: 1.0 when the server's exact-count check passes, else 0.0 (flow_grpo's ``strict_accuracy``);
* ``"correct"``: 1.0 when GenEval's own check passes (the benchmark's per-image correctness).

``details`` always hold ``correct``, ``strict`` and ``partial`` (float32 ``(B,)``), ``tag``, ``reason``,
``raw`` (the kept detections as JSON: class -> boxes with scores) and ``failure``. Not differentiable.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any, Sequence

import torch

from rewardkit.protocols import Reward, RewardOutput
from rewardkit.rewards.geneval_rules import (
    GenEvalThresholds,
    check_metadata,
    evaluate_geneval,
    evaluate_partial,
    select_detections,
)

__all__ = ["GenEvalReward", "load", "SCORES", "DETECTORS"]

SCORES = ("partial", "strict", "correct")
DETECTORS = ("mask2former", "mmdet")
_NO_METADATA = "no GenEval metadata for this image (pass metadata=[{'tag': ..., 'include': [...]}, ...])"


class GenEvalReward(Reward):
    """GenEval per image (see the module docstring).

    Args:
        detector: an object with ``detect(pil_images) -> list[dict[class, list[Detection]]]``.
        colors: a callable ``(pil_image, classname, detections) -> list[colour]``.
        score: ``"partial"``, ``"strict"`` or ``"correct"``.
        thresholds: GenEval's detection thresholds.
        jpeg_quality: re-encode images as JPEG at this quality before detection, as flow_grpo's client does
            before sending them to the reward server (PIL's default 75); ``None`` (default) scores them as given.
    """

    name = "geneval"
    higher_is_better = True
    differentiable = False
    requires_prompt = False
    context_keys = frozenset({"metadata"})

    def __init__(self, detector: Any, colors: Any, score: str = "partial",
                 thresholds: GenEvalThresholds = GenEvalThresholds(), jpeg_quality: int | None = None) -> None:
        super().__init__()
        if score not in SCORES:
            raise ValueError(f"geneval: score must be one of {SCORES}, got {score!r}")
        if jpeg_quality is not None and not 1 <= int(jpeg_quality) <= 100:
            raise ValueError(f"geneval: jpeg_quality must be in [1, 100] or None, got {jpeg_quality!r}")
        self.detector, self.colors, self.score_kind = detector, colors, score
        self.thresholds, self.jpeg_quality = thresholds, jpeg_quality
        self.freeze()

    def score(self, images: torch.Tensor, prompts: list[str] | None, *, metadata: Any = None,
              **context: Any) -> RewardOutput:
        from rewardkit.vlm.judge import tensor_to_pil

        if context:
            raise TypeError(f"geneval: unexpected keyword arguments {sorted(context)}; it takes images and metadata=")
        return self.score_pil(tensor_to_pil(images), metadata, images.device)

    def evaluate_pil(self, images: Any, prompts: Any = None, *, metadata: Any = None) -> RewardOutput:
        """Score PIL images or files at their own sizes (the CLI's path); ``prompts`` are ignored."""
        from rewardkit.image_io import as_rgb_images

        items = images if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ValueError("geneval: expected at least one image, got an empty list")
        return self.score_pil(as_rgb_images(items), metadata, torch.device("cpu"))

    def _metadata(self, metadata: Any, batch: int) -> list[dict | None]:
        if metadata is None:
            return [None] * batch
        if isinstance(metadata, dict):
            metadata = [metadata] * batch
        if not isinstance(metadata, (list, tuple)) or len(metadata) != batch:
            raise ValueError(f"geneval: metadata= must be one dict or a list of {batch} dicts (one per image), got "
                             f"{type(metadata).__name__} of length {len(metadata) if hasattr(metadata, '__len__') else '?'}")
        return [None if m is None else check_metadata(m, f"geneval: metadata[{i}]") for i, m in enumerate(metadata)]

    def _jpeg(self, images: list[Any]) -> list[Any]:
        from PIL import Image

        out = []
        for image in images:
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=self.jpeg_quality)
            out.append(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
        return out

    def score_pil(self, images: Sequence[Any], metadata: Any, device: torch.device) -> RewardOutput:
        """Score RGB PIL images against their metadata; detection runs once for the rows that have metadata."""
        metas = self._metadata(metadata, len(images))
        todo = [i for i, m in enumerate(metas) if m is not None]
        if self.jpeg_quality is not None:
            images = self._jpeg(list(images))
        detections = dict(zip(todo, self.detector.detect([images[i] for i in todo]))) if todo else {}
        nan = math.nan
        values = {key: [nan] * len(images) for key in ("correct", "strict", "partial")}
        raw: list[str | None] = [None] * len(images)
        reasons: list[str | None] = [None] * len(images)
        failures: list[str | None] = [None if m is not None else _NO_METADATA for m in metas]
        for i, found in detections.items():
            meta = metas[i]
            kept = select_detections(found, meta["tag"], self.thresholds)
            classify = _ColourCache(self.colors, images[i])
            correct, reason = evaluate_geneval(kept, meta, classify, self.thresholds.position_threshold)
            strict, partial, strict_reason = evaluate_partial(kept, meta, classify, self.thresholds.position_threshold)
            values["correct"][i], values["strict"][i], values["partial"][i] = float(correct), float(strict), partial
            reasons[i] = reason if self.score_kind == "correct" else strict_reason
            raw[i] = json.dumps({name: [[*d.box, d.score] for d in ds] for name, ds in kept.items()})
        tensors = {key: torch.tensor(v, dtype=torch.float32, device=device) for key, v in values.items()}
        details: dict[str, Any] = {**tensors, "tag": [m and m["tag"] for m in metas], "reason": reasons,
                                   "raw": raw, "failure": failures}
        return RewardOutput(tensors[self.score_kind].clone(), details)

    def extra_repr(self) -> str:
        return f"score={self.score_kind!r}, thresholds={self.thresholds}, jpeg_quality={self.jpeg_quality}"


class _ColourCache:
    """One image's colour calls, memoised: GenEval's and the server's rules classify the same objects."""

    def __init__(self, colors: Any, image: Any) -> None:
        self.colors, self.image, self.cache = colors, image, {}

    def __call__(self, classname: str, objects: Sequence[Any]) -> list[str]:
        key = (classname, tuple(id(o) for o in objects))
        if key not in self.cache:
            self.cache[key] = list(self.colors(self.image, classname, objects))
        return self.cache[key]


def load(weights: Any = None, device: Any = None, dtype: Any = None, *, detector: str | Any = "mask2former",
         color_weights: Any = None, color_config: Any = None, score: str = "partial",
         thresholds: GenEvalThresholds | dict | None = None, jpeg_quality: int | None = None,
         mmdet_config: str | None = None) -> GenEvalReward:
    """Registry factory of ``geneval``.

    Args:
        weights: the detector: a Mask2Former HF folder / ``"hf:"`` spec (``None`` = Swin-S COCO instance) or,
            with ``detector="mmdet"``, the ``.pth`` checkpoint.
        device: where the detector and CLIP run.
        dtype: CLIP's precision (``None`` exact float32, ``"bf16"`` autocast); the detector runs in float32.
        detector: ``"mask2former"`` (transformers), ``"mmdet"`` (GenEval's own, needs mmdet 2.x) or an object
            with ``detect(pil_images)``.
        color_weights: the colour CLIP (``None`` = open_clip ViT-L-14 OpenAI); ``color_config`` its architecture.
        score: ``"partial"`` (flow_grpo's training reward), ``"strict"`` or ``"correct"``.
        thresholds: :class:`GenEvalThresholds` or a dict of its fields.
        jpeg_quality: JPEG round trip before detection (flow_grpo's client: 75); ``None`` = off.
        mmdet_config: the mmdet config file for ``detector="mmdet"``.
    """
    from rewardkit.precision import parse_dtype
    from rewardkit.rewards.geneval_colors import ClipColorClassifier

    parse_dtype(dtype)
    if isinstance(thresholds, dict):
        thresholds = GenEvalThresholds(**thresholds)
    if isinstance(detector, str):
        if detector not in DETECTORS:
            raise ValueError(f"geneval: detector must be one of {DETECTORS} or an object with detect(images), "
                             f"got {detector!r}")
        if detector == "mmdet":
            if weights is None or mmdet_config is None:
                raise ValueError("geneval: detector='mmdet' needs weights= (the .pth) and mmdet_config= (the config)")
            from rewardkit.rewards.geneval_detectors import MmdetDetector

            made = MmdetDetector(mmdet_config, str(weights), device)
        else:
            if mmdet_config is not None:
                raise ValueError("geneval: mmdet_config= only applies to detector='mmdet'")
            from rewardkit.rewards.geneval_detectors import Mask2FormerDetector

            made = Mask2FormerDetector(weights, device)
    else:
        made = detector
    colors = ClipColorClassifier(color_weights, device, dtype, color_config)
    return GenEvalReward(made, colors, score, thresholds or GenEvalThresholds(), jpeg_quality)
