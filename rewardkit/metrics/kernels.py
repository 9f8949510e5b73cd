"""Kernel two-sample statistics on feature tensors: KID (polynomial, unbiased MMD²) and CMMD (Gaussian, biased).

Pure maths on ``(N, D)`` feature tensors, computed in float64 on the features' device; the
``DistributionMetric`` classes in ``kid.py`` / ``cmmd.py`` extract the features and call these.

Sources:

* KID: Bińkowski et al. 2018, "Demystifying MMD GANs" (cubic polynomial kernel ``(xᵀy/d + 1)³``,
  unbiased MMD² averaged over random subsets). Defaults, subset draws and the population std follow
  torch-fidelity 0.4.0 ``metric_kid.py`` (``kid_features_to_metric``, ``mmd2``) and ``defaults.py``;
  the ``"torchmetrics"`` draws follow torchmetrics 1.9.0 ``image/kid.py`` (``torch.randperm`` per side);
  ``small_set="shrink"`` follows clean-fid 0.1.35 ``fid.py`` ``kernel_distance`` (``min(n1, n2, 1000)``).
* CMMD: Jayasumana et al., CVPR 2024, "Rethinking FID"; google-research ``cmmd/distance.py``
  (Gaussian RBF with ``_SIGMA = 10``, minimum-variance / biased MMD² with diagonals included,
  multiplied by ``_SCALE = 1000``).

Numerics: the references build their kernels in float32 (torch-fidelity: numpy float32, torchmetrics:
the feature dtype, CMMD: JAX's default float32), which limits KID to about 3-4 significant digits;
here every kernel is float64, so results agree with them to their float32 rounding only (the tests
state the measured deviation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

import numpy as np
import torch

__all__ = [
    "KIDResult",
    "gaussian_kernel_mean",
    "gaussian_mmd2_biased",
    "kernel_inception_distance",
    "mmd2_unbiased",
    "polynomial_kernel",
]

KID_SUBSETS = 100  # torch-fidelity defaults.py "kid_subsets"; torchmetrics KernelInceptionDistance(subsets=100)
KID_SUBSET_SIZE = 1000  # torch-fidelity defaults.py "kid_subset_size"; clean-fid max_subset_size
KID_SEED = 2020  # torch-fidelity defaults.py "rng_seed"
KID_DEGREE = 3  # torch-fidelity defaults.py "kid_kernel_poly_degree"
KID_COEF0 = 1.0  # torch-fidelity defaults.py "kid_kernel_poly_coef0"
CMMD_SIGMA = 10.0  # google-research cmmd/distance.py _SIGMA
CMMD_SCALE = 1000.0  # google-research cmmd/distance.py _SCALE
MIN_SAMPLES = 2  # an unbiased MMD² needs m(m-1) > 0; the library-wide floor for set metrics
# Largest float64 kernel block held at once (2**24 elements = 128 MiB): bounds the CMMD chunks, and
# the full real/fake kernels KID precomputes when that is cheaper than one kernel per subset.
MAX_KERNEL_ELEMENTS = 2**24

SmallSet = Literal["error", "shrink"]
Sampling = Literal["torch-fidelity", "torchmetrics"]


@dataclass(frozen=True, eq=False)
class KIDResult:
    """KID over random subsets. Unpacks as ``mean, std = result``.

    Attributes:
        mean: mean of the per-subset unbiased MMD² values (may be slightly negative).
        std: population standard deviation (``ddof=0``, like torch-fidelity's ``np.std`` and
            torchmetrics' ``std(unbiased=False)``) of the per-subset values.
        subset_size: samples drawn per side and subset (after ``small_set="shrink"``).
        subsets: number of subsets.
        values: float64 tensor ``(subsets,)`` of the per-subset MMD² values, on the features' device.
    """

    mean: float
    std: float
    subset_size: int
    subsets: int
    values: torch.Tensor = field(repr=False)

    def __iter__(self) -> Iterator[float]:
        yield self.mean
        yield self.std


def _features(x: torch.Tensor | np.ndarray, side: str, min_rows: int = MIN_SAMPLES) -> torch.Tensor:
    """Validate a ``(N, D)`` feature matrix (returned as a tensor, dtype unchanged)."""
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"{side} features: expected a 2-D (N, D) tensor, got shape {tuple(x.shape)}; "
                         "flatten the extractor output with feats.reshape(len(feats), -1)")
    if x.shape[0] < min_rows:
        raise ValueError(f"{side} features: need at least {min_rows} samples, got {x.shape[0]}; "
                         "add more images on that side")
    if not x.is_floating_point():
        raise ValueError(f"{side} features: expected a float tensor, got {x.dtype}; cast with feats.float()")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{side} features contain {bad} NaN/inf values; check the feature extractor's input")
    return x


def _check_same_width(x: torch.Tensor, y: torch.Tensor, names: str = "x and y") -> None:
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{names} features differ in width: {x.shape[1]} vs {y.shape[1]}; "
                         "extract both sides with the same extractor and layer")


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int = KID_DEGREE, gamma: float | None = None,
                      coef0: float = KID_COEF0) -> torch.Tensor:
    """Polynomial kernel ``(γ·x yᵀ + c)^degree`` in float64.

    Args:
        x: ``(M, D)`` features.
        y: ``(N, D)`` features on the same device.
        degree: kernel degree (KID: 3).
        gamma: scale; ``None`` means ``1 / D`` (Bińkowski et al.; every reference).
        coef0: additive constant ``c`` (KID: 1).

    Returns:
        float64 tensor ``(M, N)``.
    """
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    gram = x.to(torch.float64) @ y.to(torch.float64).T
    return (gram.mul_(gamma).add_(coef0)).pow_(degree)


def mmd2_unbiased(k_xx: torch.Tensor, k_yy: torch.Tensor, k_xy: torch.Tensor) -> float:
    """Unbiased MMD² from kernel matrices (diagonals of ``k_xx`` and ``k_yy`` dropped, all of ``k_xy`` kept).

    ``Σ_{i≠j} k_xx/(m(m-1)) + Σ_{i≠j} k_yy/(n(n-1)) - 2 Σ k_xy/(m n)``; for ``m = n`` this is torch-fidelity's
    ``mmd2(K_XX, K_XY, K_YY, mmd_est="unbiased")`` and torchmetrics' ``maximum_mean_discrepancy(k_xx, k_xy,
    k_yy)``. Note the argument order: ``k_yy`` comes second here, ``k_xy`` second in both references.

    Args:
        k_xx: ``(m, m)`` kernel of the first sample with itself, m >= 2.
        k_yy: ``(n, n)`` kernel of the second sample with itself, n >= 2.
        k_xy: ``(m, n)`` cross kernel.

    Returns:
        The estimate as a Python float (may be slightly negative when the samples are alike).
    """
    m, n = k_xx.shape[0], k_yy.shape[0]
    if k_xx.shape != (m, m) or k_yy.shape != (n, n) or k_xy.shape != (m, n):
        raise ValueError(f"mmd2_unbiased: expected k_xx (m, m), k_yy (n, n), k_xy (m, n), got "
                         f"{tuple(k_xx.shape)}, {tuple(k_yy.shape)}, {tuple(k_xy.shape)}; check the argument order")
    if min(m, n) < MIN_SAMPLES:
        raise ValueError(f"mmd2_unbiased: needs at least {MIN_SAMPLES} samples a side, got m={m}, n={n}")
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * k_xy.sum() / (m * n))


def _subset_size(n_real: int, n_fake: int, subset_size: int, small_set: SmallSet) -> int:
    if small_set not in ("error", "shrink"):
        raise ValueError(f"small_set must be 'error' or 'shrink', got {small_set!r}")
    if subset_size < MIN_SAMPLES:
        raise ValueError(f"subset_size must be >= {MIN_SAMPLES} for the unbiased MMD², got {subset_size}")
    if small_set == "shrink":
        return min(n_real, n_fake, subset_size)
    if min(n_real, n_fake) < subset_size:
        raise ValueError(
            f"KID subset_size={subset_size} is larger than a side (real: {n_real}, fake: {n_fake} samples); "
            f"pass subset_size<={min(n_real, n_fake)}, or small_set='shrink' to use min(n_real, n_fake, "
            "subset_size) like clean-fid")
    return subset_size


def _sampler(sampling: Sampling, seed: int,
             generator: torch.Generator | np.random.RandomState | None) -> Callable[[int, int], torch.Tensor]:
    """``draw(n, m)`` -> ``m`` distinct indices in ``[0, n)``, CPU int64, following ``sampling``'s RNG."""
    if sampling == "torch-fidelity":
        if generator is not None and not isinstance(generator, np.random.RandomState):
            raise TypeError(f"sampling='torch-fidelity' takes a numpy RandomState as generator, got "
                            f"{type(generator).__name__}; or pass seed= only")
        rng = np.random.RandomState(seed) if generator is None else generator
        return lambda n, m: torch.from_numpy(rng.choice(n, m, replace=False))
    if sampling == "torchmetrics":
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"sampling='torchmetrics' takes a torch.Generator as generator, got "
                            f"{type(generator).__name__}; or pass seed= only")
        gen = torch.Generator().manual_seed(seed) if generator is None else generator
        return lambda n, m: torch.randperm(n, generator=gen, device=gen.device)[:m].cpu()
    raise ValueError(f"sampling must be 'torch-fidelity' or 'torchmetrics', got {sampling!r}")


def kernel_inception_distance(
    real: torch.Tensor | np.ndarray,
    fake: torch.Tensor | np.ndarray,
    *,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = KID_SEED,
    small_set: SmallSet = "error",
    sampling: Sampling = "torch-fidelity",
    generator: torch.Generator | np.random.RandomState | None = None,
    degree: int = KID_DEGREE,
    gamma: float | None = None,
    coef0: float = KID_COEF0,
) -> KIDResult:
    """Kernel Inception Distance: unbiased polynomial-kernel MMD² averaged over random subsets (float64).

    Each subset draws ``subset_size`` distinct rows from ``real`` and then from ``fake``. With
    ``sampling="torch-fidelity"`` the draws are ``RandomState(seed).choice(n, m, replace=False)``,
    real first, exactly as torch-fidelity's ``kid_features_to_metric(features_1=real, features_2=fake)``;
    to reproduce ``calculate_metrics(input1=generated, input2=reference)`` pass the generated features as
    ``real`` (the statistic is symmetric, only the draws follow the argument order). clean-fid's
    ``kernel_distance(feats1, feats2)`` draws ``feats2`` first from the global numpy RNG. With
    ``sampling="torchmetrics"`` each side is ``torch.randperm(n, generator=...)[:m]``, as torchmetrics'
    ``KernelInceptionDistance.compute`` does with the global torch RNG (pass
    ``generator=torch.default_generator`` after ``torch.manual_seed`` to reproduce it).

    Args:
        real: ``(N_real, D)`` features (Inception pool3: D = 2048, non-negative), any float dtype.
        fake: ``(N_fake, D)`` features on the same device.
        subsets: number of subsets (>= 1).
        subset_size: samples per side and subset (>= 2).
        seed: seeds the subset RNG when ``generator`` is None.
        small_set: ``"error"`` raises when a side has fewer than ``subset_size`` samples (torch-fidelity,
            torchmetrics); ``"shrink"`` uses ``min(n_real, n_fake, subset_size)`` (clean-fid, dgm-eval).
        sampling: which library's subset draws to reproduce (see above).
        generator: an RNG to draw from instead of a fresh one seeded with ``seed``: a
            ``np.random.RandomState`` for ``"torch-fidelity"``, a ``torch.Generator`` for ``"torchmetrics"``.
        degree, gamma, coef0: polynomial kernel ``(γ xᵀy + coef0)^degree``; ``gamma=None`` is ``1/D``.

    Returns:
        ``KIDResult`` (unpacks as ``mean, std``; std is the population std over subsets).

    Raises:
        ValueError: fewer than 2 samples on a side, a side smaller than ``subset_size`` with
            ``small_set="error"``, NaN/inf features (the message names the side), mismatched widths.
    """
    real, fake = _features(real, "real"), _features(fake, "fake")
    _check_same_width(real, fake, "real and fake")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    n_real, n_fake = real.shape[0], fake.shape[0]
    m = _subset_size(n_real, n_fake, subset_size, small_set)
    draw = _sampler(sampling, seed, generator)
    fake = fake.to(real.device)

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return polynomial_kernel(a, b, degree=degree, gamma=gamma, coef0=coef0)

    full_elements = n_real * n_real + n_fake * n_fake + n_real * n_fake
    precompute = full_elements <= MAX_KERNEL_ELEMENTS and full_elements < subsets * 3 * m * m
    if precompute:  # one kernel per pair of sides, then every subset is a gather (same values, fewer flops)
        k_rr, k_ff, k_rf = kernel(real, real), kernel(fake, fake), kernel(real, fake)
    values = torch.empty(subsets, dtype=torch.float64)
    for i in range(subsets):
        idx_r = draw(n_real, m).to(real.device)
        idx_f = draw(n_fake, m).to(real.device)
        if precompute:
            values[i] = mmd2_unbiased(k_rr[idx_r][:, idx_r], k_ff[idx_f][:, idx_f], k_rf[idx_r][:, idx_f])
        else:
            x, y = real[idx_r], fake[idx_f]
            values[i] = mmd2_unbiased(kernel(x, x), kernel(y, y), kernel(x, y))
    return KIDResult(mean=float(values.mean()), std=float(values.std(correction=0)), subset_size=m, subsets=subsets,
                     values=values.to(real.device))


def _rbf_block(x: torch.Tensor, x_sq: torch.Tensor, y: torch.Tensor, y_sq: torch.Tensor,
               gamma: float) -> torch.Tensor:
    """``exp(-γ‖x_i - y_j‖²)`` for float64 blocks, distances by expansion (as cmmd/distance.py), clamped at 0."""
    sq = torch.addmm(x_sq[:, None] + y_sq[None, :], x, y.T, alpha=-2.0).clamp_(min=0.0)
    return sq.mul_(-gamma).exp_()


def gaussian_kernel_mean(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray | None = None, *,
                         sigma: float = CMMD_SIGMA, chunk_rows: int | None = None) -> float:
    """Mean of the Gaussian kernel ``exp(-‖x_i - y_j‖²/(2σ²))`` over all pairs, diagonal included (float64).

    Computed in row chunks so that only ``chunk_rows × N`` kernel values exist at once (30k × 30k needs
    about 128 MiB instead of 7 GiB); with ``y=None`` (or ``y is x``) the kernel of ``x`` with itself is
    summed over the upper triangle only (half the work). Cache ``gaussian_kernel_mean(ref)`` for the reference side and
    pass it to ``gaussian_mmd2_biased(..., k_yy_mean=...)``.

    Args:
        x: ``(M, D)`` embeddings (CMMD: L2-normalised CLIP ViT-L/14-336, D = 768).
        y: ``(N, D)`` embeddings, or None for ``x`` with itself.
        sigma: kernel bandwidth (CMMD: 10).
        chunk_rows: rows per block; None picks ``MAX_KERNEL_ELEMENTS // N``.

    Returns:
        The mean as a Python float in ``(0, 1]``.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    sym = y is None or y is x  # one set with itself: sum the upper triangle only
    x = _features(x, "x", min_rows=1).to(torch.float64)
    y = x if sym else _features(y, "y", min_rows=1).to(device=x.device, dtype=torch.float64)
    _check_same_width(x, y)
    gamma = 1.0 / (2.0 * sigma * sigma)
    x_sq, y_sq = (x * x).sum(1), (y * y).sum(1)
    rows = chunk_rows or max(1, MAX_KERNEL_ELEMENTS // y.shape[0])
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], rows):
        stop = min(start + rows, x.shape[0])
        if sym:  # block (rows × [start:]) covers its diagonal square once and the rest twice (symmetry)
            block = _rbf_block(x[start:stop], x_sq[start:stop], y[start:], y_sq[start:], gamma)
            total += block[:, : stop - start].sum() + 2.0 * block[:, stop - start:].sum()
        else:
            total += _rbf_block(x[start:stop], x_sq[start:stop], y, y_sq, gamma).sum()
    return float(total) / (x.shape[0] * y.shape[0])


def gaussian_mmd2_biased(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, sigma: float = CMMD_SIGMA,
                         scale: float = CMMD_SCALE, *, k_yy_mean: float | None = None,
                         chunk_rows: int | None = None) -> float:
    """CMMD distance: ``scale · (mean K_xx + mean K_yy − 2 mean K_xy)`` with a Gaussian RBF kernel (float64).

    The minimum-variance (biased, V-statistic) estimator of google-research ``cmmd/distance.py``:
    diagonals included, σ = 10, ×1000. Sides may differ in size.

    Args:
        x: ``(M, D)`` embeddings of the evaluated images (M >= 2).
        y: ``(N, D)`` embeddings of the reference images (N >= 2).
        sigma: kernel bandwidth.
        scale: output multiplier.
        k_yy_mean: cached ``gaussian_kernel_mean(y, sigma=sigma)``; skips the N × N term.
        chunk_rows: rows per kernel block (see ``gaussian_kernel_mean``).

    Returns:
        The distance as a Python float (>= 0 up to rounding).
    """
    x, y = _features(x, "x"), _features(y, "y")
    _check_same_width(x, y)
    if k_yy_mean is None:
        k_yy_mean = gaussian_kernel_mean(y, sigma=sigma, chunk_rows=chunk_rows)
    elif not (math.isfinite(k_yy_mean) and 0.0 < k_yy_mean <= 1.0):
        raise ValueError(f"k_yy_mean must be a cached gaussian_kernel_mean(y) in (0, 1], got {k_yy_mean}")
    k_xx_mean = gaussian_kernel_mean(x, sigma=sigma, chunk_rows=chunk_rows)
    k_xy_mean = gaussian_kernel_mean(x, y, sigma=sigma, chunk_rows=chunk_rows)
    return scale * (k_xx_mean + k_yy_mean - 2.0 * k_xy_mean)
