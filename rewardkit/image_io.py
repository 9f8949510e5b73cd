"""Edge conversion: files, folders, PIL images, numpy arrays, tensors -> float32 ``(B, 3, H, W)`` in ``[0, 1]``.

This module (with ``cli.py``) is the only place PIL appears. Nothing is guessed: array layouts and value ranges
are stated by the caller, out-of-range values raise (never clipped), images of different sizes raise (never
resized), and every PIL mode becomes 8-bit RGB by a stated rule (:func:`load_image`).
"""

from __future__ import annotations

import numbers
import os
import pathlib
import struct
import zlib
from typing import Any, Literal, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from rewardkit.errors import check_not_meta, describe

__all__ = ["IMAGE_EXTENSIONS", "ImageLoadError", "list_images", "load_image", "load_images", "pil_to_tensor",
           "to_tensor", "as_rgb", "as_rgb_images"]

# Matched case-insensitively.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif",
                                              ".ppm", ".pgm"})

AlphaPolicy = Literal["drop", "white", "black", "error"]
Layout = Literal["NCHW", "NHWC", "CHW", "HWC"]
PathLike = Union[str, os.PathLike]

_ALPHA_POLICIES = ("drop", "white", "black", "error")
_LAYOUTS = ("NCHW", "NHWC", "CHW", "HWC")
_UINT8_MAX = 255  # 8-bit full scale
_UINT16_MAX = 65535  # 16-bit full scale
_BACKGROUND = {"white": _UINT8_MAX, "black": 0}
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa"})
_COLOR_KEY_MODES = frozenset({"L", "RGB", "P"})  # modes whose "transparency" info is a colour key (PNG tRNS / GIF)
_PIL_CONVERTED_MODES = frozenset({"CMYK", "YCbCr", "LAB", "HSV", "RGBX"})
_DTYPE_DEFAULT_RANGES = {torch.uint8: (0, _UINT8_MAX), torch.uint16: (0, _UINT16_MAX)}
_TORCH_WIDEN = {torch.uint16: torch.int32, torch.uint32: torch.int64}  # lossless; few ops support uint16/32
_ARRAY_DTYPES = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                           torch.float16, torch.bfloat16, torch.float32, torch.float64})
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)
_ACCEPTED = ("a PIL image, a path to an image file or folder, a list/tuple of PIL images or paths, "
             "a numpy array or a torch tensor (with layout= and value_range=)")


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


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """Convert one 8-bit RGB PIL image to a float32 ``(3, H, W)`` tensor in ``[0, 1]`` (``uint8 / 255``).

    Raises:
        TypeError: ``image`` is not a PIL image.
        ValueError: ``image`` is not in mode ``RGB``.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"pil_to_tensor expects a PIL image, got {describe(image)}; use to_tensor() for other inputs")
    if image.mode != "RGB":
        raise ValueError(f"pil_to_tensor expects an 'RGB' image, got mode {image.mode!r}; load files with "
                         "rewardkit.image_io.load_image() or use to_tensor(), which convert every mode by stated rules")
    return _uint8_hwc_to_tensor(np.array(image)[None])[0]


def _uint8_hwc_to_tensor(batch: np.ndarray) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 -> float32 ``(B, 3, H, W)`` in ``[0, 1]``."""
    return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous().to(torch.float32).div_(_UINT8_MAX)


def to_tensor(x: Any, *, layout: Layout | None = None, value_range: tuple[float, float] | None = None,
              alpha: AlphaPolicy = "drop") -> torch.Tensor:
    """Convert images at the edge of the library to the canonical float32 ``(B, 3, H, W)`` in ``[0, 1]``.

    Accepted inputs:

    * A PIL image, or a list/tuple of PIL images and/or paths: modes are converted as in :func:`load_image`
      (EXIF orientation is applied when loading files, not to in-memory images).
    * A path (``str`` / ``os.PathLike``) to an image file, or to a folder (its :func:`list_images`).
    * A numpy array or torch tensor: ``layout`` (``"NCHW"``, ``"NHWC"``, ``"CHW"``, ``"HWC"``) is always
      required. ``value_range`` is required for float and for signed / 32-bit integer dtypes; it defaults to
      ``(0, 255)`` for uint8 and ``(0, 65535)`` for uint16, and any range given for an integer dtype is used
      as given. Values outside the range (or NaN/inf) raise. One channel is gray and is replicated to RGB;
      four channels raise. Float tensors keep their autograd graph: the result is differentiable.

    Args:
        x: The images.
        layout: Axis order of an array / tensor input; only for arrays and tensors.
        value_range: ``(low, high)`` mapped to ``(0, 1)``; only for arrays and tensors.
        alpha: Transparency policy for PIL images and files (see :func:`load_image`).

    Returns:
        float32 ``(B, 3, H, W)`` in ``[0, 1]``; on the input's device for tensors, else on CPU.

    Raises:
        TypeError: ``x`` is none of the accepted inputs, or has an unsupported dtype.
        ValueError: missing / wrong ``layout`` or ``value_range``, values out of range, a channel count
            other than 1 or 3, an empty input, or PIL images / files of different sizes.
        ImageLoadError: a file cannot be loaded or converted.
    """
    _check_alpha(alpha)
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return _array_to_tensor(x, layout, value_range)
    if isinstance(x, (Image.Image, str, os.PathLike, list, tuple)) and (layout, value_range) != (None, None):
        raise ValueError("layout= and value_range= describe arrays and tensors only; PIL images and image files "
                         "are converted to 8-bit RGB by their mode: drop these arguments")
    if isinstance(x, (str, os.PathLike)):
        path = pathlib.Path(x)
        x = list_images(path) if path.is_dir() else [path]
    if isinstance(x, Image.Image):
        x = [x]
    if not isinstance(x, (list, tuple)):
        raise TypeError(f"to_tensor cannot convert {describe(x)}; it accepts {_ACCEPTED}")
    if not x:
        raise ValueError("to_tensor got an empty list of images; give at least one image")
    images = [_item_to_rgb(item, index, alpha) for index, item in enumerate(x)]
    sizes = [image.size for image in images]
    if len(set(sizes)) > 1:
        other = next(i for i, size in enumerate(sizes) if size != sizes[0])
        raise ValueError(f"images must all have the same size to form one batch: item 0 is {sizes[0][0]}x"
                         f"{sizes[0][1]} (W x H) but item {other} is {sizes[other][0]}x{sizes[other][1]}; score them "
                         "one at a time, or resize / crop them yourself first (rewardkit never resizes silently)")
    return _uint8_hwc_to_tensor(np.stack([np.asarray(image) for image in images]))


def _item_to_rgb(item: Any, index: int, alpha: str) -> Image.Image:
    """One element of a list input -> 8-bit RGB PIL image."""
    if isinstance(item, (str, os.PathLike)):
        return load_image(item, alpha=alpha)
    if not isinstance(item, Image.Image):
        hint = "; stack arrays yourself (torch.stack / np.stack) and pass layout=" if hasattr(item, "shape") else ""
        raise TypeError(f"to_tensor: item {index} of the list is {describe(item)}; it accepts {_ACCEPTED}{hint}")
    source = f"PIL image (item {index})"
    try:
        item.load()
    except _DECODE_ERRORS as exc:
        raise ImageLoadError(f"cannot decode {source}: {type(exc).__name__}: {exc}") from exc
    return _to_rgb(item, alpha, source)


def _resolve_range(dtype: torch.dtype, value_range: Any) -> tuple[float, float]:
    """The ``(low, high)`` source range: stated by the caller, or by a uint8 / uint16 dtype."""
    if value_range is None and dtype in _DTYPE_DEFAULT_RANGES:
        return _DTYPE_DEFAULT_RANGES[dtype]
    if value_range is None:
        raise ValueError(f"value_range is required for {dtype} input (it is never guessed): pass e.g. "
                         "value_range=(0, 1), (-1, 1) or (0, 255) to state what the values mean")
    if (
        not isinstance(value_range, (tuple, list))
        or len(value_range) != 2
        or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value_range)
        or not all(np.isfinite(value_range))
        or not value_range[0] < value_range[1]
    ):
        raise ValueError(f"value_range must be (low, high) with finite numbers and low < high, got {value_range!r}")
    return value_range[0], value_range[1]


def _as_torch(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Numpy -> CPU tensor in native byte order (tensors are kept as they are); checks the dtype."""
    if isinstance(x, np.ndarray) and x.dtype.kind in "uif":
        native = np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("="))
        x = torch.from_numpy(native if native.flags.writeable else native.copy())
    if not isinstance(x, torch.Tensor) or (x.dtype not in _ARRAY_DTYPES and x.dtype not in _TORCH_WIDEN):
        raise TypeError(f"to_tensor cannot convert {describe(x)}; use uint8, uint16, a signed integer or a float dtype")
    check_not_meta("to_tensor", x)  # before the range check, whose host copy fails without a useful message
    return x


def _array_to_tensor(x: torch.Tensor | np.ndarray, layout: Any, value_range: Any) -> torch.Tensor:
    """Numpy array / tensor in a stated layout and value range -> float32 ``(B, 3, H, W)`` in ``[0, 1]``."""
    if layout not in _LAYOUTS:
        raise ValueError(f"layout is required for arrays and tensors and is never guessed: pass layout= one of "
                         f"{', '.join(repr(v) for v in _LAYOUTS)}; got layout={layout!r} for {describe(x)}")
    if x.ndim != len(layout):
        raise ValueError(f"layout {layout!r} needs a {len(layout)}-D input, got {describe(x)}")
    tensor = _as_torch(x)
    dtype = tensor.dtype
    low, high = _resolve_range(dtype, value_range)
    tensor = tensor.to(_TORCH_WIDEN.get(dtype, dtype))
    if len(layout) == 3:
        tensor, layout = tensor.unsqueeze(0), "N" + layout
    if layout == "NHWC":
        tensor = tensor.permute(0, 3, 1, 2)
    channels = tensor.shape[1]
    if channels == 4:
        raise ValueError(f"got 4 channels (RGBA?) in {describe(x)} with layout {layout!r}; drop alpha (x[..., :3] "
                         "for channels-last) or composite it over a background first")
    if channels not in (1, 3):
        raise ValueError(f"expected 3 channels (RGB) or 1 (gray), got {channels} in {describe(x)}, layout {layout!r}")
    if tensor.numel() == 0:
        raise ValueError(f"to_tensor got an empty input {describe(x)}; give at least one non-empty image")
    _check_range(tensor, low, high, x, dtype)
    compute = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    values = tensor.to(compute)
    low_t = torch.full((), low, dtype=compute, device=values.device)
    high_t = torch.full((), high, dtype=compute, device=values.device)
    # Numerator and denominator use the same precision and bounds: monotonic rounding keeps the result in [0, 1].
    scaled = ((values - low_t) / (high_t - low_t)).to(torch.float32)
    return scaled.expand(-1, 3, -1, -1).contiguous() if channels == 1 else scaled.contiguous()


def _check_range(tensor: torch.Tensor, low: float, high: float, original: Any, dtype: torch.dtype) -> None:
    """Raise if any value is NaN/inf or outside ``[low, high]``: one host sync, none if ``dtype`` can't be."""
    if not dtype.is_floating_point and low <= torch.iinfo(dtype).min and torch.iinfo(dtype).max <= high:
        return  # e.g. uint8 in (0, 255)
    flat = tensor.detach()
    parts = [flat.amin().double(), flat.amax().double()]
    if flat.is_floating_point():
        parts.append((~torch.isfinite(flat)).sum().double())
    stats = torch.stack(parts).cpu().tolist()
    if len(stats) == 3 and stats[2]:
        raise ValueError(f"{describe(original)} holds {int(stats[2])} NaN/inf values; fix the producer of the images")
    if stats[0] < low or stats[1] > high:
        raise ValueError(f"values of {describe(original)} lie in [{stats[0]:.6g}, {stats[1]:.6g}], outside "
                         f"value_range=({low}, {high}); state the range the data really has (e.g. (-1, 1) or "
                         "(0, 255)), or clamp it yourself if the excess is expected (rewardkit never clips)")
