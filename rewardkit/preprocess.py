"""Image preprocessing for CLIP-family rewards: one spec, two paths that produce the same model input.

* The **tensor path** (:func:`preprocess`) is pure torch: differentiable, any device, antialiased
  bicubic ``F.interpolate``. Rewards use it for training and for tensor inputs.
* The **exact path** (:func:`preprocess_pil`) reproduces the upstream PIL pipelines for PIL RGB images
  of any size, up to float32 rounding:

  ==================================  =====================================================================
  spec                                upstream pipeline
  ==================================  =====================================================================
  shortest-crop, torchvision, round   torchvision ``Resize(S, BICUBIC)`` on PIL -> ``CenterCrop(S)`` ->
                                      ``ToTensor`` -> ``Normalize`` (OpenAI ``clip.load``, open_clip eval
                                      transform, ImageReward)
  shortest-crop, hf, floor            transformers ``CLIPImageProcessorPil`` (4.x slow ``CLIPImageProcessor``):
                                      PIL resize -> floor center crop -> x * (1/255) in float64 -> float32
                                      -> normalize
  longest-pad                         HPSv2 ``ToTensor`` -> ``ResizeMaxSize(S)`` (tensor bicubic resize,
                                      antialiased in torchvision >= 0.17, zero pad) -> ``Normalize``
  ==================================  =====================================================================

  ``pil_backend`` selects the resize / rescale arithmetic of the exact path; the crop offset always
  follows ``crop_rounding``, so the tensor and the exact path agree for every spec. The upstream
  combinations are the presets :data:`TORCHVISION_CLIP`, :data:`HF_CLIP` and :data:`HPSV2`.

For shortest-crop specs that resize, the tensor path approximates PIL's 8-bit bicubic with the same
antialiased kernel in Pillow's pass order (measured in ``docs/preprocessing_gap.md``: at most about
1 uint8 level, all of it PIL's uint8 rounding). Without a resize, and for longest-pad at any size, both
paths compute the same thing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "PreprocessSpec",
    "TORCHVISION_CLIP",
    "HF_CLIP",
    "HPSV2",
    "resized_shape",
    "resize_like_pil",
    "pillow_reorders_passes",
    "resize",
    "center_crop",
    "pad_to_square",
    "normalize",
    "preprocess",
    "preprocess_pil",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # openai/CLIP clip/clip.py `_transform` Normalize
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # openai/CLIP clip/clip.py `_transform` Normalize
HF_RESCALE_FACTOR = 1 / 255  # transformers CLIPImageProcessor `rescale_factor` default (0.00392156862745098)

Mode = Literal["shortest-crop", "longest-pad"]
Rounding = Literal["floor", "round"]
Interpolation = Literal["bicubic", "bilinear"]
_SPEC_CHOICES = {
    "mode": ("shortest-crop", "longest-pad"),
    "crop_rounding": ("floor", "round"),
    "interpolation": ("bicubic", "bilinear"),
    "pil_backend": ("torchvision", "hf"),
}


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes a model input.

    Attributes:
        size: side S of the square model input.
        mode: ``"shortest-crop"``: resize the shortest side to S (long side ``int(S * long / short)``,
            truncated, as torchvision ``Resize(int)`` and HF ``get_resize_output_image_size``), then center
            crop S x S. ``"longest-pad"``: HPSv2 ``ResizeMaxSize(S)``: ``scale = S / max(H, W)``, each side
            ``round(dim * scale)``, resize, zero pad to S x S (left/top ``pad // 2``). When ``scale == 1``
            nothing is resized or padded, so the output stays non-square, as upstream.
        crop_rounding: ``"floor"``: offset ``(H - S) // 2`` (HF image processors); ``"round"``:
            ``int(round((H - S) / 2))`` (torchvision ``CenterCrop``, Python round-half-even). They differ
            by one pixel when ``(H - S) % 4 == 3``.
        interpolation: resize kernel.
        mean, std: per-channel normalisation applied to [0, 1] values.
        pil_backend: the upstream PIL pipeline the exact path reproduces (ignored for longest-pad, whose
            upstream resizes a tensor).
    """

    size: int = 224
    mode: Mode = "shortest-crop"
    crop_rounding: Rounding = "round"
    interpolation: Interpolation = "bicubic"
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    pil_backend: Literal["torchvision", "hf"] = "torchvision"

    def __post_init__(self) -> None:
        for name, allowed in _SPEC_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"PreprocessSpec: {name}={getattr(self, name)!r}, expected one of {allowed}")
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"PreprocessSpec: size={self.size!r}, expected a positive int")


TORCHVISION_CLIP = PreprocessSpec()  # OpenAI clip.load, open_clip eval transform, ImageReward, BioCLIP
HF_CLIP = PreprocessSpec(crop_rounding="floor", pil_backend="hf")  # CLIPImageProcessor(Pil): PickScore, ...
HPSV2 = PreprocessSpec(mode="longest-pad")  # HPSv2 `preprocess_val` (light_augmentation=True)


def resized_shape(height: int, width: int, spec: PreprocessSpec) -> tuple[int, int]:
    """The ``(h, w)`` after the resize step, by the upstream rounding rules (see :class:`PreprocessSpec`)."""
    size = spec.size
    if spec.mode == "longest-pad":
        scale = size / float(max(height, width))  # HPSv2 ResizeMaxSize
        if scale == 1.0:
            return height, width
        # Upstream rounds a short side below 0.5 px to 0 and torchvision's resize then raises (e.g. 2000x3 ->
        # 224x0); like Pillow's Image.thumbnail, keep at least 1 px. Every ratio upstream accepts is unchanged.
        return max(1, round(height * scale)), max(1, round(width * scale))
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)  # torchvision _compute_resized_output_size, HF get_resize_output_image_size
    return (new_long, size) if width <= height else (size, new_long)


def _compute_dtype(images: torch.Tensor) -> torch.dtype:
    # torchvision's tensor resize computes in float32 for non-float32/64 inputs; bicubic-AA has no CPU bf16 kernel.
    return images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32


def resize(
    images: torch.Tensor,
    size_hw: tuple[int, int],
    *,
    interpolation: Interpolation = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resize ``(B, C, H, W)`` float images to ``(B, C, h, w)`` as torchvision's tensor ``F.resize`` does.

    Computes in float32 for reduced-precision inputs and returns the input dtype; no clamping. A no-op
    (the same tensor) when the size already matches.
    """
    h, w = int(size_hw[0]), int(size_hw[1])
    if tuple(images.shape[-2:]) == (h, w):
        return images
    work = images.to(_compute_dtype(images))
    if min(h, w) == 1:  # torch 2.x's channels-last antialiased CPU kernel is wrong (0.06 off) for a 1-px output side
        work = work.contiguous()
    out = F.interpolate(work, size=(h, w), mode=interpolation, align_corners=False, antialias=antialias)
    return out.to(images.dtype)


def _crop_or_pad_1d(length: int, size: int, rounding: Rounding) -> tuple[int, int, int]:
    """(offset, pad_before, pad_after) for one axis of a center crop with the named upstream semantics."""
    if length >= size:
        offset = (length - size) // 2 if rounding == "floor" else int(round((length - size) / 2.0))
        return offset, 0, 0
    deficit = size - length
    if rounding == "floor":  # transformers image_transforms.center_crop: image placed at ceil(deficit / 2)
        return 0, (deficit + 1) // 2, deficit // 2
    return 0, deficit // 2, (deficit + 1) // 2  # torchvision center_crop: padding_ltrb floor left/top


def center_crop(images: torch.Tensor, size: int, *, rounding: Rounding = "round") -> torch.Tensor:
    """Center crop ``(..., H, W)`` to ``(..., size, size)``.

    ``rounding="round"`` reproduces torchvision ``CenterCrop`` and ``"floor"`` transformers' ``center_crop``,
    including their zero padding of an axis shorter than ``size`` (torchvision puts the odd pixel after
    the image, transformers before it).
    """
    height, width = images.shape[-2:]
    top, pad_top, pad_bottom = _crop_or_pad_1d(int(height), size, rounding)
    left, pad_left, pad_right = _crop_or_pad_1d(int(width), size, rounding)
    if pad_top or pad_bottom or pad_left or pad_right:
        images = F.pad(images, (pad_left, pad_right, pad_top, pad_bottom), mode="constant", value=0.0)
    return images[..., top : top + size, left : left + size]


def pad_to_square(images: torch.Tensor, size: int, *, value: float = 0.0) -> torch.Tensor:
    """Pad ``(..., h, w)`` with ``value`` to ``(..., size, size)``: left/top ``pad // 2``, right/bottom the rest.

    Raises:
        ValueError: a side is longer than ``size``.
    """
    height, width = int(images.shape[-2]), int(images.shape[-1])
    pad_h, pad_w = size - height, size - width
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"pad_to_square: image of size {height}x{width} is larger than {size}; resize it first")
    if pad_h == 0 and pad_w == 0:
        return images
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=value)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel on ``(..., C, H, W)``, as torchvision ``Normalize`` (subtract, then divide).

    Reduced-precision inputs are normalised in float32 and returned in their own dtype.
    """
    work = images.to(_compute_dtype(images))
    m = torch.as_tensor(mean, dtype=work.dtype, device=work.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=work.dtype, device=work.device).view(-1, 1, 1)
    return ((work - m) / s).to(images.dtype)


# Pass-order probe: a (height 16, width 4) binary-noise image resized to PIL size (width 8, height 4).
_PROBE_SHAPE, _PROBE_TARGET = (16, 4), (8, 4)
_UINT8_MAX = 255


@functools.lru_cache(maxsize=1)
def pillow_reorders_passes() -> bool:
    """Whether the installed Pillow runs the vertical pass first when the height shrinks much more than the width.

    Pillow <= 12 always resamples horizontally first; Pillow 13 (python-pillow/Pillow PR #9549) runs the
    vertical pass first when ``in_h - out_h > 2 * (in_w - out_w)`` with ``out_h < in_h`` (condition
    fitted exactly on 1490 random size pairs with Pillow 13.0.0). Probed once on a 16 x 4 binary-noise
    image whose two pass orders differ by 18 levels.
    """
    import numpy as np
    from PIL import Image

    pixels = (np.random.default_rng(0).integers(0, 2, _PROBE_SHAPE) * _UINT8_MAX).astype(np.uint8)
    image = Image.fromarray(pixels)
    out_w, out_h = _PROBE_TARGET
    direct = np.asarray(image.resize((out_w, out_h), Image.Resampling.BICUBIC))
    vertical = image.resize((image.width, out_h), Image.Resampling.BICUBIC)
    return bool(np.array_equal(direct, np.asarray(vertical.resize((out_w, out_h), Image.Resampling.BICUBIC))))


def resize_like_pil(images: torch.Tensor, size_hw: tuple[int, int], interpolation: Interpolation = "bicubic", *,
                    high: float = 1.0) -> torch.Tensor:
    """Antialiased resize in Pillow's two-pass order, clipping to ``[0, high]`` after each pass.

    Pillow resamples 8-bit images in two separable passes and stores the intermediate as uint8, so the
    bicubic overshoot of the first pass is clipped before the second. Emulating the clipping (not the
    rounding, which has no gradient) cuts the gap to PIL on high-frequency images from ~4 uint8 levels
    to the rounding floor (docs/preprocessing_gap.md). The pass order follows the installed Pillow
    (:func:`pillow_reorders_passes`); a pass whose axis keeps its size is skipped, as in Pillow.

    Args:
        images: float ``(B, C, H, W)`` in ``[0, high]`` (``high=1.0`` or ``255.0``).
        size_hw: output ``(height, width)``.
        interpolation: the PIL filter emulated (antialiased).
    """
    height, width = int(images.shape[-2]), int(images.shape[-1])
    out_h, out_w = int(size_hw[0]), int(size_hw[1])
    shrink_h, shrink_w = height - out_h, width - out_w
    passes = [(height, out_w), (out_h, out_w)]  # horizontal, then vertical
    if shrink_h > 0 and shrink_h > 2 * shrink_w and pillow_reorders_passes():
        passes = [(out_h, width), (out_h, out_w)]
    for step_hw in passes:
        if tuple(images.shape[-2:]) != step_hw:
            images = resize(images, step_hw, interpolation=interpolation).clamp(0.0, high)
    return images


def preprocess(images: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """TENSOR path: float ``(B, 3, H, W)`` in [0, 1] -> normalised ``(B, 3, S, S)`` in the input dtype.

    Differentiable (autograd flows to ``images``) and device-agnostic. For longest-pad with
    ``max(H, W) == S`` the output is ``(B, 3, H, W)``, as upstream. Validates nothing: callers do.
    """
    dtype = images.dtype
    x = images.to(_compute_dtype(images))
    size_hw = resized_shape(int(x.shape[-2]), int(x.shape[-1]), spec)
    if spec.mode == "longest-pad":  # upstream resizes a float tensor itself: the same op, no clipping
        x = resize(x, size_hw, interpolation=spec.interpolation, antialias=True)
        if max(images.shape[-2:]) != spec.size:  # ResizeMaxSize pads only when scale != 1
            x = pad_to_square(x, spec.size)
    else:
        x = resize_like_pil(x, size_hw, spec.interpolation)
        x = center_crop(x, spec.size, rounding=spec.crop_rounding)
    return normalize(x, spec.mean, spec.std).to(dtype)


def _pil_resample(interpolation: Interpolation) -> int:
    from PIL import Image

    return Image.Resampling.BICUBIC if interpolation == "bicubic" else Image.Resampling.BILINEAR


def _torchvision_mode(interpolation: Interpolation):  # noqa: ANN202 - torchvision InterpolationMode
    from torchvision.transforms import InterpolationMode

    return InterpolationMode.BICUBIC if interpolation == "bicubic" else InterpolationMode.BILINEAR


def _exact_shortest_crop(image: Image.Image, spec: PreprocessSpec) -> torch.Tensor:
    """One PIL image through the upstream shortest-side resize + center crop pipeline of ``spec.pil_backend``."""
    import numpy as np

    height, width = image.height, image.width
    new_h, new_w = resized_shape(height, width, spec)
    top, _, _ = _crop_or_pad_1d(new_h, spec.size, spec.crop_rounding)  # new side >= S: never pads
    left, _, _ = _crop_or_pad_1d(new_w, spec.size, spec.crop_rounding)
    if spec.pil_backend == "torchvision":
        import torchvision.transforms.functional as TF

        image = TF.resize(image, [new_h, new_w], interpolation=_torchvision_mode(spec.interpolation))
        image = TF.crop(image, top, left, spec.size, spec.size)
        return TF.normalize(TF.to_tensor(image), list(spec.mean), list(spec.std))
    # transformers PilBackend: PIL resize (skipped by Pillow when the size matches), numpy crop,
    # rescale in float64 then float32, normalize in float32.
    if (new_h, new_w) != (height, width):
        image = image.resize((new_w, new_h), resample=_pil_resample(spec.interpolation), reducing_gap=None)
    array = np.asarray(image)[top : top + spec.size, left : left + spec.size].transpose(2, 0, 1)
    array = (array.astype(np.float64) * HF_RESCALE_FACTOR).astype(np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    return torch.from_numpy(np.ascontiguousarray((array - mean) / std))


def preprocess_pil(images: Sequence[Image.Image], spec: PreprocessSpec) -> torch.Tensor:
    """EXACT path: RGB PIL images (sizes may differ) -> normalised float32 ``(B, 3, S, S)`` on the CPU.

    Reproduces the upstream pipeline named by ``spec`` (module docstring) to float32 rounding.

    Raises:
        ValueError: an image is not RGB, or a longest-pad batch mixes unpadded (``max(H, W) == S``)
            images of different shapes, which upstream leaves non-square and cannot be stacked.
    """
    import torchvision.transforms.functional as TF

    if len(images) == 0:
        raise ValueError("preprocess_pil: expected at least one image, got an empty sequence")
    outputs = []
    for index, image in enumerate(images):
        if getattr(image, "mode", None) != "RGB":
            raise ValueError(
                f"preprocess_pil: expected RGB PIL images, got {_describe_pil(image)} at index {index}; "
                "convert with image.convert('RGB') or rewardkit.image_io"
            )
        if spec.mode == "longest-pad":  # HPSv2 resizes the ToTensor'd image: the tensor path is that computation
            outputs.append(preprocess(TF.to_tensor(image)[None], spec)[0])
        else:
            outputs.append(_exact_shortest_crop(image, spec))
    shapes = {tuple(out.shape) for out in outputs}
    if len(shapes) > 1:
        raise ValueError(
            f"preprocess_pil: longest-pad leaves images whose longest side is already {spec.size} unpadded "
            f"(as HPSv2 does), so this batch has shapes {sorted(shapes)}; score such images one at a time"
        )
    return torch.stack(outputs)


def _describe_pil(image: object) -> str:
    """A short description of a would-be PIL image for error messages."""
    mode = getattr(image, "mode", None)
    return f"PIL image mode {mode!r} size {image.size}" if mode is not None else type(image).__name__
