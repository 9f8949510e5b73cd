"""CMMD (Jayasumana et al., "Rethinking FID", CVPR 2024): MMD on CLIP ViT-L/14@336 image embeddings.

Biased (V-statistic) MMD² with a Gaussian RBF kernel, σ = 10, ×1000, on L2-normalised CLIP image
embeddings, computed in float64 and in row chunks (google-research/google-research ``cmmd/distance.py``).
Preprocessing (centre crop to a square, PIL bicubic to 336) is in ``rewardkit.metrics.cmmd_features``.
Unlike the reference, which batches with ``drop_remainder=True`` and silently ignores the last
``N mod 32`` images, every image counts. The reference side's mean kernel value is cached.
"""

from __future__ import annotations

from typing import Any

import torch

from rewardkit.metrics.base import FeatureMetric
from rewardkit.metrics.feature_store import StoredFeatureMetric
from rewardkit.metrics.kernels import CMMD_SCALE, CMMD_SIGMA, gaussian_kernel_mean, gaussian_mmd2_biased

__all__ = ["CMMD", "load_cmmd"]

class CMMD(StoredFeatureMetric, FeatureMetric):
    """CMMD; ``compute()`` -> 0-dim float64 tensor (lower is better)."""

    name = "cmmd"
    higher_is_better = False

    def __init__(self, extractor: Any, *, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE, **options: Any) -> None:
        super().__init__(extractor, **options)
        self._init_store()
        self.sigma, self.scale = sigma, scale
        self._k_real: tuple[int, float] | None = None  # (rows, mean K_real) cache

    def compute(self) -> torch.Tensor:
        real, fake = self.side(True), self.side(False)
        if self._k_real is None or self._k_real[0] != real.shape[0]:
            self._k_real = (real.shape[0], gaussian_kernel_mean(real, real, sigma=self.sigma))
        value = gaussian_mmd2_biased(fake, real, sigma=self.sigma, scale=self.scale, k_yy_mean=self._k_real[1])
        return torch.tensor(value, dtype=torch.float64)

    def reset(self, real: bool = True) -> None:
        super().reset(real)
        if real:
            self._k_real = None

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self._k_real = None  # the cache belonged to the rows before loading


def load_cmmd(weights: Any = None, device: Any = None, dtype: Any = None, **options: Any) -> CMMD:
    """CMMD on ``openai/clip-vit-large-patch14-336`` (or ``weights=``: an HF CLIP folder / spec)."""
    from rewardkit.metrics.cmmd_features import load_cmmd_extractor

    # The extractor owns its precision (its forward sets autocast), so it gets the dtype too.
    metric = CMMD(load_cmmd_extractor(weights, device=device, dtype=dtype), dtype=dtype, **options)
    return metric.to(device) if device is not None else metric
