"""Text recognisers behind the ``ocr`` reward: RapidOCR (PP-OCRv4 ONNX, default), PaddleOCR, and a VLM transcriber.

Every backend has one method, ``recognize(arrays) -> list[Recognition]``: ``arrays`` are uint8 ``(H, W, 3)``
RGB numpy images, one per row, and each :class:`Recognition` holds the recognised lines (text, confidence)
in reading order or the error that stopped the row. Backends never raise on one bad row; they raise on bad
construction (missing package, missing model file) before any image is read.

flow_grpo (``flow_grpo/ocr.py``) passes the RGB uint8 array straight to ``PaddleOCR.ocr`` (which reads an
ndarray as is, i.e. as if it were BGR); RapidOCR's loader also passes ndarrays through unchanged, so both
backends see the same channel order as upstream.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["Recognition", "RapidOcrBackend", "PaddleOcrBackend", "VlmOcrBackend", "bundled_rapidocr_models",
           "PADDLEOCR_DET_DEFAULTS", "PADDLEOCR_DROP_SCORE", "VLM_OCR_PROMPT"]

# PaddleOCR 2.x ``tools/infer/utility.py`` argparse defaults, which ``PaddleOCR(use_angle_cls=False, lang="en")``
# (flow_grpo) runs with; RapidOCR 1.4.4's own config.yaml differs (limit 736 "min", box 0.5, unclip 1.6, dilation).
PADDLEOCR_DET_DEFAULTS: dict[str, Any] = {
    "det_limit_side_len": 960, "det_limit_type": "max", "det_thresh": 0.3, "det_box_thresh": 0.6,
    "det_unclip_ratio": 1.5, "det_use_dilation": False, "det_score_mode": "fast",
}
PADDLEOCR_DROP_SCORE = 0.5  # PaddleOCR utility.py --drop_score: lines below it are dropped (RapidOCR text_score)
_RAPIDOCR_PACKAGE = "rapidocr_onnxruntime"
_DET_FILE, _REC_FILE = "ch_PP-OCRv4_det_infer.onnx", "ch_PP-OCRv4_rec_infer.onnx"  # shipped in the 1.4.4 wheel
_DEFAULT_WORKERS = 4  # rows recognised at once; each worker owns an engine (RapidOCR's detector is not re-entrant)
# Written for rewardkit (no upstream OCR-judge prompt was found to reproduce): asks for the text only.
VLM_OCR_PROMPT = ("Transcribe all the text that is visible in this image, exactly as written, keeping its "
                  "capitalisation and punctuation. Answer with the text only, one line per line of text; "
                  "if there is no text, answer with nothing.")
_VLM_MAX_NEW_TOKENS = 128  # flow_grpo's OCR targets are short phrases (dataset/ocr/*.txt)


@dataclass
class Recognition:
    """One row's OCR result.

    Attributes:
        lines: ``(text, confidence)`` per recognised line, in reading order (top-to-bottom, left-to-right).
        error: why recognition failed for this row (then ``lines`` is empty), else ``None``.
    """

    lines: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None


def _missing(package: str, extra: str) -> ImportError:
    return ImportError(f"the ocr reward's backend needs the '{package}' package; install it with "
                       f"`pip install rewardkit[{extra}]` (or `pip install {package}`)")


def bundled_rapidocr_models() -> Path:
    """The folder of the PP-OCRv4 detection / recognition ONNX files inside the installed rapidocr wheel."""
    try:
        import rapidocr_onnxruntime
    except ImportError as error:
        raise _missing("rapidocr-onnxruntime", "ocr") from error
    return Path(rapidocr_onnxruntime.__file__).parent / "models"


def _model_files(weights: str | os.PathLike | None) -> tuple[Path, Path]:
    folder = bundled_rapidocr_models() if weights is None else Path(weights)
    if not folder.is_dir():
        raise ValueError(f"ocr: weights={str(weights)!r} must be a folder holding a PP-OCR '*det*.onnx' and "
                         "'*rec*.onnx' model (or None for the models inside the rapidocr-onnxruntime wheel)")
    found = []
    for role, default in (("det", _DET_FILE), ("rec", _REC_FILE)):
        matches = [folder / default] if (folder / default).is_file() else sorted(folder.glob(f"*{role}*.onnx"))
        if len(matches) != 1:
            raise ValueError(f"ocr: expected exactly one '*{role}*.onnx' file in {folder}, found "
                             f"{[m.name for m in matches]}; keep one detection and one recognition model there")
        found.append(matches[0])
    return found[0], found[1]


class RapidOcrBackend:
    """PP-OCRv4 detection + recognition through ``rapidocr-onnxruntime`` (no angle classifier, as flow_grpo).

    Args:
        weights: a folder with one ``*det*.onnx`` and one ``*rec*.onnx`` PP-OCR model; ``None`` = the PP-OCRv4
            models inside the installed ``rapidocr-onnxruntime`` wheel (offline).
        device: ``"cuda[:i]"`` asks onnxruntime for its CUDA provider (``onnxruntime-gpu``); else CPU.
        workers: rows recognised concurrently (onnxruntime releases the GIL); each worker thread owns an engine
            whose sessions get ``cpu_count // workers`` intra-op threads.
        paddle_defaults: use PaddleOCR's detection post-processing and drop score (flow_grpo's engine) instead of
            RapidOCR's own config.
    """

    def __init__(self, weights: str | os.PathLike | None = None, device: Any = None, workers: int = _DEFAULT_WORKERS,
                 paddle_defaults: bool = True) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"ocr: workers must be an int >= 1, got {workers!r}")
        self.det_path, self.rec_path = _model_files(weights)
        self.use_cuda = str(device or "cpu").startswith("cuda")
        self.workers = workers
        self.paddle_defaults = paddle_defaults
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:  # onnxruntime sessions do not pickle: rebuilt lazily
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _engine(self) -> Any:
        engine = getattr(self._local, "engine", None)
        if engine is None:
            from rapidocr_onnxruntime import RapidOCR

            threads = max(1, (os.cpu_count() or 1) // self.workers)
            options: dict[str, Any] = dict(PADDLEOCR_DET_DEFAULTS) if self.paddle_defaults else {}
            if self.paddle_defaults:
                options["text_score"] = PADDLEOCR_DROP_SCORE
            engine = RapidOCR(det_model_path=str(self.det_path), rec_model_path=str(self.rec_path), use_cls=False,
                              det_use_cuda=self.use_cuda, rec_use_cuda=self.use_cuda,
                              intra_op_num_threads=threads, inter_op_num_threads=1, **options)
            self._local.engine = engine
        return engine

    def _one(self, array: np.ndarray) -> Recognition:
        try:
            result, _ = self._engine()(array, use_cls=False)
        except Exception as error:  # one unreadable row must not lose the batch: the row records why
            return Recognition(error=f"{type(error).__name__}: {error}")
        return Recognition([(str(text), float(conf)) for _, text, conf in (result or [])])

    def recognize(self, arrays: Sequence[np.ndarray]) -> list[Recognition]:
        """OCR every uint8 ``(H, W, 3)`` array; rows run on ``workers`` threads, results in input order."""
        if self.workers == 1 or len(arrays) == 1:
            return [self._one(a) for a in arrays]
        with ThreadPoolExecutor(min(self.workers, len(arrays))) as pool:
            return list(pool.map(self._one, arrays))

    def __repr__(self) -> str:
        return f"RapidOcrBackend(det={self.det_path.name!r}, rec={self.rec_path.name!r}, workers={self.workers})"


class PaddleOcrBackend:
    """flow_grpo's engine: ``PaddleOCR(use_angle_cls=False, lang="en")``, one image at a time (needs paddleocr 2.x)."""

    def __init__(self, device: Any = None) -> None:
        try:
            from paddleocr import PaddleOCR
        except ImportError as error:
            raise _missing("paddleocr", "ocr") from error
        self.use_gpu = str(device or "cpu").startswith("cuda")
        self.ocr = PaddleOCR(use_angle_cls=False, lang="en", use_gpu=self.use_gpu, show_log=False)

    def recognize(self, arrays: Sequence[np.ndarray]) -> list[Recognition]:
        rows = []
        for array in arrays:
            try:
                result = self.ocr.ocr(array, cls=False)
            except Exception as error:  # as flow_grpo's try/except: the row records why
                rows.append(Recognition(error=f"{type(error).__name__}: {error}"))
                continue
            rows.append(Recognition([(str(r[1][0]), float(r[1][1])) for r in (result[0] or [])]))
        return rows


class VlmOcrBackend:
    """A VLM transcribes each image (one greedy request per row, batched by the generation backend).

    Args:
        backend: a ``rewardkit.vlm`` ``GenerationBackend`` (local ``TransformersBackend`` or served).
        prompt: the transcription instruction (default :data:`VLM_OCR_PROMPT`, written for rewardkit).
        max_new_tokens: generation cap.

    Each non-empty line of an answer becomes one line of confidence 1.0 (VLMs report none).
    """

    def __init__(self, backend: Any, prompt: str = VLM_OCR_PROMPT, max_new_tokens: int = _VLM_MAX_NEW_TOKENS) -> None:
        from rewardkit.vlm.requests import GenerationSettings

        if not callable(getattr(backend, "generate", None)):
            raise TypeError(f"ocr: backend must have a generate(requests) method, got {type(backend).__name__}")
        self.backend, self.prompt = backend, prompt
        self.settings = GenerationSettings(max_new_tokens=max_new_tokens, enable_thinking=False)

    def recognize(self, arrays: Sequence[np.ndarray]) -> list[Recognition]:
        from PIL import Image

        from rewardkit.vlm.requests import ChatRequest

        requests = [ChatRequest([{"role": "user", "content": [{"type": "image", "image": Image.fromarray(a)},
                                                              {"type": "text", "text": self.prompt}]}], self.settings)
                    for a in arrays]
        completions = self.backend.generate(requests)
        if len(completions) != len(arrays):
            raise RuntimeError(f"ocr: the VLM backend returned {len(completions)} answers for {len(arrays)} images")
        return [Recognition(error=f"generation failed: {c.error}") if c.text is None
                else Recognition([(line.strip(), 1.0) for line in c.text.splitlines() if line.strip()])
                for c in completions]
