"""Named FID input pipelines: resize to 299x299 and scale exactly as each reference implementation does.

The FID packages share one network (``rewardkit.nets.fid_inception``) but resize and scale differently,
which moves FID by whole points on non-299 inputs (``reference/distribution_metrics.md`` sections 1.8
and 1.9). Each preset is an ``ImagePrep`` (``rewardkit.metrics.extractor``) with an exact ``pil`` path
and a batched, differentiable ``tensor`` path:

================  ===============================================================  =========================
preset            exact path (one PIL RGB image) = reference                       tensor path vs exact path
================  ===============================================================  =========================
clean             clean-fid 0.1.35 ``clean`` (``cleanfid/resize.py``               emulation: float64
                  ``make_resizer("PIL", False, "bicubic")``): per channel PIL      antialiased bicubic
                  bicubic on float32 'F' images, clip [0, 255], no                 ``F.interpolate``: max
                  re-quantising, then ``(x - 128) / 128``                          1.2e-7 (1.5e-5 on 0-255)
                  (``inception_torchscript.py`` ``InceptionV3W.forward``)
torch-fidelity    torch-fidelity 0.4.0 ``FeatureExtractorInceptionV3``: uint8 ->   identical for integer-
                  float32 -> TF1 bilinear (``interpolate_compat_tensorflow.py``    valued input
                  ``interpolate_bilinear_2d_like_tensorflow1x``) -> (x-128)/128;
                  also torchmetrics ``antialias=False``; TTUR-like (TF1 graph)
torchmetrics      torchmetrics >= 1.8 ``NoTrainInceptionV3(antialias=True)``       identical for integer-
                  (``torchmetrics/image/fid.py``): bilinear + antialias ->         valued input
                  (x - 128) / 128
legacy-pytorch    pytorch-fid 0.3.0 (``pytorch_fid/inception.py``                  identical for integer-
                  ``InceptionV3.forward``): x / 255 -> bilinear, no antialias ->   valued input
                  2x - 1
diffsynth         DiffSynth-Studio ``FIDMetric``: torchvision ``Resize((299,       no uint8 rounding (kept
                  299), BICUBIC)`` on the uint8 PIL image -> ``ToTensor`` ->       differentiable): max
                  2x - 1                                                           1.7e-2 (~2 uint8 levels)
================  ===============================================================  =========================

Gaps are max |difference| on the network input (about [-1, 1]) for 200x320 to 1024x1024 images.
They are measured in ``tests/test_fid_inception.py``; the exact paths equal their references bit for
bit there. At 299x299 input every resize is skipped (each reference's resize is an exact identity
there). clean-fid's ``legacy_pytorch`` mode resizes the 0-255 values before dividing by 255; it
differs from ``legacy-pytorch`` by 3.6e-7 on the network input (operation order only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rewardkit.metrics.extractor import ImagePrep

__all__ = [
    "PRESETS", "DEFAULT_PRESET", "get_preset", "resize_bilinear_tf1", "CleanPrep", "TorchFidelityPrep",
    "TorchmetricsPrep", "LegacyPytorchPrep", "DiffSynthPrep",
]

FID_SIZE = (299, 299)  # (height, width) of the FID Inception input
TF_INPUT_CENTER = 128.0  # TF graph: (x - 128) * 0.0078125 on 0-255 pixels (torch-fidelity comment)
UINT8_MAX = 255.0  # ToTensor / pytorch-fid scale: x / 255 in [0, 1], then 2x - 1
_CLEAN_TENSOR_DTYPE = torch.float64  # PIL float-resize emulation: 1.2e-7 on the net input (float32: up to 1e-5)


def _check_batch(images: Any, preset: str) -> None:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise TypeError(f"FID preset {preset!r}: expected a float tensor (B, 3, H, W) on the 0-255 scale, got "
                        f"{got}; fix: images.float() for uint8, images * 255 for [0, 1] floats")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"FID preset {preset!r}: expected shape (B, 3, H, W), got {tuple(images.shape)}; "
                         "fix: convert NHWC with images.permute(0, 3, 1, 2) and grayscale with .expand(-1, 3, -1, -1)")


def _rgb_array(image: Any, preset: str) -> np.ndarray:
    """One PIL image -> writable uint8 ``(H, W, 3)`` array (``convert("RGB")`` as every reference does)."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise TypeError(f"FID preset {preset!r}: pil() takes one PIL.Image, got {type(image).__name__}; "
                        "fix: use tensor() for tensors, or rewardkit.image_io to load files")
    return np.array(image if image.mode == "RGB" else image.convert("RGB"))


def _uint8_batch(array: np.ndarray) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` -> float32 ``(1, 3, H, W)`` (exact: integers are exact in float32)."""
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).to(torch.float32)


def _tf_scale(images: torch.Tensor) -> torch.Tensor:
    return (images - TF_INPUT_CENTER) / TF_INPUT_CENTER


def _tf1_taps(out_len: int, in_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TF1 ``align_corners=False`` source taps: src = dst * in / out (float32), floor, next, fraction."""
    scale = torch.tensor(in_len / out_len, dtype=torch.float32, device=device)
    src = torch.arange(out_len, dtype=torch.float32, device=device) * scale
    low = src.long()  # src >= 0, so truncation is floor
    high = (low + 1).clamp_max(in_len - 1)
    return low, high, src - low.to(torch.float32)


def resize_bilinear_tf1(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TensorFlow 1.x ``resize_bilinear(align_corners=False)``: asymmetric mapping, no antialiasing.

    Output pixel ``j`` samples input coordinate ``j * in / out`` (not the half-pixel rule of
    ``F.interpolate``); the last row/column repeats at the border. Same float32 arithmetic, in the
    same order, as torch-fidelity's ``interpolate_bilinear_2d_like_tensorflow1x(method="slow")``, so
    CPU results are bit-identical to it.

    Args:
        images: float ``(B, C, H, W)``, any range; computed in float32.
        size: output ``(height, width)``.

    Returns:
        float32 ``(B, C, *size)``.
    """
    images = images.to(torch.float32)
    rows_low, rows_high, frac_y = _tf1_taps(size[0], images.shape[-2], images.device)
    cols_low, cols_high, frac_x = _tf1_taps(size[1], images.shape[-1], images.device)

    def horizontal(rows: torch.Tensor) -> torch.Tensor:
        left, right = rows.index_select(-1, cols_low), rows.index_select(-1, cols_high)
        return left + (right - left) * frac_x

    top = horizontal(images.index_select(-2, rows_low))
    bottom = horizontal(images.index_select(-2, rows_high))
    return top + (bottom - top) * frac_y.unsqueeze(-1)


@dataclass(frozen=True)
class _Prep:
    """Shared plumbing: ``pil`` = the tensor path on the image's exact uint8 values, unless overridden."""

    preset: str = ""
    size: tuple[int, int] = FID_SIZE

    def _same_size(self, images: torch.Tensor) -> bool:
        return tuple(images.shape[-2:]) == tuple(self.size)

    def pil(self, image: Any) -> torch.Tensor:
        """One PIL image (any mode, converted to RGB) -> float32 ``(3, *size)`` network input."""
        return self.tensor(_uint8_batch(_rgb_array(image, self.preset)))[0].contiguous()

    def tensor(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """Float ``(B, 3, H, W)`` on the 0-255 scale -> float32 ``(B, 3, *size)`` network input."""
        raise NotImplementedError


@dataclass(frozen=True)
class CleanPrep(_Prep):
    """clean-fid ``clean``: PIL float bicubic (antialiased), clip [0, 255], ``(x - 128) / 128``."""

    preset: str = "clean"

    def pil(self, image: Any) -> torch.Tensor:
        from PIL import Image

        array = _rgb_array(image, self.preset)
        height, width = self.size
        if array.shape[:2] != (height, width):
            planes = [Image.fromarray(array[:, :, c].astype(np.float32)) for c in range(array.shape[2])]
            resized = [np.asarray(p.resize((width, height), resample=Image.Resampling.BICUBIC)) for p in planes]
            array = np.stack(resized, axis=-1).clip(0, UINT8_MAX)
        planar = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32))
        return _tf_scale(planar)

    def tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Emulation: antialiased bicubic ``F.interpolate`` (PIL's a=-0.5 kernel) in float64, clamped."""
        _check_batch(images, self.preset)
        if not self._same_size(images):
            resized = F.interpolate(images.to(_CLEAN_TENSOR_DTYPE), size=self.size, mode="bicubic",
                                    align_corners=False, antialias=True)
            images = resized.clamp(0, UINT8_MAX)
        return _tf_scale(images.to(torch.float32))


@dataclass(frozen=True)
class TorchFidelityPrep(_Prep):
    """torch-fidelity (also torchmetrics ``antialias=False``; TTUR-like): TF1 bilinear, ``(x - 128) / 128``."""

    preset: str = "torch-fidelity"

    def tensor(self, images: torch.Tensor) -> torch.Tensor:
        _check_batch(images, self.preset)
        images = images.to(torch.float32)
        if not self._same_size(images):
            images = resize_bilinear_tf1(images, self.size)
        return _tf_scale(images)


@dataclass(frozen=True)
class TorchmetricsPrep(_Prep):
    """torchmetrics >= 1.8 default: bilinear with antialiasing, ``(x - 128) / 128``."""

    preset: str = "torchmetrics"

    def tensor(self, images: torch.Tensor) -> torch.Tensor:
        _check_batch(images, self.preset)
        images = images.to(torch.float32)
        if not self._same_size(images):
            images = F.interpolate(images, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return _tf_scale(images)


@dataclass(frozen=True)
class LegacyPytorchPrep(_Prep):
    """pytorch-fid: ``x / 255``, then bilinear without antialiasing, then ``2x - 1`` (in that order)."""

    preset: str = "legacy-pytorch"

    def tensor(self, images: torch.Tensor) -> torch.Tensor:
        _check_batch(images, self.preset)
        images = images.to(torch.float32).div(UINT8_MAX)
        if not self._same_size(images):
            images = F.interpolate(images, size=self.size, mode="bilinear", align_corners=False)
        return 2 * images - 1


@dataclass(frozen=True)
class DiffSynthPrep(_Prep):
    """DiffSynth-Studio ``FIDMetric``: PIL uint8 bicubic to 299x299, ``ToTensor``, ``2x - 1``."""

    preset: str = "diffsynth"

    def pil(self, image: Any) -> torch.Tensor:
        from PIL import Image

        array = _rgb_array(image, self.preset)
        height, width = self.size
        if array.shape[:2] != (height, width):  # torchvision Resize on PIL = Image.resize((w, h), BICUBIC)
            resized = Image.fromarray(array).resize((width, height), resample=Image.Resampling.BICUBIC)
            array = np.array(resized)
        return 2 * _uint8_batch(array)[0].div(UINT8_MAX) - 1

    def tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Antialiased bicubic in float32, clamped, not rounded to uint8 (kept differentiable)."""
        _check_batch(images, self.preset)
        images = images.to(torch.float32)
        if not self._same_size(images):
            images = F.interpolate(images, size=self.size, mode="bicubic", align_corners=False, antialias=True)
            images = images.clamp(0, UINT8_MAX)
        return 2 * images.div(UINT8_MAX) - 1


DEFAULT_PRESET = "clean"
PRESETS: dict[str, ImagePrep] = {
    prep.preset: prep
    for prep in (CleanPrep(), TorchFidelityPrep(), TorchmetricsPrep(), LegacyPytorchPrep(), DiffSynthPrep())
}


def get_preset(name: str) -> ImagePrep:
    """The ``ImagePrep`` of a named preset (frozen, picklable, shared).

    Raises:
        ValueError: an unknown name; the message lists the valid ones.
    """
    prep = PRESETS.get(name) if isinstance(name, str) else None
    if prep is None:
        raise ValueError(f"unknown FID preset {name!r}; choose one of {sorted(PRESETS)} "
                         f"(default {DEFAULT_PRESET!r}; see rewardkit.metrics.fid_presets)")
    return prep
