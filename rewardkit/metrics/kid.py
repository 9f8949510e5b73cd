"""KID, the Kernel Inception Distance (Bińkowski et al., ICLR 2018), on FID-Inception pool3 features.

Unbiased MMD² with the cubic polynomial kernel ``(x·y/d + 1)³``, averaged over random subsets, in
float64 (the references compute the kernel in float32, which is good to ~3 significant digits only:
``reference/distribution_metrics.md`` §2.1). Defaults follow torch-fidelity (100 subsets of 1000,
seed 2020, population std), and ``sampling="torch-fidelity"`` draws exactly its subsets. The subset-size
policy is explicit: ``small_set="error"`` (torch-fidelity, torchmetrics) or ``"shrink"`` (clean-fid:
``min(n_real, n_fake, subset_size)``). The maths lives in ``rewardkit.metrics.kernels``.
"""

from __future__ import annotations

from typing import Any

import torch

from rewardkit.metrics.base import FeatureMetric
from rewardkit.metrics.extractor import FeatureExtractor
from rewardkit.metrics.feature_store import StoredFeatureMetric
from rewardkit.metrics.kernels import KID_SEED, KID_SUBSET_SIZE, KID_SUBSETS, kernel_inception_distance

__all__ = ["KID", "load_kid"]


class KID(StoredFeatureMetric, FeatureMetric):
    """Kernel Inception Distance; ``compute()`` -> float64 tensor ``[mean, std]`` over subsets.

    Args:
        extractor: an Inception extractor (pool3 features).
        subsets, subset_size, seed, small_set, sampling: see ``rewardkit.metrics.kernels.kernel_inception_distance``.
        **options: ``FeatureMetric`` options (batch_size, num_workers, quantize, ...).
    """

    name = "kid"
    higher_is_better = False

    def __init__(self, extractor: FeatureExtractor, *, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
                 seed: int = KID_SEED, small_set: str = "error", sampling: str = "torch-fidelity",
                 **options: Any) -> None:
        super().__init__(extractor, **options)
        self._init_store()
        self.subsets, self.subset_size, self.seed = subsets, subset_size, seed
        self.small_set, self.sampling = small_set, sampling

    def compute(self) -> torch.Tensor:
        result = kernel_inception_distance(
            self.side(True), self.side(False), subsets=self.subsets, subset_size=self.subset_size, seed=self.seed,
            small_set=self.small_set, sampling=self.sampling)
        return torch.tensor([result.mean, result.std], dtype=torch.float64)


def load_kid(weights: Any = None, device: Any = None, dtype: Any = None, *, preset: str = "clean",
             **options: Any) -> KID:
    """KID on the FID-Inception network (same ``weights`` and ``preset`` as ``load_fid``)."""
    from rewardkit.metrics.inception import load_inception

    metric = KID(load_inception(weights, preset=preset, device=device), dtype=dtype, **options)
    return metric.to(device) if device is not None else metric
