"""Inception Score from classifier logits (Salimans et al. 2016), in two upstream conventions.

``IS = exp(E_x KL(p(y|x) ‖ p(y)))``, with ``p(y)`` the mean prediction of one split; reported as the
mean and std over splits. Input: the FID-Inception ``logits_unbiased`` (1008 classes, fc bias left
out), as torch-fidelity, torchmetrics and ADM use; the ``InceptionScore`` metric class extracts them.

Conventions (``reference/distribution_metrics.md`` §2.2):

* ``"torch-fidelity"`` (torch-fidelity 0.4.0 ``metric_isc.py`` ``isc_features_to_metric``): rows
  permuted by ``np.random.RandomState(2020).permutation(N)`` (``samples_shuffle=True``), then cast to
  float64, softmax / log-softmax; split ``i`` is rows ``[i·N//k, (i+1)·N//k)``; std is the population
  std (``np.std``).
* ``"torchmetrics"`` (torchmetrics 1.9.0 ``image/inception.py`` ``InceptionScore.compute``): rows permuted
  by ``torch.randperm(N)`` from the global torch RNG (unseeded upstream; here a ``torch.Generator``), splits
  by ``torch.chunk`` (``ceil(N/k)`` rows each, so possibly fewer than ``k`` splits), computed in the
  logits' dtype (float32) upstream, std Bessel-corrected (``torch.std``).

Both conventions compute in float64 here by default; ``dtype=None`` keeps the logits' dtype, which is
what torchmetrics does.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np
import torch

__all__ = ["InceptionScoreResult", "inception_score"]

IS_SPLITS = 10  # torch-fidelity defaults.py "isc_splits"; torchmetrics InceptionScore(splits=10)
IS_SEED = 2020  # torch-fidelity defaults.py "rng_seed"
IS_NUM_CLASSES = 1008  # FID-Inception "logits_unbiased" width (torch-fidelity feature_extractor_inceptionv3.py)
MIN_SAMPLES = 2  # the library-wide floor for set metrics

Convention = Literal["torch-fidelity", "torchmetrics"]


@dataclass(frozen=True, eq=False)
class InceptionScoreResult:
    """Inception Score over splits. Unpacks as ``mean, std = result``.

    Attributes:
        mean: mean of the per-split scores (>= 1, at most the number of classes).
        std: std of the per-split scores: population (``"torch-fidelity"``) or Bessel-corrected
            (``"torchmetrics"``; NaN when there is a single split, as ``torch.std`` gives).
        split_scores: tensor ``(k,)`` of per-split scores in the compute dtype, on the logits' device.
        convention: the convention used.
    """

    mean: float
    std: float
    split_scores: torch.Tensor
    convention: str

    def __iter__(self) -> Iterator[float]:
        yield self.mean
        yield self.std


def _check_logits(logits: torch.Tensor | np.ndarray, splits: int) -> torch.Tensor:
    logits = torch.as_tensor(logits)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"inception_score: expected logits (N, C) with C >= 2 (FID-Inception: C = "
                         f"{IS_NUM_CLASSES}), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"inception_score: expected float logits, got {logits.dtype}; cast with logits.float()")
    if splits < 1:
        raise ValueError(f"inception_score: splits must be >= 1, got {splits}")
    n = logits.shape[0]
    if n < max(MIN_SAMPLES, splits):
        raise ValueError(f"inception_score: {n} samples cannot fill {splits} splits (and at least {MIN_SAMPLES} "
                         f"are needed); add images or pass splits<={max(1, n)}")
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).sum())
        raise ValueError(f"inception_score: logits contain {bad} NaN/inf values; check the classifier's input")
    return logits


def _permutation(n: int, convention: Convention, seed: int,
                 generator: torch.Generator | np.random.RandomState | None) -> torch.Tensor:
    """Row order of ``convention``'s shuffle, CPU int64."""
    if convention == "torch-fidelity":
        if generator is not None and not isinstance(generator, np.random.RandomState):
            raise TypeError(f"convention='torch-fidelity' shuffles with a numpy RandomState, got generator of "
                            f"type {type(generator).__name__}; or pass seed= only")
        rng = np.random.RandomState(seed) if generator is None else generator
        return torch.from_numpy(rng.permutation(n))
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"convention='torchmetrics' shuffles with a torch.Generator, got generator of type "
                        f"{type(generator).__name__}; or pass seed= only")
    gen = torch.Generator().manual_seed(seed) if generator is None else generator
    return torch.randperm(n, generator=gen, device=gen.device).cpu()


def _split_bounds(n: int, splits: int, convention: Convention) -> list[tuple[int, int]]:
    """Row ranges of the splits: ``i·N//k`` (torch-fidelity) or ``torch.chunk``'s ``ceil(N/k)`` rows."""
    if convention == "torch-fidelity":
        return [(i * n // splits, (i + 1) * n // splits) for i in range(splits)]
    size = math.ceil(n / splits)
    bounds = [(start, min(start + size, n)) for start in range(0, n, size)]
    if len(bounds) != splits:
        warnings.warn(f"inception_score: torch.chunk splits {n} rows into {len(bounds)} chunks of {size}, not "
                      f"{splits} (torchmetrics behaves the same); use convention='torch-fidelity' for exactly "
                      f"{splits} splits", RuntimeWarning, stacklevel=3)
    return bounds


def inception_score(
    logits: torch.Tensor | np.ndarray,
    *,
    splits: int = IS_SPLITS,
    convention: Convention = "torch-fidelity",
    shuffle: bool = True,
    seed: int = IS_SEED,
    generator: torch.Generator | np.random.RandomState | None = None,
    dtype: torch.dtype | None = torch.float64,
) -> InceptionScoreResult:
    """Inception Score (mean, std over splits) of ``N`` images from their classifier logits.

    Order of operations (both conventions, as upstream): shuffle rows, cast to ``dtype``, ``p =
    softmax``, ``log p = log_softmax``; per split ``q = mean(p)``, score ``exp(mean_rows Σ_c p (log p −
    log q))``. With the defaults the result reproduces torch-fidelity's ``isc_features_to_metric(logits)``.

    Args:
        logits: ``(N, C)`` real-valued logits (FID-Inception ``logits_unbiased``: C = 1008, no fc bias).
        splits: number of splits ``k`` (N >= k).
        convention: ``"torch-fidelity"`` or ``"torchmetrics"`` (shuffle RNG, split boundaries, std; see
            the module docstring).
        shuffle: permute the rows before splitting (both references do by default).
        seed: seeds the shuffle when ``generator`` is None: ``np.random.RandomState(seed)`` for
            ``"torch-fidelity"``, ``torch.Generator().manual_seed(seed)`` for ``"torchmetrics"``.
        generator: the RNG to shuffle with instead: a ``np.random.RandomState`` for ``"torch-fidelity"``,
            a ``torch.Generator`` for ``"torchmetrics"`` (``torch.default_generator`` after
            ``torch.manual_seed(s)`` reproduces torchmetrics' own draw).
        dtype: compute dtype (default float64, torch-fidelity's); None keeps the logits' dtype
            (torchmetrics computes in the feature dtype).

    Returns:
        ``InceptionScoreResult`` (unpacks as ``mean, std``).

    Raises:
        ValueError: not ``(N, C)``, N < 2 or N < splits, NaN/inf logits, unknown convention.
        TypeError: a generator of the other convention's kind.
    """
    if convention not in ("torch-fidelity", "torchmetrics"):
        raise ValueError(f"inception_score: convention must be 'torch-fidelity' or 'torchmetrics', got {convention!r}")
    logits = _check_logits(logits, splits)
    n = logits.shape[0]
    if shuffle:
        logits = logits[_permutation(n, convention, seed, generator).to(logits.device)]
    logits = logits if dtype is None else logits.to(dtype)
    prob = logits.softmax(dim=1)
    log_prob = logits.log_softmax(dim=1)
    scores = []
    for start, stop in _split_bounds(n, splits, convention):
        p, log_p = prob[start:stop], log_prob[start:stop]
        log_q = p.mean(dim=0, keepdim=True).log()
        scores.append((p * (log_p - log_q)).sum(dim=1).mean().exp())
    split_scores = torch.stack(scores)
    if convention == "torch-fidelity":
        std = float(split_scores.std(correction=0))
    else:
        std = float(split_scores.std(correction=1)) if len(scores) > 1 else float("nan")
    return InceptionScoreResult(mean=float(split_scores.mean()), std=std, split_scores=split_scores,
                                convention=convention)
