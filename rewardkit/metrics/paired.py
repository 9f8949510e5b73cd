"""Base class of the paired (full-reference) metrics: SSIM, MS-SSIM, PSNR, LPIPS.

A paired metric is a ``RewardFn`` that compares each image with its reference image:
``metric(images, reference=reference_images) -> (B,)``. Both are float ``(B, 3, H, W)`` in ``[0, 1]``
(the library's canonical input) with the same shape; nothing is resized or broadcast silently.
"""

from __future__ import annotations

from typing import Any

import torch

from rewardkit.errors import check_images, describe
from rewardkit.protocols import Reward, RewardOutput

__all__ = ["PairedReward", "check_reference"]


def check_reference(name: str, images: torch.Tensor, reference: Any) -> torch.Tensor:
    """Validate ``reference`` against already-validated ``images``; returns it on ``images``' device.

    Raises:
        ValueError: no reference given, or a reference whose shape differs from the images'.
        TypeError / ValueError: a reference that is not a valid image batch (see ``check_images``).
    """
    if reference is None:
        raise ValueError(
            f"{name}: a paired metric needs reference images: call it as {name}(images, reference=ref) "
            "with ref a float tensor (B, 3, H, W) in [0, 1], one reference per image"
        )
    check_images(f"{name} (reference=)", reference)
    if reference.shape != images.shape:
        raise ValueError(
            f"{name}: images and reference must have the same shape, got {describe(images)} and "
            f"{describe(reference)}; resize or crop one side explicitly (nothing is resized for you)"
        )
    return reference.to(device=images.device)


class PairedReward(Reward):
    """A reward computed from ``(images, reference)`` pairs; prompts are not used.

    Subclasses implement ``score_pairs(images, reference) -> RewardOutput`` on validated input.
    """

    requires_prompt = False
    context_keys = frozenset({"reference"})

    def score(self, images: torch.Tensor, prompts: list[str] | None, **context: Any) -> RewardOutput:
        reference = check_reference(self.name, images, context.pop("reference", None))
        if context:
            raise TypeError(f"{self.name}: unexpected keyword arguments {sorted(context)}; only reference= is accepted")
        return self.score_pairs(images, reference)

    def score_pairs(self, images: torch.Tensor, reference: torch.Tensor) -> RewardOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement score_pairs(images, reference)")
