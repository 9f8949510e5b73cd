"""Shared input validators. Every message names the reward, what was expected, what came, and the fix."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

__all__ = ["check_images", "check_not_meta", "check_prompts", "describe"]

_FIX_CONVERT = "convert with rewardkit.image_io.to_tensor(x, layout=..., value_range=...)"


def describe(x: Any) -> str:
    """A short description of a value for error messages: dtype and shape for arrays."""
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is not None and dtype is not None:
        return f"{type(x).__name__} {dtype} of shape {tuple(shape)}"
    return type(x).__name__


def check_not_meta(name: str, tensor: torch.Tensor, what: str = "images") -> None:
    """Raise ``ValueError`` for a tensor on the meta device: it has a shape but no values to score."""
    if tensor.device.type == "meta":
        raise ValueError(
            f"{name}: {what} are on the meta device ({describe(tensor)} with no values); materialise them "
            "first: run the model that made them with real weights (e.g. module.to_empty(device='cpu') and "
            "load its state dict, or build it outside `with torch.device('meta')`), then pass the real tensor"
        )


def check_images(name: str, images: Any) -> None:
    """Validate the canonical image input: float ``(B, 3, H, W)`` in ``[0, 1]``, B >= 1, no NaN.

    Raises:
        TypeError: not a tensor.
        ValueError: wrong dtype, layout, channel count, empty batch, NaN/inf or values outside [0, 1].
    """
    expected = "expected images as a float tensor (B, 3, H, W) in [0, 1]"
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: {expected}, got {describe(images)}; {_FIX_CONVERT}")
    check_not_meta(name, images)
    if not images.is_floating_point():
        raise ValueError(
            f"{name}: {expected}, got {describe(images)}; "
            "for uint8 use rewardkit.image_io.to_tensor(x, layout='NCHW', value_range=(0, 255))"
        )
    if images.ndim != 4:
        raise ValueError(f"{name}: {expected}, got {describe(images)}; add a batch dimension with images[None]")
    if images.shape[1] != 3:
        hint = (
            "this looks like NHWC: use images.permute(0, 3, 1, 2)"
            if images.shape[-1] == 3
            else "give RGB images (convert grayscale/RGBA with rewardkit.image_io)"
        )
        raise ValueError(f"{name}: {expected}, got {describe(images)}; {hint}")
    if images.shape[0] == 0:
        raise ValueError(f"{name}: {expected} with B >= 1, got an empty batch {tuple(images.shape)}")
    if images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"{name}: {expected} with H, W >= 1, got {tuple(images.shape)}")
    # One aminmax pass and one host sync: NaN propagates into both extremes and inf lands outside
    # [0, 1], so non-finite values are only counted (a second pass) when building the error message.
    flat = images.detach()
    low, high = (float(v) for v in torch.stack(torch.aminmax(flat)).float().cpu().tolist())
    if math.isnan(low) or math.isnan(high) or math.isinf(low) or math.isinf(high):
        bad = int((~torch.isfinite(flat)).sum())
        raise ValueError(f"{name}: {expected}, got {int(bad)} NaN/inf values; check the pipeline's output")
    if low < 0.0 or high > 1.0:
        hint = (
            "values look like [-1, 1]: use (images + 1) / 2"
            if low >= -1.0 and low < 0.0 and high <= 1.0
            else "values look like [0, 255]: use images / 255"
            if high > 1.0 and low >= 0.0
            else "clamp or rescale the input explicitly"
        )
        raise ValueError(f"{name}: {expected}, got values in [{low:.4g}, {high:.4g}]; {hint}")


def check_prompts(
    name: str, prompts: str | Sequence[str] | None, batch_size: int, required: bool
) -> list[str] | None:
    """Expand ``prompts`` to a list of ``batch_size`` strings (one string is broadcast).

    Returns ``None`` when the reward needs no prompt and none was given.

    Raises:
        ValueError: missing prompt for a reward that needs one, or a list of the wrong length.
        TypeError: prompts that are not strings.
    """
    if prompts is None:
        if required:
            raise ValueError(
                f"{name}: this reward needs a prompt per image; pass prompts='a photo of ...' "
                f"(broadcast) or a list of {batch_size} strings"
            )
        return None
    if isinstance(prompts, str):
        return [prompts] * batch_size
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"{name}: expected prompts as str or a list of str, got {type(prompts).__name__}")
    if len(prompts) != batch_size:
        raise ValueError(
            f"{name}: expected one prompt or {batch_size} prompts (one per image), got {len(prompts)}; "
            "repeat prompts per image, e.g. [p for p in prompts for _ in range(group_size)]"
        )
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"{name}: prompts[{i}] is {type(prompt).__name__}, expected str")
    return list(prompts)
