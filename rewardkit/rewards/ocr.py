"""``ocr``: Flow-GRPO's text-rendering reward (Liu et al. 2025, "Flow-GRPO"), 1 - normalised edit distance.

Upstream: ``yifan123/flow_grpo`` ``flow_grpo/ocr.py`` (``OcrScorer.__call__``) and ``flow_grpo/rewards.py``
(``ocr_score``). Per row:

1. the target is ``prompt.split('"')[1]``: the text after the first double quote, up to the next one (a prompt
   with one quote gives the rest of the prompt, as upstream);
2. the image is quantised as ``(x * 255).round().clamp(0, 255)`` to uint8 RGB and OCR'd; the recognised lines
   with confidence > 0 are joined with no separator, in reading order;
3. both strings lose their spaces (``" "`` only) and are lower-cased;
4. distance = 0 if the target is a substring of the recognised text, else ``Levenshtein.distance(recognised,
   target)``, capped at ``len(target)``; reward = ``1 - distance / len(target)`` in ``[0, 1]``.

Where upstream deviates by accident, rewardkit keeps the row and says why in ``details``: an OCR exception
scores 0 as upstream (``on_error="zero"``, the reason in ``details["error"]``) or NaN (``on_error="nan"``); a
prompt without a double quote (upstream: ``IndexError`` for the batch) and an empty target (upstream:
``ZeroDivisionError``) are NaN with the reason in ``details["failure"]``; OCR is not run for those rows.

Backends (``backend=``; :mod:`rewardkit.rewards.ocr_backends`): ``"rapidocr"`` (default; the PP-OCRv4 ONNX
models inside the ``rapidocr-onnxruntime`` wheel, offline, with PaddleOCR's detection defaults), ``"paddleocr"``
(flow_grpo's engine, when installed) and ``"vlm"`` (a Qwen-VL model transcribes; ``weights=`` / ``server=``
as for the judges). Not differentiable.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from rewardkit.precision import parse_dtype
from rewardkit.protocols import Reward, RewardOutput

__all__ = ["OcrReward", "load", "quoted_target", "normalize_text", "ocr_distance", "ocr_reward_value",
           "BACKENDS", "DEFAULT_VLM_WEIGHTS"]

BACKENDS = ("rapidocr", "paddleocr", "vlm")
ON_ERROR = ("zero", "nan")
QUOTE = '"'  # flow_grpo ocr.py: prompt.split('"')[1]
DEFAULT_VLM_WEIGHTS = "hf:Qwen/Qwen2.5-VL-7B-Instruct"  # a Qwen-VL transcriber; any chat VLM folder works
_UINT8_MAX = 255
_NO_QUOTE = "no double-quoted text in the prompt (the ocr reward reads its target between double quotes)"
_EMPTY_TARGET = "the quoted target is empty once spaces are removed"


def quoted_target(prompt: str) -> str | None:
    """flow_grpo's target, ``prompt.split('"')[1]``; ``None`` when the prompt holds no double quote."""
    parts = prompt.split(QUOTE)
    return parts[1] if len(parts) > 1 else None


def normalize_text(text: str) -> str:
    """flow_grpo's normalisation: drop ``" "`` (spaces only, not tabs or newlines) and lower-case."""
    return text.replace(" ", "").lower()


def ocr_distance(recognised: str, target: str) -> int:
    """flow_grpo's capped distance on normalised strings: 0 if ``target in recognised``, else the Levenshtein
    distance, at most ``len(target)``."""
    from Levenshtein import distance

    if target in recognised:
        return 0
    return min(distance(recognised, target), len(target))


def ocr_reward_value(recognised: str, target: str) -> float:
    """``1 - distance / len(target)`` on the normalised strings, in ``[0, 1]``.

    Raises:
        ValueError: the target is empty after normalisation (upstream divides by zero).
    """
    recognised, target = normalize_text(recognised), normalize_text(target)
    if not target:
        raise ValueError(f"ocr: {_EMPTY_TARGET}; quote at least one non-space character")
    return 1.0 - ocr_distance(recognised, target) / len(target)


def _to_arrays(images: torch.Tensor) -> list[np.ndarray]:
    """Float ``(B, 3, H, W)`` in ``[0, 1]`` -> ``B`` uint8 ``(H, W, 3)`` arrays, as flow_grpo's ``ocr_score``."""
    pixels = (images.detach().to("cpu", torch.float32) * _UINT8_MAX).round().clamp(0, _UINT8_MAX).to(torch.uint8)
    return list(pixels.permute(0, 2, 3, 1).contiguous().numpy())


class OcrReward(Reward):
    """Flow-GRPO's OCR reward in ``[0, 1]`` (see the module docstring).

    ``evaluate`` returns ``details``: ``"raw"`` (the joined recognised text per row, ``None`` where OCR did not
    run), ``"target"`` (the quoted text or ``None``), ``"failure"`` (why a row is NaN, else ``None``),
    ``"error"`` (the OCR exception of a row, else ``None``) and ``"distance"`` (float32 ``(B,)``, NaN where
    not computed).

    Args:
        backend: an object with ``recognize(arrays) -> list[Recognition]`` (``rewardkit.rewards.ocr_backends``).
        on_error: ``"zero"`` (upstream) or ``"nan"`` for rows whose OCR raised.
    """

    name = "ocr"
    higher_is_better = True
    differentiable = False
    requires_prompt = True
    context_keys = frozenset({"metadata"})

    def __init__(self, backend: Any, on_error: str = "zero") -> None:
        super().__init__()
        if not callable(getattr(backend, "recognize", None)):
            raise TypeError(f"ocr: backend must have recognize(arrays), got {type(backend).__name__}")
        if on_error not in ON_ERROR:
            raise ValueError(f"ocr: on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.backend, self.on_error = backend, on_error
        self.freeze()

    def score(self, images: torch.Tensor, prompts: list[str] | None, *, metadata: Any = None,
              **context: Any) -> RewardOutput:
        # metadata= is accepted and ignored, as flow_grpo's ocr_score(images, prompts, metadata) does, so that
        # ocr composes with rewards that need it (geneval)
        if context:
            raise TypeError(f"ocr: unexpected keyword arguments {sorted(context)}; it takes images, prompts "
                            "(and an ignored metadata=)")
        return self.score_arrays(_to_arrays(images), prompts or [], images.device)

    def evaluate_pil(self, images: Any, prompts: str | list[str] | None = None, *, metadata: Any = None) -> RewardOutput:
        """Score PIL images or files at their own sizes (no float round trip; the CLI's path).

        Grayscale, palette and RGBA inputs become RGB by ``rewardkit.image_io``'s rules (alpha dropped).
        """
        from rewardkit.errors import check_prompts
        from rewardkit.image_io import as_rgb_images

        items = images if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ValueError("ocr: expected at least one image, got an empty list")
        arrays = [np.asarray(image) for image in as_rgb_images(items)]
        prompt_list = check_prompts(self.name, prompts, len(arrays), self.requires_prompt)
        return self.score_arrays(arrays, prompt_list or [], torch.device("cpu"))

    def score_arrays(self, arrays: Sequence[np.ndarray], prompts: Sequence[str], device: torch.device) -> RewardOutput:
        """Score uint8 ``(H, W, 3)`` RGB arrays against their prompts; OCR runs only for rows with a target."""
        targets = [quoted_target(p) for p in prompts]
        failures: list[str | None] = [_NO_QUOTE if t is None else _EMPTY_TARGET if not normalize_text(t) else None
                                      for t in targets]
        todo = [i for i, failure in enumerate(failures) if failure is None]
        found = dict(zip(todo, self.backend.recognize([arrays[i] for i in todo]))) if todo else {}
        scores, distances = [math.nan] * len(arrays), [math.nan] * len(arrays)
        raw: list[str | None] = [None] * len(arrays)
        errors: list[str | None] = [None] * len(arrays)
        for i, recognition in found.items():
            if recognition.error is not None:
                errors[i] = recognition.error
                scores[i] = 0.0 if self.on_error == "zero" else math.nan
                failures[i] = None if self.on_error == "zero" else f"OCR failed: {recognition.error}"
                continue
            # flow_grpo: ''.join(text if confidence > 0 else '' ...) over PaddleOCR's lines
            raw[i] = "".join(text for text, confidence in recognition.lines if confidence > 0)
            target = normalize_text(targets[i])
            distances[i] = float(ocr_distance(normalize_text(raw[i]), target))
            scores[i] = 1.0 - distances[i] / len(target)
        details = {"raw": raw, "target": targets, "failure": failures, "error": errors,
                   "distance": torch.tensor(distances, dtype=torch.float32, device=device)}
        return RewardOutput(torch.tensor(scores, dtype=torch.float32, device=device), details)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, on_error={self.on_error!r}"


def load(weights: Any = None, device: Any = None, dtype: Any = None, backend: str | Any = "rapidocr",
         on_error: str = "zero", workers: int | None = None, paddle_defaults: bool = True,
         server: str | None = None, **options: Any) -> OcrReward:
    """Registry factory of ``ocr``.

    Args:
        weights: ``rapidocr``: a folder with one ``*det*.onnx`` and one ``*rec*.onnx`` (``None`` = the PP-OCRv4
            models in the rapidocr-onnxruntime wheel); ``vlm``: a local HF folder / ``"hf:"`` spec (``None`` =
            :data:`DEFAULT_VLM_WEIGHTS`); ``paddleocr``: must be ``None`` (PaddleOCR manages its models).
        device: ``"cuda"`` runs onnxruntime / Paddle / the VLM on the GPU; scores come back on the images' device.
        dtype: validated; the OCR engines run in float32 whatever it is (the VLM backend uses it).
        backend: ``"rapidocr"``, ``"paddleocr"``, ``"vlm"`` or an object with ``recognize(arrays)``.
        on_error: ``"zero"`` (upstream) or ``"nan"`` for rows whose OCR raised.
        workers: ``rapidocr``: rows recognised concurrently (default 4).
        paddle_defaults: ``rapidocr``: PaddleOCR's detection defaults and drop score (default True).
        server: ``vlm``: an OpenAI-compatible ``/v1`` URL instead of local weights.
        **options: ``vlm``: ``prompt``, ``max_new_tokens`` and the ``rewardkit.vlm.build.build_backend`` options.
    """
    parse_dtype(dtype)
    if not isinstance(backend, str):
        return OcrReward(backend, on_error)
    if backend not in BACKENDS:
        raise ValueError(f"ocr: backend must be one of {BACKENDS} or an object with recognize(arrays), got {backend!r}")
    vlm_only = sorted(set(options) | ({"server"} if server else set()))
    if backend != "vlm" and vlm_only:
        raise TypeError(f"ocr: {vlm_only} only apply to backend='vlm'")
    if backend != "rapidocr" and workers is not None:
        raise TypeError("ocr: workers= only applies to backend='rapidocr'")
    if backend == "rapidocr":
        from rewardkit.rewards.ocr_backends import RapidOcrBackend

        return OcrReward(RapidOcrBackend(weights, device, 4 if workers is None else workers, paddle_defaults), on_error)
    if backend == "paddleocr":
        if weights is not None:
            raise ValueError("ocr: backend='paddleocr' loads PaddleOCR's own English models; drop weights=")
        from rewardkit.rewards.ocr_backends import PaddleOcrBackend

        return OcrReward(PaddleOcrBackend(device), on_error)
    from rewardkit.rewards.ocr_backends import VlmOcrBackend
    from rewardkit.vlm.build import build_backend

    judge = {k: options.pop(k) for k in ("prompt", "max_new_tokens") if k in options}
    if server is None:
        options.update(device=device, dtype=dtype)
    made = build_backend("ocr", default_weights=DEFAULT_VLM_WEIGHTS, weights=weights, server=server, **options)
    return OcrReward(VlmOcrBackend(made, **judge), on_error)
