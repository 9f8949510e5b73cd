"""Image files and PIL images -> 8-bit RGB PIL images: folder listing, decoding, and the mode-conversion rules.

Nothing is guessed: every PIL mode becomes 8-bit RGB by a stated rule (:func:`load_image`), and a file that
cannot be decoded raises :class:`ImageLoadError` naming it. ``rewardkit.image_io`` turns the results into
tensors and re-exports every public name here, so ``from rewardkit.image_io import load_image`` keeps working.
"""

from __future__ import annotations

import os
import pathlib
import struct
import zlib
from typing import Any, Literal, Sequence, Union

import numpy as np
from PIL import Image, ImageOps

__all__ = ["IMAGE_EXTENSIONS", "ImageLoadError", "list_images", "load_image", "load_images", "as_rgb", "as_rgb_images"]

# Matched case-insensitively.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif",
                                              ".ppm", ".pgm"})

AlphaPolicy = Literal["drop", "white", "black", "error"]
PathLike = Union[str, os.PathLike]

_ALPHA_POLICIES = ("drop", "white", "black", "error")
_UINT8_MAX = 255  # 8-bit full scale
_UINT16_MAX = 65535  # 16-bit full scale
_BACKGROUND = {"white": _UINT8_MAX, "black": 0}
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa"})
_COLOR_KEY_MODES = frozenset({"L", "RGB", "P"})  # modes whose "transparency" info is a colour key (PNG tRNS / GIF)
_PIL_CONVERTED_MODES = frozenset({"CMYK", "YCbCr", "LAB", "HSV", "RGBX"})
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)


class ImageLoadError(ValueError):
    """An image could not be decoded or converted to 8-bit RGB; the message names the file and the cause."""


def _check_alpha(alpha: str) -> None:
    if alpha not in _ALPHA_POLICIES:
        raise ValueError(f"alpha must be one of {_ALPHA_POLICIES}, got {alpha!r}")


def list_images(folder: PathLike, *, recursive: bool = False) -> list[pathlib.Path]:
    """List a folder's image files (extension in :data:`IMAGE_EXTENSIONS`, any case), sorted by relative path.

    Nothing else is filtered out: a broken file is listed, and :func:`load_image` reports it.

    Args:
        folder: The folder to list.
        recursive: Also list the images of every sub-folder.

    Returns:
        At least one path (``folder`` joined with the relative path), sorted by the relative POSIX path string.

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        NotADirectoryError: ``folder`` is a file.
        ValueError: the folder holds no image.
    """
    root = pathlib.Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist; check the path")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is a file, not a folder; use load_image() for a single file")
    candidates = root.rglob("*") if recursive else root.iterdir()
    found = [p for p in candidates if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    if not found:
        hint = "" if recursive else "; pass recursive=True to search sub-folders"
        raise ValueError(f"no image files in folder {root} (accepted extensions, any case: "
                         f"{', '.join(sorted(IMAGE_EXTENSIONS))}){hint}")
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def load_image(path: PathLike, *, alpha: AlphaPolicy = "drop") -> Image.Image:
    """Load one image file as an 8-bit RGB PIL image, with its EXIF orientation applied.

    The file is decoded completely here, so a corrupt or truncated file raises :class:`ImageLoadError`
    at this point (``ImageFile.LOAD_TRUNCATED_IMAGES`` is left as it is). Multi-frame files (GIF, TIFF)
    give their first frame. Modes are converted deliberately:

    * ``RGB``: as is. ``L`` and ``1``: gray replicated to R, G, B. ``P``: its palette colours.
      ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``: PIL's ``convert("RGB")``.
    * Alpha (``RGBA``, ``LA``, ``PA``, ``RGBa``, and ``L``/``RGB``/``P`` with a transparency colour key):
      ``alpha="drop"`` discards it exactly as PIL's ``convert("RGB")`` does, like upstream CLIP / HPS /
      ImageReward code, so default scores equal upstream scores. ``"white"`` / ``"black"`` composite over
      that background: ``round((c * a + bg * (255 - a)) / 255)`` per channel. ``"error"`` raises when any
      pixel is not fully opaque (a fully opaque alpha channel carries no decision and is accepted).
    * 16-bit gray (``I;16``, ``I;16B``, ...): ``round(v * 255 / 65535)`` (PIL's ``convert`` would clip
      every value above 255 to white). ``I`` (32-bit int): values in ``[0, 65535]`` are taken as 16-bit
      and scaled the same way; other values raise, because their range is unknown. ``F`` (32-bit float):
      values must be finite and in ``[0, 1]`` and become ``round(v * 255)``; others raise.
    * 16-bit RGB / RGBA / gray+alpha PNGs: Pillow 13 decodes them to ``RGB`` / ``RGBA`` itself, keeping
      the high byte of each sample (``v >> 8``). That is kept: it is what upstream code sees, and it
      differs from ``round(v * 255 / 65535)`` by at most 1 level (1/255).

    Args:
        path: The image file.
        alpha: What to do with transparency (see above).

    Returns:
        An ``RGB`` PIL image, 8 bits per channel, of the displayed (EXIF-oriented) size.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ImageLoadError: the file cannot be decoded, or its pixels cannot be converted by the rules above.
    """
    _check_alpha(alpha)
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist or is not a file")
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)  # a loaded copy, valid after the file is closed
    except _DECODE_ERRORS as exc:
        raise ImageLoadError(f"cannot load image file {path}: {type(exc).__name__}: {exc}; the file is corrupt, "
                             "truncated or not an image: re-export it or remove it from the input") from exc
    return _to_rgb(image, alpha, f"image file {path}")


def load_images(paths: Sequence[PathLike], *, alpha: AlphaPolicy = "drop") -> list[Image.Image]:
    """Load several image files with :func:`load_image` (same rules), in the order given.

    Raises:
        TypeError: ``paths`` is a single path rather than a sequence of paths.
    """
    if isinstance(paths, (str, os.PathLike)):
        raise TypeError(f"load_images expects a list of paths, got the single path {paths!r}; use "
                        "load_image(path), or load_images(list_images(folder)) for a folder")
    return [load_image(path, alpha=alpha) for path in paths]


def as_rgb(image: Image.Image, *, alpha: AlphaPolicy = "drop") -> Image.Image:
    """An in-memory PIL image of any supported mode as 8-bit RGB, by the rules of :func:`load_image`."""
    _check_alpha(alpha)
    return _to_rgb(image, alpha, "PIL image")


def as_rgb_images(items: Sequence[Any], *, alpha: AlphaPolicy = "drop") -> list[Image.Image]:
    """PIL images and/or image paths (sizes may differ) -> 8-bit RGB PIL images, in order."""
    return [load_image(x, alpha=alpha) if isinstance(x, (str, os.PathLike)) else as_rgb(x, alpha=alpha) for x in items]


def _to_rgb(image: Image.Image, alpha: str, source: str) -> Image.Image:
    """Convert a loaded PIL image of any supported mode to 8-bit RGB by the rules of :func:`load_image`."""
    if image.width == 0 or image.height == 0:
        raise ImageLoadError(f"{source} is empty (size {image.size})")
    mode = image.mode
    has_key = mode in _COLOR_KEY_MODES and "transparency" in image.info
    if mode == "RGB" and not has_key:
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_rgb(image, source)
    if mode in _ALPHA_MODES or has_key:
        return _apply_alpha(image, alpha, source)
    if mode in ("L", "1", "P") or mode in _PIL_CONVERTED_MODES:
        return image.convert("RGB")
    raise ImageLoadError(f"{source} has PIL mode {mode!r}, which rewardkit does not convert; convert it to 'RGB' "
                         "yourself (e.g. image.convert('RGB') if PIL's conversion is right for your data)")


def _apply_alpha(image: Image.Image, alpha: str, source: str) -> Image.Image:
    """Resolve transparency by the ``alpha`` policy; returns 8-bit RGB."""
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA")  # same colours as P -> RGB, without PIL's palette-transparency warning
    if alpha == "drop":
        return image.convert("RGB")
    rgba = np.asarray(image.convert("RGBA"))
    opacity = rgba[..., 3:].astype(np.uint32)
    if alpha == "error":
        if (opacity < _UINT8_MAX).any():
            raise ImageLoadError(f"{source} (mode {mode}) has transparent pixels and alpha='error'; pass "
                                 "alpha='drop' (upstream behaviour), 'white' or 'black' to choose how to flatten it")
        return image.convert("RGB")
    background = _BACKGROUND[alpha]
    mixed = rgba[..., :3].astype(np.uint32) * opacity + background * (_UINT8_MAX - opacity)
    rounded = (mixed + _UINT8_MAX // 2) // _UINT8_MAX  # round to nearest; x/255 never ends in exactly .5
    return Image.fromarray(rounded.astype(np.uint8))


def _high_depth_to_rgb(image: Image.Image, source: str) -> Image.Image:
    """Scale a 16-bit / 32-bit int / float gray image to 8 bits explicitly (never by PIL's clipping)."""
    values = np.asarray(image)
    if image.mode == "F":
        if not np.isfinite(values).all() or values.min() < 0.0 or values.max() > 1.0:
            raise ImageLoadError(f"{source} is a float ('F') image with values in [{np.nanmin(values):.4g}, "
                                 f"{np.nanmax(values):.4g}]; only finite values in [0, 1] are accepted: rescale it, "
                                 "or use to_tensor(np.asarray(image), layout='HWC'...) with its value_range")
        levels = np.floor(values.astype(np.float64) * _UINT8_MAX + 0.5)
    else:
        wide = values.astype(np.int64)
        low, high = int(wide.min()), int(wide.max())
        if low < 0 or high > _UINT16_MAX:
            raise ImageLoadError(f"{source} is a 32-bit integer ('I') image with values in [{low}, {high}], outside "
                                 f"16-bit [0, {_UINT16_MAX}], so its range is unknown; use to_tensor(np.asarray("
                                 "image)[..., None], layout='HWC', value_range=(low, high)) with the range it means")
        # round(v * 255 / 65535) in exact integer arithmetic (floor(x + 1/2)).
        levels = (2 * _UINT8_MAX * wide + _UINT16_MAX) // (2 * _UINT16_MAX)
    return Image.fromarray(levels.astype(np.uint8)).convert("RGB")
