"""JPEG (in)compressibility rewards of DDPO (Black et al., 2023, "Training Diffusion Models with
Reinforcement Learning").

Upstream: ``kvablack/ddpo-pytorch`` (1958463) ``ddpo_pytorch/rewards.py``: ``jpeg_incompressibility`` and
``jpeg_compressibility``. Each image is rounded to uint8 as ``(x * 255).round().clamp(0, 255)`` (in float32;
upstream multiplies in the input's dtype, which differs only for fp16/bf16 inputs), encoded by
Pillow as JPEG at quality 95 (Pillow's other defaults, i.e. 4:2:0 chroma subsampling), and its size is
``bytes / 1000`` kB. Incompressibility = +size, compressibility = -size. Sizes depend on the libjpeg build
bundled with the installed Pillow.

Two conventions (``convention=``):

* ``"ddpo"`` (default): kB, as ddpo-pytorch and trl's DDPO example.
* ``"flow_grpo"``: ``yifan123/flow_grpo`` ``flow_grpo/rewards.py`` divides compressibility by 500
  (``-kB / 500``, so a 500 kB image scores -1); its ``jpeg_incompressibility`` stays in kB, so that
  reward is unchanged by this convention.

``scale=`` multiplies instead (``scale=1/500`` equals the flow_grpo convention for compressibility); give
one of the two. Scores are computed in float64 and rounded once to float32.

Two paths: the tensor path (``reward(images)``) quantises float images as above; the exact path
(``evaluate_pil`` / ``score_pil``) encodes 8-bit RGB PIL images or image files of any sizes as they are,
which is what ddpo-pytorch does once its tensor is uint8 (``rewardkit score`` uses it for folders of mixed
sizes). Not differentiable (the encoder is not): scores never carry a gradient. Prompts are accepted and
ignored.
"""

from __future__ import annotations

import io
from typing import Any, Literal

import torch

from rewardkit.errors import check_prompts
from rewardkit.precision import parse_dtype
from rewardkit.protocols import Reward, RewardOutput

__all__ = ["JpegSizeReward", "jpeg_sizes_kb", "pil_jpeg_size_kb", "load_compressibility",
           "load_incompressibility", "JPEG_QUALITY", "BYTES_PER_KB", "FLOW_GRPO_KB_DIVISOR", "CONVENTIONS"]

JPEG_QUALITY = 95  # ddpo-pytorch rewards.py: image.save(buffer, format="JPEG", quality=95)
BYTES_PER_KB = 1000  # ddpo-pytorch rewards.py: buffer.tell() / 1000
FLOW_GRPO_KB_DIVISOR = 500  # yifan123/flow_grpo flow_grpo/rewards.py jpeg_compressibility: -rew / 500
UINT8_MAX = 255
QUALITY_RANGE = (1, 100)  # Pillow's JPEG quality range
Convention = Literal["ddpo", "flow_grpo"]
CONVENTIONS = ("ddpo", "flow_grpo")


def pil_jpeg_size_kb(image: Any, quality: int = JPEG_QUALITY) -> float:
    """The JPEG size in kB (1000 bytes) of one 8-bit RGB PIL image saved by Pillow at ``quality``."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / BYTES_PER_KB


def jpeg_sizes_kb(images: torch.Tensor, quality: int = JPEG_QUALITY) -> list[float]:
    """JPEG sizes in kB (1000 bytes) of float images ``(B, 3, H, W)`` in ``[0, 1]``, as ddpo-pytorch computes them."""
    from PIL import Image

    pixels = (images.detach().float() * UINT8_MAX).round().clamp(0, UINT8_MAX).to(torch.uint8)
    arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()  # NCHW -> NHWC
    return [pil_jpeg_size_kb(Image.fromarray(array), quality) for array in arrays]


class JpegSizeReward(Reward):
    """``sign * scale * JPEG size in kB``, float32 ``(B,)``; ``details["size_kb"]`` is the unsigned size."""

    higher_is_better = True
    differentiable = False
    requires_prompt = False
    context_keys = frozenset()

    def __init__(self, name: str, sign: float, *, quality: int = JPEG_QUALITY, scale: float | None = None,
                 convention: Convention | None = None) -> None:
        super().__init__()
        if not QUALITY_RANGE[0] <= quality <= QUALITY_RANGE[1]:
            raise ValueError(f"{name}: quality={quality} must be in [1, 100] (ddpo-pytorch uses {JPEG_QUALITY})")
        if convention is not None and convention not in CONVENTIONS:
            raise ValueError(f"{name}: convention={convention!r}, expected one of {CONVENTIONS}")
        if convention is not None and scale is not None:
            raise ValueError(f"{name}: give convention= or scale=, not both (convention={convention!r} sets the scale)")
        if scale is None:
            flow_grpo_divides = convention == "flow_grpo" and sign < 0  # only compressibility is divided upstream
            scale = 1.0 / FLOW_GRPO_KB_DIVISOR if flow_grpo_divides else 1.0
        self.name = name
        self.sign = sign
        self.quality = quality
        self.scale = float(scale)
        if convention is None:  # name the convention a plain scale= reproduces, if any
            matches_flow_grpo = sign < 0 and self.scale == 1.0 / FLOW_GRPO_KB_DIVISOR
            convention = "ddpo" if self.scale == 1.0 else "flow_grpo" if matches_flow_grpo else "custom"
        self.convention = convention
        self.freeze()

    def _output(self, sizes: list[float], device: torch.device | str) -> RewardOutput:
        sizes64 = torch.tensor(sizes, dtype=torch.float64, device=device)
        # Upstream works on float64 numpy arrays: one rounding to float32 at the end.
        scores = (self.sign * self.scale * sizes64).to(torch.float32)
        return RewardOutput(scores, {"size_kb": sizes64.to(torch.float32)})

    def score(self, images: torch.Tensor, prompts: list[str] | None, **context: Any) -> RewardOutput:
        return self._output(jpeg_sizes_kb(images, self.quality), images.device)

    def evaluate_pil(self, images: Any, prompts: str | list[str] | None = None) -> RewardOutput:
        """Exact path: JPEG sizes of 8-bit RGB PIL images or image files, any mix of sizes, on CPU.

        Args:
            images: a PIL image, a path, or a list of them; modes are converted to 8-bit RGB by the rules
                of ``rewardkit.image_io.load_image``.
            prompts: accepted and ignored (one string, one per image, or ``None``).

        Returns:
            ``RewardOutput`` with float32 scores ``(B,)`` and ``details["size_kb"]``.
        """
        from rewardkit.image_io import as_rgb_images

        items = images if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ValueError(f"{self.name}: expected at least one image, got an empty list")
        pil_images = as_rgb_images(items)
        check_prompts(self.name, prompts, len(pil_images), self.requires_prompt)
        return self._output([pil_jpeg_size_kb(image, self.quality) for image in pil_images], "cpu")

    def score_pil(self, images: Any, prompts: str | list[str] | None = None) -> torch.Tensor:
        """``evaluate_pil(...).scores``: float32 ``(B,)``."""
        return self.evaluate_pil(images, prompts).scores

    def extra_repr(self) -> str:
        return f"name={self.name!r}, quality={self.quality}, scale={self.scale}, convention={self.convention!r}"


def _load(name: str, sign: float, weights: Any, dtype: Any, options: dict[str, Any]) -> JpegSizeReward:
    if weights is not None:
        raise ValueError(f"{name}: this reward has no weights; call rk.load({name!r}) without weights=")
    parse_dtype(dtype)  # validated; the encoder works on uint8 pixels whatever the precision mode
    unknown = sorted(set(options) - {"quality", "scale", "convention"})
    if unknown:
        raise TypeError(f"{name}: unknown options {unknown}; accepted: quality=, scale=, convention=")
    return JpegSizeReward(name, sign, **options)


def load_compressibility(weights: Any = None, device: Any = None, dtype: Any = None,
                         **options: Any) -> JpegSizeReward:
    """ddpo-pytorch ``jpeg_compressibility``: ``-size_kb`` (higher = more compressible).

    Options: ``quality`` (default 95), ``convention`` (``"ddpo"``: kB, default; ``"flow_grpo"``: kB / 500)
    or ``scale`` (a multiplier).
    """
    return _load("jpeg-compressibility", -1.0, weights, dtype, options)


def load_incompressibility(weights: Any = None, device: Any = None, dtype: Any = None,
                           **options: Any) -> JpegSizeReward:
    """ddpo-pytorch ``jpeg_incompressibility``: ``+size_kb``.

    Options: ``quality`` (default 95), ``convention`` (both keep kB: flow_grpo does not rescale this one)
    or ``scale`` (a multiplier).
    """
    return _load("jpeg-incompressibility", 1.0, weights, dtype, options)
