"""End-to-end FID / KID / IS against the reference packages, on the same random FID-Inception weights.

Every reference reads the same two folders of PNGs and loads the same weight file (pytorch-fid and
clean-fid from a private ``TORCH_HOME`` hub cache, torch-fidelity and torchmetrics through
``feature_extractor_weights_path``); rewardkit uses the preset that reproduces each one. Feature-level
parity is in tests/test_fid_inception.py; this file checks the whole pipeline (file reading, resize,
network, statistics, distance) and the statistics-file rules.

Tolerances: 8 images a side, so the 2048-d covariances are rank-deficient; there the references'
sqrtm / eigvals differ from the exact symmetric form by up to ~5e-6 relative (reference/
distribution_metrics.md §1.7), and clean-fid / torch-fidelity take the feature mean in float32.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rewardkit as rk
import rewardkit.testing as rkt
from rewardkit.metrics.frechet import StatisticsMismatchError

FID_RTOL = 2e-5  # measured <= 6e-6 (float32 means in the references; eigvals vs eigh on rank-deficient stats)
KID_RTOL = 1e-3  # torch-fidelity's float32 kernel (measured 5.7e-5 relative on 1000-row subsets)
IS_RTOL = 1e-6  # float64 on both sides
N, SIZE = 8, 64


def _write(folder, images: torch.Tensor) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for index, array in enumerate((images * 255).round().byte().permute(0, 2, 3, 1).numpy()):
        Image.fromarray(array).save(folder / f"{index:03d}.png")
    return str(folder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid-e2e")
    weights = rkt.tiny_fid_inception(root / "weights")["weights"]
    hub = root / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    shutil.copy(weights, hub / "pt_inception-2015-12-05-6726825d.pth")
    real = _write(root / "real", rkt.random_images(N, SIZE, SIZE, seed=31))
    fake = _write(root / "fake", rkt.random_images(N, SIZE, SIZE, seed=32) ** 1.5)
    return {"weights": weights, "torch_home": str(root / "torch_home"), "real": real, "fake": fake}


_OURS: dict[str, float] = {}


def _ours(setup, preset: str) -> float:
    """rewardkit's FID of the two folders with ``preset`` (computed once per preset)."""
    if preset not in _OURS:
        metric = rk.load("fid", weights=setup["weights"], preset=preset, batch_size=5)
        metric.update(setup["real"], real=True)
        metric.update(setup["fake"], real=False)
        _OURS[preset] = float(metric.compute())
    return _OURS[preset]


def test_fid_equals_pytorch_fid(setup, monkeypatch) -> None:
    from pytorch_fid.fid_score import calculate_fid_given_paths

    monkeypatch.setenv("TORCH_HOME", setup["torch_home"])
    expected = calculate_fid_given_paths([setup["real"], setup["fake"]], 4, "cpu", 2048, num_workers=0)
    assert _ours(setup, "legacy-pytorch") == pytest.approx(expected, rel=FID_RTOL)


def test_fid_equals_clean_fid_legacy_pytorch(setup, monkeypatch) -> None:
    from cleanfid import fid

    monkeypatch.setenv("TORCH_HOME", setup["torch_home"])
    expected = fid.compute_fid(setup["real"], setup["fake"], mode="legacy_pytorch", num_workers=0, batch_size=4,
                               device=torch.device("cpu"), verbose=False)
    assert _ours(setup, "legacy-pytorch") == pytest.approx(expected, rel=FID_RTOL)


def test_fid_kid_is_equal_torch_fidelity(setup) -> None:
    import torch_fidelity

    out = torch_fidelity.calculate_metrics(
        input1=setup["real"], input2=setup["fake"], fid=True, kid=True, isc=True, kid_subset_size=4, kid_subsets=20,
        isc_splits=2, cuda=False, batch_size=4, verbose=False, feature_extractor_weights_path=setup["weights"])
    assert _ours(setup, "torch-fidelity") == pytest.approx(out["frechet_inception_distance"], rel=FID_RTOL)
    kid = rk.load("kid", weights=setup["weights"], preset="torch-fidelity", subset_size=4, subsets=20)
    kid.update(setup["real"], real=True)  # torch-fidelity draws input1's subset first: rewardkit's real side
    kid.update(setup["fake"], real=False)
    mean, std = kid.compute().tolist()
    assert mean == pytest.approx(out["kernel_inception_distance_mean"], rel=KID_RTOL)
    assert std == pytest.approx(out["kernel_inception_distance_std"], rel=KID_RTOL, abs=KID_RTOL * abs(mean))
    inception_score = rk.load("inception-score", weights=setup["weights"], preset="torch-fidelity", splits=2)
    inception_score.update(setup["real"], real=False)  # torch-fidelity scores input1
    mean, std = inception_score.compute().tolist()
    assert mean == pytest.approx(out["inception_score_mean"], rel=IS_RTOL)
    assert std == pytest.approx(out["inception_score_std"], rel=1e-5, abs=1e-9)


def test_fid_equals_torchmetrics(setup) -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance

    reference = FrechetInceptionDistance(feature_extractor_weights_path=setup["weights"])  # antialias=True default
    for folder, real in ((setup["real"], True), (setup["fake"], False)):
        arrays = [np.asarray(Image.open(p)) for p in sorted(Path(folder).glob("*.png"))]
        reference.update(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(), real=real)
    # torchmetrics returns float32: compare at float32 resolution.
    assert _ours(setup, "torchmetrics") == pytest.approx(float(reference.compute()), rel=FID_RTOL)


def test_workers_recursion_and_pil_lists_give_the_same_fid(setup, tmp_path) -> None:
    expected = _ours(setup, "clean")
    nested = tmp_path / "nested"
    shutil.copytree(setup["fake"], nested / "sub")
    metric = rk.load("fid", weights=setup["weights"], num_workers=2, recursive=True, batch_size=3)
    metric.update([Image.open(p) for p in sorted(Path(setup["real"]).glob("*.png"))], real=True)
    metric.update(str(nested), real=False)
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-6)


def test_statistics_from_another_preset_or_extractor_are_refused(setup, tmp_path) -> None:
    clean = rk.load("fid", weights=setup["weights"])
    clean.update(setup["real"], real=True)
    path = tmp_path / "clean.npz"
    clean.save_reference(path)
    with pytest.raises(StatisticsMismatchError, match="preset"):
        rk.load("fid", weights=setup["weights"], preset="legacy-pytorch", reference=path)
    other = rkt.tiny_fid_inception(tmp_path / "other", seed=5)["weights"]
    with pytest.raises(StatisticsMismatchError, match="weights_sha256"):
        rk.load("fid", weights=other, reference=path)
    fixed = rk.load("fid", weights=setup["weights"], reference=path)
    fixed.update(setup["fake"], real=False)
    assert float(fixed.compute()) == pytest.approx(_ours(setup, "clean"), rel=1e-7)  # batch 32 vs 5: float32 blocking


def test_float_tensors_are_quantised_like_saved_pngs_unless_asked(setup) -> None:
    images = rkt.random_images(N, SIZE, SIZE, seed=32) ** 1.5  # the fake folder's pixels before rounding
    metric = rk.load("fid", weights=setup["weights"], preset="torch-fidelity")
    metric.update(setup["real"], real=True)
    metric.update(images, real=False)
    assert float(metric.compute()) == pytest.approx(_ours(setup, "torch-fidelity"), rel=1e-6)
    unrounded = rk.load("fid", weights=setup["weights"], preset="torch-fidelity", quantize=False)
    unrounded.update(setup["real"], real=True)
    unrounded.update(images, real=False)
    assert float(unrounded.compute()) != pytest.approx(float(metric.compute()), rel=1e-9)
