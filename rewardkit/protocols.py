"""The two public protocols of rewardkit, their output type, and the base class of built-in rewards.

* ``RewardFn``: a per-image score. Called as ``reward(images, prompts=None, **context)`` with
  ``images`` a float tensor ``(B, 3, H, W)`` in ``[0, 1]``; returns a float32 tensor ``(B,)`` on
  ``images.device``. NaN in a row means "not applicable / could not score this row".
* ``DistributionMetric``: a set-level score (FID, KID, ...) accumulated with ``update`` and read
  with ``compute``.

Both protocols are structural: any ``nn.Module`` or callable with the listed attributes works in
``rk.compose``, the training adapters and the callbacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from rewardkit.errors import check_images, check_prompts

__all__ = ["RewardOutput", "RewardFn", "DistributionMetric", "Reward"]


@dataclass
class RewardOutput:
    """What ``reward.evaluate(...)`` returns.

    Attributes:
        scores: float32 tensor ``(B,)``, the reward (the same as calling the reward).
        details: extra per-row values, each a tensor ``(B,)`` or a list of ``B`` items
            (e.g. a composed reward's parts, a judge's raw answers).
    """

    scores: torch.Tensor
    details: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class RewardFn(Protocol):
    """A per-image reward: ``(B, 3, H, W)`` float images in ``[0, 1]`` -> ``(B,)`` float32 scores."""

    name: str
    higher_is_better: bool
    differentiable: bool
    requires_prompt: bool

    def __call__(self, images: torch.Tensor, prompts: str | list[str] | None = None, **context: Any) -> torch.Tensor:
        ...


@runtime_checkable
class DistributionMetric(Protocol):
    """A set-level metric over a real and a generated image set (FID, KID, IS, CMMD, FD-DINOv2)."""

    name: str
    higher_is_better: bool

    def update(self, images: torch.Tensor, real: bool) -> None:
        ...

    def compute(self) -> torch.Tensor:
        ...

    def reset(self) -> None:
        ...


class Reward(nn.Module):
    """Base class of the built-in rewards: frozen, validating, float32 out.

    Subclasses set the four class attributes and implement ``score(images, prompts)`` on validated
    input (``prompts`` already expanded to a list of ``B`` strings, or ``None``). The base class never
    disables autograd: the caller decides (``torch.inference_mode()`` for RL sampling, grad on for
    reward backprop).
    """

    name: str = "reward"
    higher_is_better: bool = True
    differentiable: bool = True
    requires_prompt: bool = True
    # The keywords ``evaluate(images, prompts, **context)`` takes beside images and prompts (``reference``,
    # ``source``, ``metadata``, ...); ``None`` = any, passed through. A composition hands each keyword only to
    # the parts that take it, and refuses a keyword that no part takes.
    context_keys: frozenset[str] | None = None

    def freeze(self) -> Reward:
        """Put the module in eval mode with every parameter frozen; returns ``self``."""
        self.eval()
        self.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> Reward:
        # Rewards are always in eval mode: dropout in a reward would make scores random.
        return super().train(False)

    def forward(self, images: torch.Tensor, prompts: str | list[str] | None = None, **context: Any) -> torch.Tensor:
        """Score a batch.

        Args:
            images: float tensor ``(B, 3, H, W)`` in ``[0, 1]``.
            prompts: one string (broadcast to every image), a list of ``B`` strings, or ``None`` for
                rewards that need no prompt.

        Returns:
            float32 tensor ``(B,)`` on ``images.device``.
        """
        return self.evaluate(images, prompts, **context).scores

    def evaluate(self, images: torch.Tensor, prompts: str | list[str] | None = None, **context: Any) -> RewardOutput:
        """Like calling the reward, plus per-row details."""
        check_images(self.name, images)
        prompt_list = check_prompts(self.name, prompts, images.shape[0], self.requires_prompt)
        return self.score(images, prompt_list, **context)

    def score(self, images: torch.Tensor, prompts: list[str] | None, **context: Any) -> RewardOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement score(images, prompts)")

    def extra_repr(self) -> str:
        return f"name={self.name!r}, differentiable={self.differentiable}"
