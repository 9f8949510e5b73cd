"""Edge conversion: files, folders, PIL images, numpy arrays, tensors -> float32 ``(B, 3, H, W)`` in ``[0, 1]``.

This module, ``image_files.py`` (which lists, decodes and converts files and PIL images to 8-bit RGB) and
``cli.py`` are the only places PIL appears. Nothing is guessed: array layouts and value ranges are stated by
the caller, out-of-range values raise (never clipped), images of different sizes raise (never resized), and
every PIL mode becomes 8-bit RGB by a stated rule (:func:`load_image`). The file-side names of
``rewardkit.image_files`` are re-exported here, the public path for all of them.
"""

from __future__ import annotations

import numbers
import os
import pathlib
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from rewardkit.errors import check_not_meta, describe
from rewardkit.image_files import (
    _DECODE_ERRORS,
    _UINT8_MAX,
    _UINT16_MAX,
    IMAGE_EXTENSIONS,
    AlphaPolicy,
    ImageLoadError,
    _check_alpha,
    _to_rgb,
    as_rgb,
    as_rgb_images,
    list_images,
    load_image,
    load_images,
)

__all__ = ["IMAGE_EXTENSIONS", "ImageLoadError", "list_images", "load_image", "load_images", "pil_to_tensor",
           "to_tensor", "as_rgb", "as_rgb_images"]

Layout = Literal["NCHW", "NHWC", "CHW", "HWC"]

_LAYOUTS = ("NCHW", "NHWC", "CHW", "HWC")
_DTYPE_DEFAULT_RANGES = {torch.uint8: (0, _UINT8_MAX), torch.uint16: (0, _UINT16_MAX)}
_TORCH_WIDEN = {torch.uint16: torch.int32, torch.uint32: torch.int64}  # lossless; few ops support uint16/32
_ARRAY_DTYPES = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                           torch.float16, torch.bfloat16, torch.float32, torch.float64})
_ACCEPTED = ("a PIL image, a path to an image file or folder, a list/tuple of PIL images or paths, "
             "a numpy array or a torch tensor (with layout= and value_range=)")


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
