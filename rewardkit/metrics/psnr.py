"""PSNR as a paired reward: ``metric(images, reference=ref) -> (B,)`` in dB, one value per image.

``PSNR = 10 * log10(data_range ** 2 / MSE)`` with the MSE of each image pair over all its channels and
pixels, accumulated in float64, as scikit-image ``metrics/simple_metrics.py``
``peak_signal_noise_ratio(image_true, image_test, data_range=1.0)`` computes it for one image.
torchmetrics ``functional/image/psnr.py`` gives the same per-image values only with
``dim=(1, 2, 3), reduction="none"``; its default (``dim=None``) pools one MSE over the whole batch.

``data_range`` is explicit: rewardkit images are float in ``[0, 1]``, so the default is 1.0.
Identical images have MSE 0 and score ``+inf`` (as in scikit-image); such rows get a zero gradient
rather than NaN, so one identical pair does not poison a backward pass. Elsewhere the score is
differentiable with respect to ``images``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rewardkit.metrics.paired import PairedReward
from rewardkit.precision import parse_dtype
from rewardkit.protocols import RewardOutput

__all__ = ["PSNR", "load_psnr", "DEFAULT_DATA_RANGE"]

DEFAULT_DATA_RANGE = 1.0  # rewardkit's canonical images are float in [0, 1]
DECIBELS_PER_DECADE = 10.0  # a power ratio in decibels: 10 * log10(ratio)


class PSNR(PairedReward):
    """Per-image peak signal-to-noise ratio, float32 ``(B,)`` in dB; ``+inf`` for identical images.

    ``evaluate(...)`` also returns ``details["mse"]``, the per-image mean squared error ``(B,)``.

    Args:
        data_range: peak-to-peak value range of the images (1.0 for rewardkit's ``[0, 1]`` images).
    """

    name = "psnr"
    higher_is_better = True
    differentiable = True
    requires_prompt = False

    def __init__(self, data_range: float = DEFAULT_DATA_RANGE) -> None:
        super().__init__()
        data_range = float(data_range)
        if not data_range > 0 or math.isinf(data_range):
            raise ValueError(f"psnr: data_range must be a finite number > 0 (1.0 for [0, 1] images), got {data_range}")
        self.data_range = data_range

    def score_pairs(self, images: torch.Tensor, reference: torch.Tensor) -> RewardOutput:
        if images.device.type == "mps":  # MPS has no float64
            raise ValueError("psnr: the MSE is accumulated in float64, which MPS lacks; score on CPU or CUDA")
        with torch.autocast(images.device.type, enabled=False):
            diff = images.to(torch.float64) - reference.to(torch.float64)
            mse = diff.square().mean(dim=(1, 2, 3))
            nonzero = mse > 0
            safe_mse = torch.where(nonzero, mse, torch.ones_like(mse))
            psnr = DECIBELS_PER_DECADE * torch.log10(self.data_range**2 / safe_mse)
            psnr = torch.where(nonzero, psnr, torch.full_like(psnr, math.inf))
        return RewardOutput(psnr.float(), {"mse": mse.float()})

    def extra_repr(self) -> str:
        return f"data_range={self.data_range}"


def load_psnr(weights: Any = None, device: Any = None, dtype: Any = None,
              data_range: float = DEFAULT_DATA_RANGE) -> PSNR:
    """Build the PSNR paired reward.

    Args:
        weights: must be ``None`` (PSNR has no weights).
        device: accepted for the registry contract; PSNR has no parameters and runs on the images' device.
        dtype: accepted and validated but not used: the MSE is always accumulated in float64 and the
            score returned as float32.
        data_range: value range of the inputs; 1.0 for rewardkit's ``[0, 1]`` images.
    """
    if weights is not None:
        raise ValueError("psnr: has no weights (a closed-form metric); call load('psnr') without weights=")
    parse_dtype(dtype)
    return PSNR(data_range).to(device or "cpu").freeze()
