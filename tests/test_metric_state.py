"""Set metrics keep their statistics in ``state_dict()`` and update all or nothing (issue 13.4).

For every registered distribution metric (tiny random networks): a metric saved with ``torch.save`` (loaded
back with ``weights_only=True``) into a fresh metric computes the same value; and an ``update`` over a folder
with a corrupt file raises naming the file and leaves the counts as they were, so a retry counts each image
once.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
from PIL import Image

import rewardkit.testing as rkt
from rewardkit.image_io import ImageLoadError, list_images
from rewardkit.metrics.frechet import GaussianReference, StatisticsMismatchError
from rewardkit.registry import names

METRICS = names("distribution")
OPTIONS = {"kid": {"subset_size": 3, "subsets": 5}, "inception-score": {"splits": 2}}
# One image per forward pass: the corrupt file is the second, so one image was extracted (and staged) before
# the error. The FID-Inception network is full size (~1.5 s per image on a busy CPU), so images are few and
# feature rows are computed once per module.
BATCH = 1
_LOADED: dict[str, object] = {}


def _metric(name: str, tiny_root: Path):
    """A fresh (never updated) metric: a deep copy of one loaded per module."""
    if name not in _LOADED:
        _LOADED[name] = rkt.load_tiny(name, tiny_root / "distribution", batch_size=BATCH, **OPTIONS.get(name, {}))
    return copy.deepcopy(_LOADED[name])


def _uses_real(name: str) -> bool:
    return name != "inception-score"


def _count(metric, real: bool) -> int:
    """Images counted on one side (Gaussian sums or stored rows)."""
    return (metric.real if real else metric.fake).n if hasattr(metric, "fake") else metric.store.count(real)


def _round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # plain tensors, ints and strings only


@pytest.fixture(scope="module")
def rows(tiny_root: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Feature rows per extractor of 3 real and 4 generated images (FID, KID and IS share FID-Inception)."""
    real, fake = rkt.random_images(3, 40, 48, seed=31), rkt.random_images(4, 40, 48, seed=32)
    out = {}
    for name in ("fid", "cmmd", "fd-dinov2"):
        both = _metric(name, tiny_root).features(torch.cat([real, fake]))
        out[name] = {"real": both[:3], "fake": both[3:]}
    out["kid"] = out["inception-score"] = out["fid"]
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """img0.png, img1.png (corrupt), img2.png: the error comes after one image was extracted."""
    root = tmp_path_factory.mktemp("corrupt-folder")
    pixels = (rkt.random_images(2, 40, 48, seed=33) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    for index, array in zip((0, 2), pixels):
        Image.fromarray(array).save(root / f"img{index}.png")
    (root / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really a PNG")
    return root


@pytest.mark.parametrize("name", METRICS)
def test_state_dict_round_trip_resumes_the_metric(name: str, tiny_root: Path, rows) -> None:
    real, fake = rows[name]["real"], rows[name]["fake"]
    metric = _metric(name, tiny_root)
    if _uses_real(name):
        metric.update_features(real, real=True)
    metric.update_features(fake[:3], real=False)
    fresh = _metric(name, tiny_root)
    fresh.load_state_dict(_round_trip(metric.state_dict()))  # strict: the statistics are the extra state
    assert _count(fresh, False) == 3 and _count(fresh, True) == (3 if _uses_real(name) else 0)
    torch.testing.assert_close(fresh.compute(), metric.compute(), rtol=0, atol=0)
    # Resuming continues the same stream: one more image on both, equal state again (a 2048-d FID costs two
    # float64 eigendecompositions per compute(), so the state is compared rather than computed twice more).
    metric.update_features(fake[3:], real=False)
    fresh.update_features(fake[3:], real=False)
    sides = [{key: m.get_extra_state()[key] for key in ('real', 'fake')} for m in (fresh, metric)]
    torch.testing.assert_close(*sides, rtol=0, atol=0)


# FD-DINOv2 is the FrechetDistance class of FID on a small (tiny) feature dimension: the same state code
# without two 2048-d square roots.
@pytest.mark.parametrize("name", ["fd-dinov2", "kid"])
def test_state_dict_keeps_a_fixed_reference(name: str, tiny_root: Path, rows) -> None:
    real, fake = rows[name]["real"], rows[name]["fake"]
    metric = _metric(name, tiny_root)
    if name == "fd-dinov2":
        source = _metric(name, tiny_root)
        source.update_features(real, real=True)
        metric.set_reference(source.reference_statistics())
        metric.reference_statistics().sqrt_sigma()  # the cached root travels too
    else:
        metric.set_reference_rows(real)
    metric.update_features(fake, real=False)
    fresh = _metric(name, tiny_root)
    fresh.load_state_dict(_round_trip(metric.state_dict()))
    assert fresh.has_fixed_reference
    torch.testing.assert_close(fresh.compute(), metric.compute(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="fixed"):
        fresh.update_features(real, real=True)


@pytest.mark.parametrize("name", ["fd-dinov2", "kid"])
def test_state_of_another_preset_is_refused(name: str, tiny_root: Path, rows) -> None:
    metric = _metric(name, tiny_root)
    metric.update_features(rows[name]["fake"], real=False)
    state = metric.state_dict()
    extra = next(key for key in state if key.endswith("_extra_state"))
    state[extra]["identity"] = {**state[extra]["identity"], "preset": "legacy-pytorch"}
    other = _metric(name, tiny_root)
    with pytest.raises(StatisticsMismatchError, match="preset"):
        other.load_state_dict(state)
    assert _count(other, False) == 0


@pytest.mark.parametrize("name", METRICS)
def test_update_is_all_or_nothing_and_names_the_corrupt_file(name: str, tiny_root: Path, folder: Path,
                                                             rows) -> None:
    metric = _metric(name, tiny_root)
    metric.update_features(rows[name]["fake"][:2], real=False)
    with pytest.raises(ImageLoadError, match="img1.png") as info:
        metric.update(folder, real=False)
    assert "\n" not in str(info.value) and metric.name in str(info.value)
    assert _count(metric, False) == 2, "img0.png, read before the corrupt file, must not be counted"
    if _uses_real(name):
        with pytest.raises(ImageLoadError, match="img1.png"):
            metric.update(folder, real=True)
        assert _count(metric, True) == 0
    # The retry without the corrupt file counts each image once.
    readable = [path for path in list_images(folder) if path.name != "img1.png"]
    metric.update(readable, real=False)
    assert _count(metric, False) == 2 + len(readable)


def test_corrupt_file_through_dataloader_workers_is_one_line(tiny_root: Path, folder: Path) -> None:
    metric = _metric("fd-dinov2", tiny_root)  # the fastest network; the loading path is the same for all
    metric.num_workers = 2
    with pytest.raises(ImageLoadError, match="img1.png") as info:
        metric.update(folder, real=False)
    assert "\n" not in str(info.value) and "DataLoader worker" not in str(info.value)
    assert metric.fake.n == 0


def test_reference_state_keeps_its_square_root() -> None:
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(12, 4, generator=generator, dtype=torch.float64)
    reference = GaussianReference(rows.mean(0), torch.cov(rows.T), 12, {"extractor": "x"})
    root = reference.sqrt_sigma()
    copy = GaussianReference.from_state_dict(_round_trip(reference.state_dict()))
    assert copy._sqrt is not None and torch.equal(copy.sqrt_sigma(), root) and copy.n == 12
    assert copy.distance(rows[:6].mean(0), torch.cov(rows[:6].T)) == reference.distance(rows[:6].mean(0),
                                                                                        torch.cov(rows[:6].T))
