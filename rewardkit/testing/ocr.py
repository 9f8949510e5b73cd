"""The ``ocr`` reward's "tiny" checkpoint: the REAL PP-OCRv4 models that ship inside ``rapidocr-onnxruntime``.

They are small (det 4.7 MB, rec 10.9 MB), offline and fast on a CPU, so unlike the other families no random
model is needed: ``tiny_ocr`` links (or copies) the wheel's two ONNX files into a folder in the layout that
``rk.load("ocr", weights=folder)`` reads, and the real loading code reads it. Its scores are real OCR scores.
``render_text`` draws text with a real font (DejaVu Sans) for tests that need readable images.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from rewardkit.testing._common import check_layout

__all__ = ["tiny_ocr", "render_text", "find_dejavu_font"]

_LAYOUTS = ("upstream",)  # the wheel's own file names
_FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",  # Debian/Ubuntu fonts-dejavu-core
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",  # Fedora
)


def tiny_ocr(root: str | Path, layout: str = "upstream") -> dict[str, Any]:
    """Link the wheel's PP-OCRv4 det/rec ONNX files into ``root``; returns ``rk.load("ocr", **kwargs)`` kwargs."""
    from rewardkit.rewards.ocr_backends import _DET_FILE, _REC_FILE, bundled_rapidocr_models

    check_layout(layout, _LAYOUTS)
    folder = Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    for name in (_DET_FILE, _REC_FILE):
        target = folder / name
        if not target.exists():
            try:
                os.symlink(bundled_rapidocr_models() / name, target)
            except OSError:  # filesystems without symlinks
                shutil.copyfile(bundled_rapidocr_models() / name, target)
    return {"weights": str(folder)}


def find_dejavu_font() -> Path:
    """A DejaVu Sans TrueType file on this machine (system fonts, then matplotlib's copy)."""
    for candidate in _FONT_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    try:
        import matplotlib

        bundled = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if bundled.is_file():
            return bundled
    except ImportError:
        pass
    raise FileNotFoundError("no DejaVuSans.ttf found; install fonts-dejavu-core (apt) or matplotlib (pip)")


def render_text(text: str, size: tuple[int, int] = (512, 256), font_size: int = 40,
                origin: tuple[int, int] = (20, 100)) -> np.ndarray:
    """Black ``text`` on white, ``size`` = (W, H) pixels, DejaVu Sans: a uint8 ``(H, W, 3)`` RGB array."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", size, "white")
    font = ImageFont.truetype(str(find_dejavu_font()), font_size)
    ImageDraw.Draw(image).text(origin, text, fill="black", font=font)
    return np.asarray(image)
