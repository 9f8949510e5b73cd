"""Parity and error tests for rewardkit.metrics.kernels (KID, CMMD maths) and inception_score_math (IS).

References, called on the same features: torch-fidelity 0.4.0 (``kid_features_to_metric``, ``mmd2``,
``isc_features_to_metric``), torchmetrics 1.9.0 (``KernelInceptionDistance`` / ``InceptionScore`` with an
``nn.Identity`` feature module so the "images" passed to ``update`` are the features themselves, plus
``poly_mmd`` / ``poly_kernel`` / ``maximum_mean_discrepancy``), clean-fid 0.1.35 ``kernel_distance``, and
direct float64 formulas. The references build KID kernels in float32 where given float32 features; fed
float64 features they run in float64 and must agree to rounding, which proves the subset draws identical.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from rewardkit.metrics.inception_score_math import inception_score
from rewardkit.metrics.kernels import (
    gaussian_kernel_mean,
    gaussian_mmd2_biased,
    kernel_inception_distance,
    mmd2_unbiased,
    polynomial_kernel,
)

F64_RTOL = 1e-10  # float64 on both sides: only summation order differs
# float32 reference kernels vs float64 on 1000×2048 subsets: per-subset |Δ| up to 3.7e-4 of the value
# (4e-5 to 3.7e-4 over 3 seeds). The std's error is that same absolute noise (the std itself is ~1 % of the
# mean here), so it is bounded relative to the mean, not to the std.
KID_F32_RTOL = 1e-3
IS_F32_RTOL = 1e-5  # torchmetrics' float32 IS vs float64: measured 2e-8 (mean) and 5e-7 (std) relative
# CMMD's reference runs in JAX float32; emulated in numpy float32 it is off by 7e-5 absolute on a distance
# of 0.061 here (1.7e-4 on another draw): the kernel means are ~0.99 and cancel, so float32 CMMD is good to
# about 3 decimals, the precision the reference prints.
CMMD_F32_ATOL = 1e-3


def _pool_features(n: int, d: int, shift: float, seed: int) -> torch.Tensor:
    """Non-negative, right-skewed float32 features like Inception pool3 (log-normal, mean ≈ 0.3)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) * 0.6 + shift).exp().mul(0.25)


def _clip_embeddings(n: int, shift: float, seed: int, d: int = 768) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(d, generator=torch.Generator().manual_seed(99))
    return nn.functional.normalize(torch.randn(n, d, generator=g) + shift * direction, dim=1)


def _tf_kid(real: torch.Tensor, fake: torch.Tensor, **kwargs: int) -> tuple[float, float]:
    from torch_fidelity.metric_kid import kid_features_to_metric

    out = kid_features_to_metric(real, fake, verbose=False, **kwargs)
    return out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"]


# ---------------------------------------------------------------- kernels and the MMD estimator


def test_polynomial_kernel_closed_form() -> None:
    x, y = _pool_features(7, 5, 0.0, 0).double(), _pool_features(4, 5, 0.1, 1).double()
    xn, yn = x.numpy(), y.numpy()
    expected = np.array([[(np.dot(a, b) / 5 + 1.0) ** 3 for b in yn] for a in xn])
    assert polynomial_kernel(x, y).dtype == torch.float64
    np.testing.assert_allclose(polynomial_kernel(x.float(), y.float()).numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(polynomial_kernel(x, y).numpy(), expected, rtol=1e-13)
    custom = np.array([[(0.3 * np.dot(a, b) + 2.0) ** 2 for b in yn] for a in xn])
    np.testing.assert_allclose(polynomial_kernel(x, y, degree=2, gamma=0.3, coef0=2.0).numpy(), custom, rtol=1e-13)


def test_mmd2_unbiased_matches_references() -> None:
    from torch_fidelity.metric_kid import mmd2
    from torchmetrics.image.kid import maximum_mean_discrepancy

    x, y = _pool_features(50, 16, 0.0, 2).double(), _pool_features(50, 16, 0.2, 3).double()
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    ours = mmd2_unbiased(k_xx, k_yy, k_xy)
    kxx, kyy, kxy = k_xx.numpy(), k_yy.numpy(), k_xy.numpy()
    off = ~np.eye(50, dtype=bool)
    direct = kxx[off].mean() + kyy[off].mean() - 2 * kxy.mean()  # Σ_{i≠j}/(m(m-1)), all m² of K_xy
    assert ours == pytest.approx(direct, rel=F64_RTOL)
    assert ours == pytest.approx(float(mmd2(kxx, kxy, kyy)), rel=F64_RTOL)  # note: (K_XX, K_XY, K_YY) order
    assert ours == pytest.approx(float(maximum_mean_discrepancy(k_xx, k_xy, k_yy)), rel=F64_RTOL)
    with pytest.raises(ValueError, match="argument order"):
        mmd2_unbiased(k_xx, k_xy[:, :10], k_yy)


# ---------------------------------------------------------------- KID against the reference packages


def test_kid_matches_torch_fidelity_draws_exactly_in_float64() -> None:
    real, fake = _pool_features(300, 64, 0.0, 4).double(), _pool_features(280, 64, 0.05, 5).double()
    ours = kernel_inception_distance(real, fake, subsets=10, subset_size=100, seed=7)
    ref_mean, ref_std = _tf_kid(real, fake, kid_subsets=10, kid_subset_size=100, rng_seed=7)
    assert ours.mean == pytest.approx(ref_mean, rel=F64_RTOL)
    assert ours.std == pytest.approx(ref_std, rel=F64_RTOL)
    assert (ours.subsets, ours.subset_size, ours.values.shape) == (10, 100, (10,))
    # the same draws from a caller's RandomState
    again = kernel_inception_distance(real, fake, subsets=10, subset_size=100, generator=np.random.RandomState(7))
    assert tuple(again) == tuple(ours)


def test_kid_matches_torch_fidelity_float32_2048d() -> None:
    real, fake = _pool_features(1200, 2048, 0.0, 6), _pool_features(1100, 2048, 0.05, 7)
    mean, std = kernel_inception_distance(real, fake, subsets=3)  # defaults: subset_size 1000, seed 2020
    ref_mean, ref_std = _tf_kid(real, fake, kid_subsets=3)
    assert mean == pytest.approx(ref_mean, rel=KID_F32_RTOL)
    assert abs(std - ref_std) <= KID_F32_RTOL * abs(ref_mean)


def test_kid_matches_torchmetrics_class_with_its_global_rng() -> None:
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = _pool_features(260, 64, 0.0, 8), _pool_features(240, 64, 0.05, 9)
    for dtype, rtol in ((torch.float64, F64_RTOL), (torch.float32, KID_F32_RTOL)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "will save all extracted features in buffer"
            metric = KernelInceptionDistance(feature=nn.Identity(), subsets=10, subset_size=100)
        metric.update(real.to(dtype), real=True)
        metric.update(fake.to(dtype), real=False)
        torch.manual_seed(11)
        ref_mean, ref_std = (float(v) for v in metric.compute())
        torch.manual_seed(11)
        mean, std = kernel_inception_distance(real, fake, subsets=10, subset_size=100, sampling="torchmetrics",
                                              generator=torch.default_generator)
        assert mean == pytest.approx(ref_mean, rel=rtol)
        assert abs(std - ref_std) <= rtol * abs(ref_mean)


def test_kid_one_subset_matches_torchmetrics_poly_mmd() -> None:
    from torchmetrics.image.kid import poly_mmd

    real, fake = _pool_features(1000, 2048, 0.0, 10), _pool_features(1000, 2048, 0.05, 11)
    # one subset of the whole set: a permutation of all rows, which leaves the MMD unchanged
    ours = kernel_inception_distance(real, fake, subsets=1)
    assert ours.std == 0.0
    assert ours.mean == pytest.approx(float(poly_mmd(real, fake)), rel=KID_F32_RTOL)
    assert ours.mean == pytest.approx(float(poly_mmd(real.double(), fake.double())), rel=F64_RTOL)


def test_kid_shrink_matches_clean_fid_kernel_distance() -> None:
    from cleanfid.fid import kernel_distance

    feats1, feats2 = _pool_features(300, 64, 0.0, 12).double(), _pool_features(250, 64, 0.05, 13).double()
    np.random.seed(5)  # clean-fid draws from numpy's global RNG, feats2 first
    ref = kernel_distance(feats1.numpy(), feats2.numpy(), num_subsets=10, max_subset_size=1000)
    ours = kernel_inception_distance(feats2, feats1, subsets=10, small_set="shrink", seed=5)
    assert ours.subset_size == 250
    assert ours.mean == pytest.approx(ref, rel=F64_RTOL)


def test_kid_precomputed_kernels_equal_per_subset_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    import rewardkit.metrics.kernels as kernels

    real, fake = _pool_features(120, 32, 0.0, 16), _pool_features(110, 32, 0.1, 17)
    gathered = kernel_inception_distance(real, fake, subsets=8, subset_size=50)  # full kernels, then gathers
    monkeypatch.setattr(kernels, "MAX_KERNEL_ELEMENTS", 0)
    per_subset = kernel_inception_distance(real, fake, subsets=8, subset_size=50)
    torch.testing.assert_close(gathered.values, per_subset.values, rtol=1e-12, atol=0.0)


def test_kid_seeding_and_errors() -> None:
    real, fake = _pool_features(40, 8, 0.0, 14), _pool_features(30, 8, 0.1, 15)
    a = kernel_inception_distance(real, fake, subsets=5, subset_size=10, seed=1)
    assert torch.equal(a.values, kernel_inception_distance(real, fake, subsets=5, subset_size=10, seed=1).values)
    assert not torch.equal(a.values, kernel_inception_distance(real, fake, subsets=5, subset_size=10, seed=2).values)
    with pytest.raises(ValueError, match=r"subset_size<=30.*small_set='shrink'"):
        kernel_inception_distance(real, fake, subset_size=1000)
    assert kernel_inception_distance(real, fake, subsets=2, small_set="shrink").subset_size == 30
    with pytest.raises(ValueError, match="at least 2 samples"):
        kernel_inception_distance(real, fake[:1], small_set="shrink")
    bad = fake.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="fake features contain 1 NaN"):
        kernel_inception_distance(real, bad, subset_size=10)
    with pytest.raises(ValueError, match="differ in width"):
        kernel_inception_distance(real, fake[:, :4], subset_size=10)
    with pytest.raises(TypeError, match="RandomState"):
        kernel_inception_distance(real, fake, subset_size=10, generator=torch.Generator())
    with pytest.raises(ValueError, match="subset_size must be >= 2"):
        kernel_inception_distance(real, fake, subset_size=1)


# ---------------------------------------------------------------- Inception Score


def _logits(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1008, generator=g) * 3.0


@pytest.mark.parametrize("shuffle", [True, False])
def test_inception_score_matches_torch_fidelity(shuffle: bool) -> None:
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = _logits(1005, 20)  # N % 10 != 0: splits alternate 100/101 rows
    ref = isc_features_to_metric(logits, splits=10, shuffle=shuffle, rng_seed=2020)
    ours = inception_score(logits, shuffle=shuffle)
    assert ours.mean == pytest.approx(ref["inception_score_mean"], rel=1e-12)
    assert ours.std == pytest.approx(ref["inception_score_std"], rel=1e-12)


def test_inception_score_matches_torchmetrics_class() -> None:
    """Calls torchmetrics' own ``InceptionScore`` (``nn.Identity`` feature module, so update() takes logits)."""
    from torchmetrics.image.inception import InceptionScore

    logits = _logits(1005, 21)  # torch.chunk: 9 × 101 rows + 96
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        metric = InceptionScore(feature=nn.Identity(), splits=10)
    metric.update(logits)
    torch.manual_seed(3)
    ref_mean, ref_std = (float(v) for v in metric.compute())
    for dtype, rtol in ((None, 1e-6), (torch.float64, IS_F32_RTOL)):  # None = its float32 arithmetic
        torch.manual_seed(3)
        ours = inception_score(logits, convention="torchmetrics", generator=torch.default_generator, dtype=dtype)
        assert ours.mean == pytest.approx(ref_mean, rel=rtol)
        assert ours.std == pytest.approx(ref_std, rel=rtol)
    fidelity = inception_score(logits, shuffle=False)
    bessel = inception_score(logits, convention="torchmetrics", shuffle=False)
    assert fidelity.std != pytest.approx(bessel.std, rel=1e-3)  # different boundaries and std conventions


def test_inception_score_torch_chunk_fewer_splits_like_torchmetrics() -> None:
    from torchmetrics.image.inception import InceptionScore

    logits = _logits(12, 22)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        metric = InceptionScore(feature=nn.Identity(), splits=10)
    metric.update(logits)
    torch.manual_seed(0)
    ref_mean = float(metric.compute()[0])
    torch.manual_seed(0)
    with pytest.warns(RuntimeWarning, match="6 chunks"):
        ours = inception_score(logits, convention="torchmetrics", generator=torch.default_generator, dtype=None)
    assert ours.split_scores.shape == (6,)
    assert ours.mean == pytest.approx(ref_mean, rel=1e-6)


def test_inception_score_errors() -> None:
    with pytest.raises(ValueError, match="cannot fill 10 splits"):
        inception_score(_logits(9, 23))
    with pytest.raises(ValueError, match="at least 2"):
        inception_score(_logits(1, 23), splits=1)
    bad = _logits(20, 23)
    bad[4, 7] = float("inf")
    with pytest.raises(ValueError, match="1 NaN/inf"):
        inception_score(bad)
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        inception_score(torch.zeros(20))
    with pytest.raises(TypeError, match="torch.Generator"):
        inception_score(_logits(20, 23), convention="torchmetrics", generator=np.random.RandomState(0))


# ---------------------------------------------------------------- CMMD distance


def _cmmd_direct(x: np.ndarray, y: np.ndarray, dtype: type) -> float:
    """cmmd/distance.py's formula with full matrices, in ``dtype``."""
    x, y = x.astype(dtype), y.astype(dtype)
    gamma = dtype(1.0 / (2 * 10.0**2))

    def k_mean(a: np.ndarray, b: np.ndarray) -> float:
        sq = -2 * a @ b.T + (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :]
        return np.exp(-gamma * sq).mean()

    return float(dtype(1000) * (k_mean(x, x) + k_mean(y, y) - 2 * k_mean(x, y)))


def test_cmmd_matches_direct_formula_and_chunking() -> None:
    x, y = _clip_embeddings(400, 1.0, 30), _clip_embeddings(300, 1.2, 31)
    ours = gaussian_mmd2_biased(x, y)
    assert ours == pytest.approx(_cmmd_direct(x.numpy(), y.numpy(), np.float64), rel=F64_RTOL)
    assert abs(ours - _cmmd_direct(x.numpy(), y.numpy(), np.float32)) <= CMMD_F32_ATOL
    assert gaussian_mmd2_biased(x, y, chunk_rows=64) == pytest.approx(ours, rel=F64_RTOL)  # ragged last chunk
    cached = gaussian_kernel_mean(y)
    assert gaussian_mmd2_biased(x, y, k_yy_mean=cached, chunk_rows=150) == pytest.approx(ours, rel=F64_RTOL)
    assert gaussian_kernel_mean(y, chunk_rows=37) == pytest.approx(cached, rel=1e-14)
    assert gaussian_kernel_mean(y, y) == pytest.approx(gaussian_kernel_mean(y, y.clone()), rel=1e-14)  # y is x
    assert gaussian_mmd2_biased(y, y) == pytest.approx(0.0, abs=1e-10)


def test_cmmd_errors() -> None:
    x = _clip_embeddings(10, 0.0, 32)
    with pytest.raises(ValueError, match="at least 2 samples"):
        gaussian_mmd2_biased(x, x[:1])
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="x features contain 1 NaN"):
        gaussian_mmd2_biased(bad, x)
    with pytest.raises(ValueError, match="k_yy_mean"):
        gaussian_mmd2_biased(x, x, k_yy_mean=2.0)
