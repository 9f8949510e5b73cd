"""Inception Score (Salimans et al. 2016) on the FID-Inception network's 1008 logits without bias.

IS = exp(E_x KL(p(y|x) ‖ p(y))), with p(y) estimated per split; reported as ``[mean, std]`` over splits.
Two conventions exist and are selectable (``reference/distribution_metrics.md`` §2.2):

* ``"torch-fidelity"`` (default): shuffle with ``RandomState(seed)``, split boundaries ``i·N//splits``,
  population std — torch-fidelity 0.4 ``isc_features_to_metric``.
* ``"torchmetrics"``: ``torch.chunk`` splits, Bessel-corrected std — torchmetrics ``InceptionScore``.

Logits are ``pool3 @ fc.weightᵀ`` without the fc bias ("logits_unbiased"), as torch-fidelity,
torchmetrics and OpenAI's ADM evaluator use. IS needs generated images only.
"""

from __future__ import annotations

from typing import Any

import torch

from rewardkit.metrics.base import FeatureMetric
from rewardkit.metrics.feature_store import StoredFeatureMetric
from rewardkit.metrics.inception_score_math import IS_SPLITS, inception_score

__all__ = ["InceptionScore", "load_inception_score"]


class InceptionScore(StoredFeatureMetric, FeatureMetric):
    """Inception Score; ``update(images, real=False)``; ``compute()`` -> float64 tensor ``[mean, std]``."""

    name = "inception-score"
    higher_is_better = True

    def __init__(self, extractor: Any, *, splits: int = IS_SPLITS, convention: str = "torch-fidelity",
                 shuffle: bool = True, seed: int = 2020, **options: Any) -> None:
        super().__init__(extractor, **options)
        self._init_store()
        self.splits, self.convention, self.shuffle, self.seed = splits, convention, shuffle, seed

    def _check_update(self, real: bool) -> None:
        if real:
            raise ValueError(f"{self.name}: the Inception Score uses generated images only; call update(images, real=False)")
        super()._check_update(real)

    def _rows_of(self, features: torch.Tensor) -> torch.Tensor:
        """``features``: pool3 ``(B, 2048)`` (turned into logits here) or logits ``(B, 1008)``."""
        if features.shape[-1] == self.extractor.feature_dim:
            with torch.inference_mode():
                features = self.extractor.logits_unbiased(features.to(self.device)).float().cpu()
        return features

    def compute(self) -> torch.Tensor:
        mean, std = inception_score(self.side(False), splits=self.splits, convention=self.convention,
                                    shuffle=self.shuffle, seed=self.seed)
        return torch.tensor([mean, std], dtype=torch.float64)


def load_inception_score(weights: Any = None, device: Any = None, dtype: Any = None, *, preset: str = "clean",
                         **options: Any) -> InceptionScore:
    """IS on the FID-Inception network. The default preset is FID's (``clean``) so one feature pass serves
    FID, KID and IS; ``preset="torch-fidelity"`` reproduces torch-fidelity's (and the TF code's) resize."""
    from rewardkit.metrics.inception import load_inception

    metric = InceptionScore(load_inception(weights, preset=preset, device=device), dtype=dtype, **options)
    return metric.to(device) if device is not None else metric
