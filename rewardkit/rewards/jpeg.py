"""JPEG (in)compressibility rewards of DDPO (Black et al., 2023, "Training Diffusion Models with
Reinforcement Learning").

Upstream: ``kvablack/ddpo-pytorch`` (1958463) ``ddpo_pytorch/rewards.py``: ``jpeg_incompressibility`` and
``jpeg_compressibility``. Each image is rounded to uint8 as ``(x * 255).round().clamp(0, 255)`` (in float32;
upstream multiplies in the input's dtype, which differs only for fp16/bf16 inputs), encoded by
Pillow as JPEG at quality 95 (Pillow's other defaults, i.e. 4:2:0 chroma subsampling), and its size is
``bytes / 1000`` kB. Incompressibility = +size, compressibility = -size (flow_grpo later divides by 500;
pass ``scale=`` for that). Sizes depend on the libjpeg build bundled with the installed Pillow.

Not differentiable (the encoder is not): scores never carry a gradient, and ``differentiable = False``.
Prompts are accepted and ignored.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from rewardkit.precision import parse_dtype
from rewardkit.protocols import Reward, RewardOutput

__all__ = ["JpegSizeReward", "jpeg_sizes_kb", "load_compressibility", "load_incompressibility",
           "JPEG_QUALITY", "BYTES_PER_KB"]

JPEG_QUALITY = 95  # ddpo-pytorch rewards.py: image.save(buffer, format="JPEG", quality=95)
BYTES_PER_KB = 1000  # ddpo-pytorch rewards.py: buffer.tell() / 1000
UINT8_MAX = 255
QUALITY_RANGE = (1, 100)  # Pillow's JPEG quality range


def jpeg_sizes_kb(images: torch.Tensor, quality: int = JPEG_QUALITY) -> list[float]:
    """JPEG sizes in kB (1000 bytes) of float images ``(B, 3, H, W)`` in ``[0, 1]``, as ddpo-pytorch computes them."""
    from PIL import Image

    pixels = (images.detach().float() * UINT8_MAX).round().clamp(0, UINT8_MAX).to(torch.uint8)
    arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()  # NCHW -> NHWC
    sizes = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / BYTES_PER_KB)
    return sizes


class JpegSizeReward(Reward):
    """``sign * scale * JPEG size in kB``, float32 ``(B,)``; ``details["size_kb"]`` is the unsigned size."""

    higher_is_better = True
    differentiable = False
    requires_prompt = False

    def __init__(self, name: str, sign: float, *, quality: int = JPEG_QUALITY, scale: float = 1.0) -> None:
        super().__init__()
        if not QUALITY_RANGE[0] <= quality <= QUALITY_RANGE[1]:
            raise ValueError(f"{name}: quality={quality} must be in [1, 100] (ddpo-pytorch uses {JPEG_QUALITY})")
        self.name = name
        self.sign = sign
        self.quality = quality
        self.scale = scale
        self.freeze()

    def score(self, images: torch.Tensor, prompts: list[str] | None, **context: Any) -> RewardOutput:
        sizes = torch.tensor(jpeg_sizes_kb(images, self.quality), dtype=torch.float32, device=images.device)
        return RewardOutput(self.sign * self.scale * sizes, {"size_kb": sizes})

    def extra_repr(self) -> str:
        return f"name={self.name!r}, quality={self.quality}, scale={self.scale}"


def _load(name: str, sign: float, weights: Any, dtype: Any, options: dict[str, Any]) -> JpegSizeReward:
    if weights is not None:
        raise ValueError(f"{name}: this reward has no weights; call rk.load({name!r}) without weights=")
    parse_dtype(dtype)  # validated; the encoder works on uint8 pixels whatever the precision mode
    unknown = sorted(set(options) - {"quality", "scale"})
    if unknown:
        raise TypeError(f"{name}: unknown options {unknown}; accepted: quality=, scale=")
    return JpegSizeReward(name, sign, **options)


def load_compressibility(weights: Any = None, device: Any = None, dtype: Any = None,
                         **options: Any) -> JpegSizeReward:
    """ddpo-pytorch ``jpeg_compressibility``: ``-size_kb`` (higher = more compressible).

    Options: ``quality`` (default 95), ``scale`` (default 1).
    """
    return _load("jpeg-compressibility", -1.0, weights, dtype, options)


def load_incompressibility(weights: Any = None, device: Any = None, dtype: Any = None,
                           **options: Any) -> JpegSizeReward:
    """ddpo-pytorch ``jpeg_incompressibility``: ``+size_kb``.

    Options: ``quality`` (default 95), ``scale`` (default 1).
    """
    return _load("jpeg-incompressibility", 1.0, weights, dtype, options)
