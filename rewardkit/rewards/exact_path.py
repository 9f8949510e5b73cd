"""The exact (PIL) scoring path shared by rewards whose upstream preprocesses PIL images.

A reward mixes in ``ExactPathMixin`` and provides ``spec`` (a ``rewardkit.preprocess.PreprocessSpec``)
and ``score_pixels(pixels, prompts) -> RewardOutput`` on preprocessed pixels; the mixin adds
``evaluate_pil`` / ``score_pil``, which reproduce upstream's PIL preprocessing for any mix of sizes.
"""

from __future__ import annotations

from typing import Any

import torch

from rewardkit.errors import check_prompts
from rewardkit.image_io import as_rgb_images
from rewardkit.preprocess import preprocess_pil
from rewardkit.protocols import RewardOutput

__all__ = ["ExactPathMixin"]


class ExactPathMixin:
    """``evaluate_pil`` / ``score_pil`` on top of ``spec`` and ``score_pixels`` (see the module docstring)."""

    name: str
    requires_prompt: bool
    spec: Any

    def score_pixels(self, pixels: torch.Tensor, prompts: list[str] | None) -> RewardOutput:  # pragma: no cover
        raise NotImplementedError

    def evaluate_pil(self, images: Any, prompts: str | list[str] | None = None) -> RewardOutput:
        """Exact path: upstream PIL preprocessing for PIL images or image files (any sizes).

        Args:
            images: a PIL image, a path, or a list of them (sizes may differ).
            prompts: one string (broadcast) or one per image; ``None`` for rewards without prompts.

        Returns:
            ``RewardOutput`` with float32 scores ``(B,)`` on the model's device.
        """
        items = images if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ValueError(f"{self.name}: expected at least one image, got an empty list")
        pil_images = as_rgb_images(items)
        prompt_list = check_prompts(self.name, prompts, len(pil_images), self.requires_prompt)
        return self.score_pixels(preprocess_pil(pil_images, self.spec), prompt_list)

    def score_pil(self, images: Any, prompts: str | list[str] | None = None) -> torch.Tensor:
        """``evaluate_pil(...).scores``: float32 ``(B,)``."""
        return self.evaluate_pil(images, prompts).scores
