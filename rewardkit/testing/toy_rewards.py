"""Toy rewards with a known optimum, for smoke-testing training loops (recipes, callbacks).

``MeanBrightness`` scores an image by its mean pixel value: a reward any diffusion RL loop can raise in
a few dozen steps, with no model and no weights. It is the pixel-space version of the "brightness"
reward used to check the prototype GRPO / DDPO loops in reference/rl_integration.md §3.4 (flow_grpo
issue #23 recommends a reward that must rise quickly as the first sanity check of a new setup).

Configs name it by its factory, which ``rk.load`` and ``rk.compose`` accept as ``"module:factory"``::

    rewards: {"rewardkit.testing.toy_rewards:load_brightness": 1.0}
"""

from __future__ import annotations

from typing import Any

import torch

from rewardkit.protocols import Reward, RewardOutput

__all__ = ["MeanBrightness", "load_brightness"]


class MeanBrightness(Reward):
    """Mean pixel value of each image: ``(B, 3, H, W)`` in ``[0, 1]`` -> ``(B,)`` in ``[0, 1]``.

    Differentiable (the gradient to every pixel is ``1 / (3 H W)``) and prompt-free.
    """

    name = "brightness"
    higher_is_better = True
    differentiable = True
    requires_prompt = False

    def score(self, images: torch.Tensor, prompts: list[str] | None, **context: Any) -> RewardOutput:
        return RewardOutput(images.float().mean(dim=(1, 2, 3)))


def load_brightness(weights: Any = None, device: Any = None, dtype: Any = None, **options: Any) -> MeanBrightness:
    """Factory with the ``rk.load`` signature (``rk.load("rewardkit.testing.toy_rewards:load_brightness")``).

    Args:
        weights: must be ``None`` (the reward has no parameters).
        device: ignored beyond validation (no parameters to move); scores follow the images' device.
        dtype: ignored (the mean is taken in float32).
        **options: none are accepted.

    Raises:
        ValueError: ``weights`` given.
        TypeError: unknown options.
    """
    if weights is not None:
        raise ValueError(f"brightness: the toy reward has no weights, got weights={weights!r}; pass weights=None")
    if options:
        raise TypeError(f"brightness: unknown options {sorted(options)}; load_brightness takes none")
    reward = MeanBrightness().freeze()
    return reward.to(device) if device is not None else reward
