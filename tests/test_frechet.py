"""Fréchet statistics and distance: eigen-form vs the references' sqrtm/eigvals, streaming, shards,
statistics files, two real processes. Uses a stand-in pixel extractor; network parity is in
tests/test_fid_inception.py and tests/test_fid_metric.py."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

import rewardkit.testing as rkt
from rewardkit.metrics.fid import FrechetDistance
from rewardkit.metrics.frechet import (GaussianReference, GaussianStats, StatisticsMismatchError, frechet_distance,
                                       load_statistics, save_statistics, trace_sqrt_product)
from rewardkit.testing.metrics import PixelFeatures

# Measured on these inputs: full rank |d| ~1e-12 relative; rank-deficient ~1e-7 relative (sqrtm itself is
# inaccurate there, see reference/distribution_metrics.md §1.7).
FULL_RANK_RTOL = 1e-9
RANK_DEFICIENT_RTOL = 1e-5


def _features(n: int, dim: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) / dim**0.5
    return np.log1p(np.exp(rng.normal(size=(n, dim)) @ mixing + shift))  # softplus: positive, skewed


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(0), np.cov(x, rowvar=False)


def _sqrtm_trace(s1: np.ndarray, s2: np.ndarray) -> float:
    return float(np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)


@pytest.mark.parametrize("n, rtol", [(600, FULL_RANK_RTOL), (40, RANK_DEFICIENT_RTOL)], ids=["full-rank", "rank-deficient"])
def test_trace_sqrt_matches_scipy_sqrtm(n: int, rtol: float) -> None:
    _, s1 = _stats(_features(n, 64, 0))
    _, s2 = _stats(_features(n, 64, 1, shift=0.3))
    ours = trace_sqrt_product(torch.from_numpy(s1), torch.from_numpy(s2))
    assert ours == pytest.approx(_sqrtm_trace(s1, s2), rel=rtol)


def test_distance_matches_pytorch_fid_torch_fidelity_and_torchmetrics() -> None:
    from pytorch_fid.fid_score import calculate_frechet_distance
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    from torchmetrics.image.fid import _compute_fid

    mu1, s1 = _stats(_features(800, 48, 2))
    mu2, s2 = _stats(_features(800, 48, 3, shift=0.5))
    ours = frechet_distance(*(torch.from_numpy(a) for a in (mu1, s1, mu2, s2)))
    assert ours == pytest.approx(calculate_frechet_distance(mu1, s1, mu2, s2), rel=FULL_RANK_RTOL)
    fidelity = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)
    assert ours == pytest.approx(fidelity["frechet_inception_distance"], rel=FULL_RANK_RTOL)
    tm = _compute_fid(*(torch.from_numpy(a) for a in (mu1, s1, mu2, s2)))
    assert ours == pytest.approx(float(tm), rel=FULL_RANK_RTOL)


def test_distance_of_a_set_to_itself_is_zero_and_cached_root_is_reused() -> None:
    mu, sigma = (torch.from_numpy(a) for a in _stats(_features(300, 32, 4)))
    reference = GaussianReference(mu, sigma, 300)
    assert abs(reference.distance(mu, sigma)) < 1e-9
    root = reference.sqrt_sigma()
    reference.distance(mu + 0.1, sigma)
    assert reference.sqrt_sigma() is root


def _gram_form(x1: np.ndarray, x2: np.ndarray) -> float:
    """The exact Fréchet distance of two row sets from their n×n cross-Gram matrix, independent of any D×D
    eigendecomposition: with A = centred rows / √(n − 1), Σ = AᵀA and the non-zero eigenvalues of Σ1 Σ2 are
    the squared singular values of A1 A2ᵀ, so tr √(Σ1 Σ2) is the nuclear norm of A1 A2ᵀ."""
    a1 = (x1 - x1.mean(0)) / np.sqrt(len(x1) - 1)
    a2 = (x2 - x2.mean(0)) / np.sqrt(len(x2) - 1)
    diff = x1.mean(0) - x2.mean(0)
    nuclear = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    return float(diff @ diff + (a1 * a1).sum() + (a2 * a2).sum() - 2 * nuclear)


@pytest.mark.parametrize(("n", "dim"), [(50, 256), (2, 64), (120, 128)])
def test_identical_small_sets_give_zero_to_round_off(n: int, dim: int) -> None:
    """Fewer images than dimensions (rank n - 1 < D): the D - n + 1 round-off eigenvalues count as 0, so two
    identical sets give |FD| <= 1e-11 * scale (clamping only negatives gave -3.9e-5 at n = 50, D = 256)."""
    mu, sigma = (torch.from_numpy(a) for a in _stats(_features(n, dim, n)))
    scale = 2 * float(torch.trace(sigma))
    assert abs(frechet_distance(mu, sigma, mu.clone(), sigma.clone())) <= 1e-11 * scale
    assert abs(GaussianReference(mu, sigma, n).distance(mu, sigma)) <= 1e-11 * scale


@pytest.mark.parametrize(("n1", "n2", "dim"), [(40, 60, 128), (30, 30, 96), (200, 150, 64)])
def test_distance_equals_the_exact_gram_form(n1: int, n2: int, dim: int) -> None:
    x1, x2 = _features(n1, dim, 11), _features(n2, dim, 12, shift=0.3)
    m1, s1 = _stats(x1)
    m2, s2 = _stats(x2)
    got = frechet_distance(*(torch.from_numpy(a) for a in (m1, s1, m2, s2)))
    scale = float(np.trace(s1) + np.trace(s2))
    assert abs(got - _gram_form(x1, x2)) <= 1e-11 * scale


def test_running_sums_equal_numpy_mean_and_cov_and_merge_equals_whole() -> None:
    x = _features(257, 24, 5)
    whole, a, b = GaussianStats(24), GaussianStats(24), GaussianStats(24)
    for start in range(0, 257, 50):  # uneven last batch
        whole.update(torch.from_numpy(x[start : start + 50]).float())
    a.update(torch.from_numpy(x[:100]).float())
    b.update(torch.from_numpy(x[100:]).float())
    a.merge(b)
    x32 = x.astype(np.float32).astype(np.float64)
    for stats in (whole, a):
        assert stats.n == 257
        np.testing.assert_allclose(stats.mean().numpy(), x32.mean(0), rtol=1e-12)
        np.testing.assert_allclose(stats.cov().numpy(), np.cov(x32, rowvar=False), rtol=1e-9, atol=1e-12)


@pytest.fixture()
def metric() -> FrechetDistance:
    return FrechetDistance(PixelFeatures(dim=12).freeze(), batch_size=5)


def test_batches_equal_one_shot_and_folders_equal_tensors(metric: FrechetDistance, tmp_path) -> None:
    from PIL import Image

    real, fake = rkt.random_images(13, 24, 20, seed=1), rkt.random_images(11, 24, 20, seed=2)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    one_shot = FrechetDistance(PixelFeatures(dim=12).freeze(), batch_size=64)
    one_shot.update(real, real=True)
    one_shot.update(fake, real=False)
    # float32 matmuls block differently per batch size (~1e-7 on features) -> ~1e-9 on the distance.
    assert float(metric.compute()) == pytest.approx(float(one_shot.compute()), rel=1e-7)
    for i, image in enumerate((fake * 255).round().byte().permute(0, 2, 3, 1).numpy()):
        Image.fromarray(image).save(tmp_path / f"{i:02d}.png")
    from_files = FrechetDistance(PixelFeatures(dim=12).freeze(), batch_size=4)
    from_files.update(real, real=True)
    from_files.update(tmp_path, real=False)
    assert float(from_files.compute()) == pytest.approx(float(metric.compute()), rel=1e-6)


def test_statistics_files_round_trip_and_refuse_other_settings(metric: FrechetDistance, tmp_path) -> None:
    metric.update(rkt.random_images(9, 16, 16, seed=3), real=True)
    metric.update(rkt.random_images(7, 16, 16, seed=4), real=False)
    path = tmp_path / "ref.npz"
    metric.save_reference(path)
    fixed = FrechetDistance(PixelFeatures(dim=12).freeze(), reference=path)
    fixed.update(rkt.random_images(7, 16, 16, seed=4), real=False)
    assert float(fixed.compute()) == pytest.approx(float(metric.compute()), rel=1e-7)  # batch 32 vs 5
    reference, _ = load_statistics(path)
    assert reference.n == 9 and reference.meta["preset"] == "pixels" and reference.meta["extractor"] == "pixel-features"
    with pytest.raises(StatisticsMismatchError, match="weights_sha256"):
        FrechetDistance(PixelFeatures(dim=12, seed=1).freeze(), reference=path)
    with pytest.raises(ValueError, match="real side is fixed"):
        fixed.update(rkt.random_images(2, 16, 16), real=True)


def test_foreign_statistics_need_an_explicit_flag(tmp_path) -> None:
    mu, sigma = _stats(_features(50, 12, 6))
    path = tmp_path / "pytorch_fid_stats.npz"
    np.savez(path, mu=mu, sigma=sigma)
    with pytest.raises(ValueError, match="foreign=True"):
        FrechetDistance(PixelFeatures(dim=12).freeze(), reference=path)
    metric = FrechetDistance(PixelFeatures(dim=12).freeze(), reference=path, foreign_reference=True)
    metric.update(rkt.random_images(4, 16, 16), real=False)
    assert np.isfinite(float(metric.compute()))
    with pytest.raises(ValueError, match="dimension 12"):
        FrechetDistance(PixelFeatures(dim=8).freeze(), reference=path, foreign_reference=True)
    save_statistics(tmp_path / "other.npz", GaussianReference(torch.zeros(3), torch.eye(3), 1, {"preset": "clean"}))


@pytest.mark.parametrize("n_real, n_fake", [(1, 5), (5, 1), (0, 5)])
def test_fewer_than_two_images_is_an_error_not_zero(metric: FrechetDistance, n_real: int, n_fake: int) -> None:
    if n_real:
        metric.update(rkt.random_images(n_real, 16, 16), real=True)
    metric.update(rkt.random_images(n_fake, 16, 16, seed=1), real=False)
    with pytest.raises(ValueError, match="at least 2"):
        metric.compute()


def test_bad_sources_and_features(metric: FrechetDistance, tmp_path) -> None:
    with pytest.raises(ValueError, match="no image files"):
        metric.update(tmp_path, real=True)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        metric.update(tmp_path, real=True)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metric.update(torch.full((2, 3, 8, 8), 2.0), real=True)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(torch.zeros(2), torch.eye(2), torch.tensor([float("nan"), 0.0]), torch.eye(2))
    with pytest.raises(TypeError, match="cannot read images"):
        metric.update(42, real=True)


def test_sync_twice_or_update_after_sync_is_refused(metric: FrechetDistance) -> None:
    metric.update(rkt.random_images(3, 16, 16), real=True)
    metric.sync()  # not distributed: a no-op reduction
    with pytest.raises(RuntimeError, match="reset"):
        metric.update(rkt.random_images(3, 16, 16), real=False)
    with pytest.raises(RuntimeError, match="already"):
        metric.sync()
    metric.reset()
    metric.update(rkt.random_images(3, 16, 16), real=False)


def test_two_processes_equal_one_process(run_two_processes) -> None:
    """Ranks hold uneven shares (5 + 8 real, 3 + 8 generated); plain torch.distributed and accelerate."""
    ranks = run_two_processes("frechet_worker.py", 29531)
    single = FrechetDistance(PixelFeatures(dim=12).freeze(), batch_size=4)
    single.update(rkt.random_images(13, 16, 16, seed=10), real=True)
    single.update(rkt.random_images(11, 16, 16, seed=11), real=False)
    expected = float(single.compute())
    for rank in ranks:
        assert rank["n"] == [13, 11]
        assert rank["torch_distributed"] == pytest.approx(expected, rel=1e-7)
        assert rank["accelerate"] == pytest.approx(expected, rel=1e-7)
        assert rank["gathered_rows"] == [13, 11]


def test_nan_features_from_the_network_are_an_error_naming_the_metric() -> None:
    class Broken(PixelFeatures):
        def forward(self, prepared):
            return super().forward(prepared) * float("nan")

    metric = FrechetDistance(Broken(dim=12).freeze())
    with pytest.raises(ValueError, match="fid: the extractor returned NaN"):
        metric.update(rkt.random_images(3, 16, 16), real=True)
    with pytest.raises(ValueError, match="NaN"):
        GaussianStats(2).update(torch.tensor([[1.0, float("nan")]]))  # features given directly


def test_folder_reading_shows_a_progress_bar_when_asked(tmp_path, capsys) -> None:
    from PIL import Image

    for index in range(3):
        Image.new("RGB", (12, 10), (index * 40, 20, 30)).save(tmp_path / f"{index}.png")
    metric = FrechetDistance(PixelFeatures(dim=12).freeze(), progress=True)
    metric.update(tmp_path, real=True)
    assert "fid real" in capsys.readouterr().err  # tqdm writes to stderr; silent by default off a terminal
    FrechetDistance(PixelFeatures(dim=12).freeze()).update(tmp_path, real=True)
    assert capsys.readouterr().err == ""


def test_dataloaders_of_labelled_batches_use_the_images(metric: FrechetDistance) -> None:
    images = rkt.random_images(7, 16, 16, seed=12)
    dataset = torch.utils.data.TensorDataset(images, torch.arange(7))
    metric.update(torch.utils.data.DataLoader(dataset, batch_size=3), real=True)
    assert metric.real.n == 7
    direct = FrechetDistance(PixelFeatures(dim=12).freeze())
    direct.update(images, real=True)
    torch.testing.assert_close(metric.real.sum, direct.real.sum, rtol=1e-5, atol=1e-6)  # float32 batching
