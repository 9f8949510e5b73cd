"""rewardkit.compat.diffsynth_sets: DiffSynth-Studio's ``FIDMetric`` and ``LPIPSMetric`` on tiny checkpoints.

The checkpoints are written in DiffSynth's ``ImageMetrics`` layout (``FID/model.safetensors``,
``LPIPS/alexnet.safetensors``) by ``rewardkit.testing``; every number must equal the core metric's
(``rk.load("fid", preset="legacy-pytorch")``, ``rk.load("lpips")``) on the same images. The FID network
is full size, so the folders hold three small images each and the library's feature rows are computed once.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import rewardkit as rk
import rewardkit.testing as rkt
from rewardkit.compat import diffsynth_sets
from rewardkit.image_io import load_image, pil_to_tensor
from rewardkit.metrics import FIDMetric, LPIPSMetric, ModelConfig
from rewardkit.metrics.fid import FrechetDistance


@pytest.fixture(autouse=True)
def _no_diffsynth_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("DIFFSYNTH_MODEL_BASE_PATH", "DIFFSYNTH_DOWNLOAD_SOURCE", "DIFFSYNTH_SKIP_DOWNLOAD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray ./models from the working directory


def _save_smooth(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> Path:
    """A smooth random image (low-frequency noise) of ``size`` (W, H), saved as ``mode`` (format by suffix)."""
    width, height = size
    pixels = (rkt.random_images(1, height, width, seed=seed)[0].permute(1, 2, 0).numpy() * 255).round()
    image = Image.fromarray(pixels.astype(np.uint8))
    image = image if mode == "RGB" else image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ``DiffSynth-Studio/ImageMetrics`` tree: ``FID/model.safetensors``, ``LPIPS/alexnet.safetensors``."""
    root = tmp_path_factory.mktemp("image-metrics")
    rkt.tiny_fid_inception(root, layout="diffsynth")
    rkt.tiny_lpips(root, layout="diffsynth", net="alex")
    assert (root / "FID" / "model.safetensors").is_file() and (root / "LPIPS" / "alexnet.safetensors").is_file()
    return root


# -- FID --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ref/ (3 images) and gen/ (2 images + gen/sub/, which DiffSynth's recursive listing includes)."""
    root = tmp_path_factory.mktemp("fid-sets")
    for index, (size, mode) in enumerate([((48, 40), "RGB"), ((64, 56), "L"), ((40, 64), "RGBA")]):
        _save_smooth(root / "ref" / f"r{index}.png", size, seed=index, mode=mode)
    _save_smooth(root / "gen" / "g0.png", (56, 48), seed=10)
    _save_smooth(root / "gen" / "g1.jpg", (48, 64), seed=11)
    _save_smooth(root / "gen" / "sub" / "g2.png", (64, 64), seed=12, mode="L")
    return {"ref": root / "ref", "gen": root / "gen", "gen_files": [root / "gen" / "g0.png", root / "gen" / "g1.jpg",
                                                                   root / "gen" / "sub" / "g2.png"]}


@pytest.fixture(scope="module")
def fid(repo: Path) -> FIDMetric:
    return FIDMetric.from_pretrained(model_config=ModelConfig(path=str(repo / "FID" / "model.safetensors")),
                                     device="cpu")


@pytest.fixture(scope="module")
def library(repo: Path, sets: dict) -> dict:
    """``rk.load("fid", preset="legacy-pytorch")`` on the same file, with its feature rows of ref/ and gen/."""
    metric = rk.load("fid", weights=str(repo / "FID" / "model.safetensors"), preset="legacy-pytorch", recursive=True)
    return {"metric": metric, "ref": metric.features(sets["ref"]), "gen": metric.features(sets["gen"])}


def test_fid_compute_equals_core_metric(fid, library, sets):
    value = fid.compute(str(sets["ref"]), sets["gen"])
    assert type(value) is float and np.isfinite(value) and value > 0
    assert library["gen"].shape == (3, 2048)  # gen/sub/g2.png is read, as DiffSynth's os.walk does
    core = FrechetDistance(library["metric"].extractor)
    core.update_features(library["ref"], real=True)
    core.update_features(library["gen"], real=False)
    assert value == pytest.approx(float(core.compute()), rel=1e-9)
    assert fid.metric.extractor.prep.preset == "legacy-pytorch"  # pytorch-fid's resize, not DiffSynth's
    assert fid.metric.extractor.identity() == library["metric"].extractor.identity()


def test_fid_statistics_are_float64_mean_and_cov(fid, library, sets):
    mean, cov = fid.statistics(sets["gen"])
    assert mean.dtype == cov.dtype == torch.float64
    assert mean.shape == (2048,) and cov.shape == (2048, 2048)
    rows = library["gen"].double().numpy()
    np.testing.assert_allclose(mean.numpy(), np.mean(rows, axis=0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(cov.numpy(), np.cov(rows, rowvar=False), rtol=1e-5, atol=1e-9)


def test_fid_accepts_lists_of_pil_images_and_paths(fid, library, sets):
    first, second, third = sets["gen_files"]
    items = [Image.open(first), str(second), third]  # a PIL image, a str path, a Path
    mean, cov = fid.statistics(items, batch_size=2)
    rows = library["gen"].double().numpy()
    np.testing.assert_allclose(mean.numpy(), rows.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(cov.numpy(), np.cov(rows, rowvar=False), rtol=1e-4, atol=1e-7)


def test_fid_needs_two_images_a_side(fid, sets):
    single = sets["gen_files"][0]
    with pytest.raises(ValueError, match="at least 2 images"):
        fid.statistics(single)
    with pytest.raises(ValueError, match="at least 2 real images"):
        fid.compute(str(single), [Image.open(sets["gen_files"][1])])


# -- LPIPS ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lpips_weights(repo: Path) -> str:
    return str(repo / "LPIPS" / "alexnet.safetensors")


@pytest.fixture(scope="module")
def lpips(lpips_weights: str) -> LPIPSMetric:
    return LPIPSMetric.from_pretrained(net="alex", model_config=ModelConfig(path=lpips_weights), device="cpu")


@pytest.fixture(scope="module")
def core_lpips(lpips_weights: str):
    return rk.load("lpips", weights=lpips_weights, net="alex")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """a/ and b/ matched by stem: x (48x40), y (56x56; a/ has y.jpg and y.png: sorted, y.jpg wins), one unmatched
    file each; tall.png (another size) and other/z.png (no stem in common)."""
    root = tmp_path_factory.mktemp("lpips-pairs")
    _save_smooth(root / "a" / "x.png", (48, 40), seed=1)
    _save_smooth(root / "b" / "x.png", (48, 40), seed=2)
    _save_smooth(root / "a" / "y.jpg", (56, 56), seed=3)
    _save_smooth(root / "a" / "y.png", (56, 56), seed=4)
    _save_smooth(root / "b" / "y.png", (56, 56), seed=5, mode="L")
    _save_smooth(root / "a" / "only-a.png", (48, 40), seed=6)
    _save_smooth(root / "b" / "only-b.png", (40, 48), seed=7)
    _save_smooth(root / "tall.png", (40, 48), seed=8)
    _save_smooth(root / "other" / "z.png", (48, 40), seed=9)
    return {"root": root, "a": root / "a", "b": root / "b"}


def _core(core_lpips, a: torch.Tensor, b: torch.Tensor) -> float:
    with torch.no_grad():
        return float(core_lpips(a[None], reference=b[None])[0])


def _tensor(path: Path) -> torch.Tensor:
    return pil_to_tensor(load_image(path))


def test_lpips_two_files_equal_core_metric(lpips, core_lpips, pairs):
    a, b = pairs["a"] / "x.png", pairs["b"] / "x.png"
    value = lpips.compute(str(a), b)
    assert type(value) is float and value > 0
    assert value == pytest.approx(_core(core_lpips, _tensor(a), _tensor(b)), rel=1e-6)
    assert lpips.compute(Image.open(a), Image.open(b)) == pytest.approx(value, rel=1e-6)  # PIL images
    assert lpips.compute(a, a) == pytest.approx(0.0, abs=1e-6)


def test_lpips_folders_average_stem_matched_pairs(lpips, core_lpips, pairs):
    value = lpips.compute(pairs["a"], str(pairs["b"]))
    expected = [_core(core_lpips, _tensor(pairs["a"] / "x.png"), _tensor(pairs["b"] / "x.png")),
                _core(core_lpips, _tensor(pairs["a"] / "y.jpg"), _tensor(pairs["b"] / "y.png"))]
    assert type(value) is float
    assert value == pytest.approx(np.mean(expected), rel=1e-6)  # only-a / only-b are left out
    one_by_one = LPIPSMetric(lpips.reward, batch_size=1)
    assert one_by_one.compute(pairs["a"], pairs["b"]) == pytest.approx(value, rel=1e-6)


def test_lpips_sizes_must_match_unless_resize(lpips, core_lpips, lpips_weights, pairs):
    a, tall = pairs["a"] / "x.png", pairs["root"] / "tall.png"
    with pytest.raises(ValueError, match="resize=True"):
        lpips.compute(a, tall)
    resizing = LPIPSMetric.from_pretrained(net="alex", model_config=ModelConfig(path=lpips_weights), device="cpu",
                                           resize=True)
    value = resizing.compute(a, tall)
    to_512 = transforms.Compose([transforms.Resize(512, transforms.InterpolationMode.BICUBIC),
                                 transforms.CenterCrop(512), transforms.ToTensor()])  # DiffSynth's transform
    expected = _core(core_lpips, to_512(load_image(a)), to_512(load_image(tall)))
    assert value == pytest.approx(expected, rel=1e-6)


def test_lpips_pairing_errors(lpips, pairs):
    with pytest.raises(ValueError, match="two images or two folders"):
        lpips.compute(pairs["a"], pairs["b"] / "x.png")
    with pytest.raises(ValueError, match="no file names .* in common"):
        lpips.compute(pairs["a"], pairs["root"] / "other")


def test_lpips_unknown_net_is_an_error(lpips_weights):
    with pytest.raises(ValueError, match="net must be one of"):
        LPIPSMetric.from_pretrained(net="resnet", model_config=ModelConfig(path=lpips_weights), device="cpu")


def test_vram_limit_warns(lpips_weights):
    with pytest.warns(UserWarning, match="vram_limit"):
        LPIPSMetric.from_pretrained(net="alex", model_config=ModelConfig(path=lpips_weights), device="cpu",
                                    vram_limit=4.0)


# -- imports ----------------------------------------------------------------------------------------------------


def test_names_are_exported_from_rewardkit_metrics():
    from rewardkit.compat import diffsynth

    assert FIDMetric is diffsynth_sets.FIDMetric is diffsynth.FIDMetric
    assert LPIPSMetric is diffsynth_sets.LPIPSMetric is diffsynth.LPIPSMetric


def test_diffsynth_sets_imports_first_in_a_fresh_process():
    # `rewardkit compare` imports rewardkit.compat.diffsynth_sets before rewardkit.compat.diffsynth (import cycle).
    code = ("import rewardkit.compat.diffsynth_sets as sets\n"
            "from rewardkit.metrics import FIDMetric, LPIPSMetric\n"
            "assert FIDMetric is sets.FIDMetric and LPIPSMetric is sets.LPIPSMetric\n"
            "print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"
