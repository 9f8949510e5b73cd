"""Tests of ``rewardkit fid-stats``, ``rewardkit fid`` and ``rewardkit compare`` (tiny random networks; no network).

One random FID-Inception checkpoint is written per module, at the path ``--tiny`` builds it under the temp dir
(``tempfile.tempdir`` is pointed at this module's folder), so ``--tiny`` and ``--weights fid=PATH`` use the same
file and every CLI number can be compared with the library's own on the same feature rows. The network is
full size (~24M parameters), so the folders hold a few small images and every feature row is computed once by
the library here.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rewardkit as rk
import rewardkit.testing as rkt
from rewardkit.cli import main
from rewardkit.image_io import load_image, pil_to_tensor
from rewardkit.metrics.fid import FrechetDistance
from rewardkit.metrics.frechet import load_statistics
from rewardkit.metrics.inception_score import InceptionScore
from rewardkit.metrics.kid import KID

MODES = ("RGB", "L", "RGBA", "P", "RGB")
GEN_SIZES = [(48, 40), (56, 56), (40, 64), (64, 48), (52, 44)]  # (W, H); one more image goes into gen/sub/
REF_SIZES = [(44, 52), (64, 64), (48, 48), (56, 40), (40, 40)]
IS_SPLITS = "2"


def _save_smooth(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> Path:
    """A smooth random image (low-frequency noise) of ``size`` (W, H), saved as ``mode``."""
    width, height = size
    pixels = (rkt.random_images(1, height, width, seed=seed)[0].permute(1, 2, 0).numpy() * 255).round()
    image = Image.fromarray(pixels.astype(np.uint8))
    if mode == "P":
        image = image.quantize(64)
    elif mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _cli(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` -> ``(exit code, stdout, stderr)`` (for module-scoped fixtures, where capsys is not available)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory):
    """This module's folder; also the temp dir, so that ``--tiny`` builds (and finds) its networks here."""
    folder = tmp_path_factory.mktemp("cli-metrics")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(folder))
        yield folder


@pytest.fixture(scope="module")
def weights(root: Path) -> str:
    """The tiny FID-Inception file, where ``--tiny`` looks for it."""
    path = rkt.tiny_fid_inception(root / "rewardkit-tiny" / "fid")["weights"]
    assert Path(path).is_file()
    return path


@pytest.fixture(scope="module")
def folders(root: Path) -> dict[str, Path]:
    """gen/ (5 images + 1 in gen/sub/), ref/ (5 images), small/ (3 images); mixed sizes and modes."""
    for index, (size, mode) in enumerate(zip(GEN_SIZES, MODES)):
        _save_smooth(root / "gen" / f"g{index}.png", size, seed=index, mode=mode)
    _save_smooth(root / "gen" / "sub" / "g5.png", (60, 50), seed=5)
    for index, (size, mode) in enumerate(zip(REF_SIZES, reversed(MODES))):
        _save_smooth(root / "ref" / f"r{index}.png", size, seed=100 + index, mode=mode)
    for index in range(3):
        _save_smooth(root / "small" / f"s{index}.png", (40 + 8 * index, 48), seed=200 + index)
    return {name: root / name for name in ("gen", "ref", "small")}


@pytest.fixture(scope="module")
def lib(weights: str, folders: dict[str, Path]) -> dict:
    """The library's FID metric (clean preset, recursive) and its feature rows of gen/ (6) and ref/ (5)."""
    metric = rk.load("fid", weights=weights, recursive=True)
    return {"metric": metric, "gen": metric.features(folders["gen"]), "ref": metric.features(folders["ref"])}


def _fid_of_rows(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID from two small sets of feature rows by their Gram matrices: an independent, exact and fast check.

    With ``Σ1 = AᵀA``, ``Σ2 = BᵀB`` (``A``, ``B``: centred rows / sqrt(n - 1)), the non-zero eigenvalues of
    ``Σ1 Σ2`` are the squared singular values of ``A Bᵀ`` (n1 x n2), so ``tr √(Σ1 Σ2)`` is its nuclear norm: no
    2048² eigh.
    The library's eigen-form on the rank-deficient 2048² matrices also sums √ of round-off eigenvalues: it agrees
    to ~4e-6 relative here.
    """
    x1, x2 = real.double().numpy(), fake.double().numpy()
    a = (x1 - x1.mean(0)) / math.sqrt(len(x1) - 1)
    b = (x2 - x2.mean(0)) / math.sqrt(len(x2) - 1)
    diff = x1.mean(0) - x2.mean(0)
    nuclear = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    return float(diff @ diff + (a * a).sum() + (b * b).sum() - 2 * nuclear)


def _library_kid(lib: dict) -> list[float]:
    metric = KID(lib["metric"].extractor, small_set="shrink")
    metric.update_features(lib["ref"], real=True)
    metric.update_features(lib["gen"], real=False)
    return metric.compute().tolist()


def _gaussian(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    rows = features.double().numpy()
    return rows.mean(0), np.cov(rows, rowvar=False)


@pytest.fixture(scope="module")
def stats_file(root: Path, weights: str, folders: dict[str, Path]) -> tuple[Path, dict]:
    """``fid-stats ref/ --features`` with the tiny weights: ``(path, printed summary)``."""
    path = root / "ref-stats.npz"
    code, out, err = _cli(["fid-stats", str(folders["ref"]), "--out", str(path), "--features",
                           "--weights", f"fid={weights}"])
    assert code == 0, err
    return path, json.loads(out)


@pytest.fixture(scope="module")
def folder_run(root: Path, weights: str, folders: dict[str, Path]) -> tuple[dict, Path]:
    """``fid gen/ ref/ --recursive --metrics fid,kid,is`` in one run: ``(printed JSON, --out file)``."""
    out_file = root / "fid.json"
    argv = ["fid", str(folders["gen"]), str(folders["ref"]), "--weights", f"fid={weights}", "--recursive",
            "--metrics", "fid,kid,is", "--kid-small-set", "shrink", "--is-splits", IS_SPLITS, "--out", str(out_file)]
    code, out, err = _cli(argv)
    assert code == 0, err
    # stderr is not a terminal here: one summary line per feature pass instead of progress bars.
    assert re.search(r"^fid reference: read 5 images in \d+\.\d s \(\d+\.\d img/s\)$", err, re.M), err
    assert re.search(r"^fid generated: read 6 images in \d+\.\d s \(\d+\.\d img/s\)$", err, re.M), err
    return json.loads(out), out_file


# -- fid-stats --------------------------------------------------------------------------------------------------


def test_fid_stats_writes_metadata_and_feature_rows(stats_file, lib, folders):
    path, printed = stats_file
    identity = lib["metric"].extractor.identity()
    assert printed["out"] == str(path) and printed["n"] == 5
    assert printed["preset"] == "clean" and printed["extractor"] == identity["extractor"]
    reference, rows = load_statistics(path, identity=identity)
    assert reference.n == 5
    assert {k: reference.meta[k] for k in identity} == identity  # extractor, preset, resolution, weights sha256
    assert reference.meta["source"] == str(folders["ref"])
    mu, sigma = _gaussian(lib["ref"])
    np.testing.assert_allclose(reference.mu.numpy(), mu, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(reference.sigma.numpy(), sigma, rtol=1e-5, atol=1e-9)
    assert rows is not None and rows.shape == (5, 2048)
    torch.testing.assert_close(rows, lib["ref"], rtol=1e-6, atol=1e-7)


def test_fid_stats_without_features_cannot_serve_kid(root, folders, lib, capsys):
    path = root / "small-stats.npz"
    assert main(["fid-stats", str(folders["small"]), "--out", str(path), "--tiny"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 3
    reference, rows = load_statistics(path, identity=lib["metric"].extractor.identity())  # --tiny = same weights
    assert rows is None and reference.n == 3 and reference.meta["preset"] == "clean"
    assert main(["fid", str(folders["gen"]), "--stats", str(path), "--metrics", "fid,kid", "--tiny"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "rewardkit: error:" in captured.err and "feature rows" in captured.err and "--features" in captured.err


# -- fid: folders, statistics files ----------------------------------------------------------------------------


def test_fid_of_two_folders_equals_library(folder_run, lib, folders):
    result, out_file = folder_run
    assert result["generated"] == str(folders["gen"]) and result["reference"] == str(folders["ref"])
    assert result["preset"] == "clean"
    assert result["n_generated"] == 6  # --recursive: gen/sub/g5.png counts
    assert math.isfinite(result["fid"]) and result["fid"] > 0
    library = FrechetDistance(lib["metric"].extractor)
    library.update_features(lib["ref"], real=True)
    library.update_features(lib["gen"], real=False)
    assert result["fid"] == pytest.approx(float(library.compute()), rel=1e-9)
    assert result["fid"] == pytest.approx(_fid_of_rows(lib["ref"], lib["gen"]), rel=2e-5)
    assert json.loads(out_file.read_text()) == result


def test_fid_kid_is_in_one_pass_equal_library(folder_run, lib):
    result, _ = folder_run
    assert set(result["kid"]) == {"mean", "std"} and set(result["inception-score"]) == {"mean", "std"}
    kid_mean, kid_std = _library_kid(lib)
    assert result["kid"]["mean"] == pytest.approx(kid_mean, rel=1e-9, abs=1e-12)
    assert result["kid"]["std"] == pytest.approx(kid_std, rel=1e-9, abs=1e-12)
    inception = InceptionScore(lib["metric"].extractor, splits=int(IS_SPLITS))
    inception.update_features(lib["gen"], real=False)
    is_mean, is_std = inception.compute().tolist()
    assert result["inception-score"]["mean"] > 1.0  # a non-degenerate score: 3 images per split
    assert result["inception-score"]["mean"] == pytest.approx(is_mean, rel=1e-6)
    assert result["inception-score"]["std"] == pytest.approx(is_std, rel=1e-5, abs=1e-9)


def test_fid_against_stats_file_equals_folder(stats_file, folder_run, folders, capsys):
    path, _ = stats_file
    argv = ["fid", str(folders["gen"]), "--stats", str(path), "--recursive", "--metrics", "fid,kid",
            "--kid-small-set", "shrink", "--tiny"]  # --tiny: the same weights file as --weights fid=PATH
    assert main(argv) == 0
    result, expected = json.loads(capsys.readouterr().out), folder_run[0]
    assert result["reference"] == str(path) and result["n_generated"] == 6
    assert set(result) == {"generated", "reference", "preset", "n_generated", "fid", "kid"}
    assert result["fid"] == pytest.approx(expected["fid"], rel=1e-9)
    assert result["kid"]["mean"] == pytest.approx(expected["kid"]["mean"], rel=1e-9, abs=1e-12)  # stored rows
    assert result["kid"]["std"] == pytest.approx(expected["kid"]["std"], rel=1e-9, abs=1e-12)


def test_foreign_stats_need_the_flag_and_the_right_dimension(root, weights, stats_file, folder_run, folders, capsys):
    plain = root / "pytorch-fid-style.npz"
    with np.load(stats_file[0]) as data:
        np.savez(plain, mu=data["mu"], sigma=data["sigma"])  # as pytorch-fid writes: mu, sigma, no metadata
    argv = ["fid", str(folders["gen"]), "--stats", str(plain), "--recursive", "--weights", f"fid={weights}"]
    assert main([*argv, "--foreign-stats"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_generated"] == 6 and result["fid"] == pytest.approx(folder_run[0]["fid"], rel=1e-9)

    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "--foreign-stats" in captured.err and "metadata" in captured.err

    wrong = root / "wrong-dimension.npz"
    np.savez(wrong, mu=np.zeros(64), sigma=np.eye(64))
    assert main(["fid", str(folders["gen"]), "--stats", str(wrong), "--foreign-stats", "--weights",
                 f"fid={weights}"]) == 2
    assert "dimension 64" in capsys.readouterr().err


def test_stats_of_another_preset_are_refused(stats_file, weights, folders, capsys):
    path, _ = stats_file  # made with the default preset, clean
    argv = ["fid", str(folders["gen"]), "--stats", str(path), "--preset", "legacy-pytorch",
            "--weights", f"fid={weights}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "preset" in err and "'clean'" in err and "'legacy-pytorch'" in err


def test_unknown_metric_names_exit_2(folders, capsys):
    assert main(["fid", str(folders["gen"]), str(folders["ref"]), "--metrics", "fid,precision"]) == 2
    err = capsys.readouterr().err
    assert "precision" in err and "fid, kid, is, cmmd, fd-dinov2" in err
    assert main(["compare", str(folders["gen"]), str(folders["ref"]), "--metrics", "ssim,fid"]) == 2
    assert "'fid'" in capsys.readouterr().err


def test_reference_folder_and_stats_are_exclusive(folders, capsys):
    assert main(["fid", str(folders["gen"]), str(folders["ref"]), "--stats", "x.npz"]) == 2
    assert "not allowed with" in capsys.readouterr().err


# -- CMMD and FD-DINOv2 (their own tiny networks) ---------------------------------------------------------------


@pytest.mark.parametrize("metric, builder", [("cmmd", rkt.tiny_cmmd), ("fd-dinov2", rkt.tiny_fd_dinov2)])
def test_tiny_embedding_metric_equals_library(metric, builder, root, folders, capsys):
    assert main(["fid", str(folders["gen"]), str(folders["ref"]), "--metrics", metric, "--tiny"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_generated"] == 5 and "preset" not in result and "fid" not in result
    assert math.isfinite(result[metric])
    library = rk.load(metric, **builder(root / "rewardkit-tiny" / metric))  # the networks --tiny built
    library.update(folders["ref"], real=True)
    library.update(folders["gen"], real=False)
    assert result[metric] == pytest.approx(float(library.compute()), rel=1e-6, abs=1e-9)


# -- compare ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs(root: Path) -> dict[str, Path]:
    """a/ and b/: stems p0 (identical files), p1, p2 (different images, each pair one size); one unmatched each."""
    a, b = root / "a", root / "b"
    for index, size in enumerate([(48, 40), (40, 56), (64, 48)]):
        _save_smooth(a / f"p{index}.png", size, seed=300 + index)
        if index == 0:
            _save_smooth(b / f"p{index}.png", size, seed=300 + index)
        else:
            _save_smooth(b / f"p{index}.png", size, seed=400 + index, mode="L" if index == 2 else "RGB")
    _save_smooth(a / "only-a.png", (48, 48), seed=500)
    _save_smooth(b / "only-b.png", (48, 48), seed=501)
    return {"a": a, "b": b}


def _tensor(path: Path) -> torch.Tensor:
    return pil_to_tensor(load_image(path))[None]


def test_compare_folders_writes_one_row_per_matched_pair(pairs, root, capsys):
    out = root / "rows.jsonl"
    argv = ["compare", str(pairs["a"]), str(pairs["b"]), "--metrics", "ssim,psnr,lpips", "--tiny", "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    stems = ["p0", "p1", "p2"]  # only-a / only-b have no partner
    assert [(Path(r["a"]).stem, Path(r["b"]).stem) for r in rows] == [(s, s) for s in stems]
    assert all(list(r) == ["a", "b", "ssim", "psnr", "lpips"] for r in rows)
    assert rows[0]["ssim"] == pytest.approx(1.0, abs=1e-6) and rows[0]["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert rows[0]["psnr"] is None  # identical images: PSNR is inf, written as null

    library = {"ssim": rk.load("ssim"), "psnr": rk.load("psnr"),
               "lpips": rk.load("lpips", **rkt.tiny_lpips(root / "rewardkit-tiny" / "lpips"))}  # --tiny's file
    expected = {name: [] for name in library}
    with torch.no_grad():
        for stem in stems:
            a, b = _tensor(pairs["a"] / f"{stem}.png"), _tensor(pairs["b"] / f"{stem}.png")
            for name, metric in library.items():
                expected[name].append(float(metric(a, reference=b)[0]))
    assert math.isinf(expected["psnr"][0])
    for name in library:
        got = [r[name] for r in rows[1:]]
        np.testing.assert_allclose(got, expected[name][1:], rtol=1e-5, atol=1e-6)
    assert all(r["ssim"] < 0.99 and r["lpips"] > 0.01 and 0 < r["psnr"] < 60 for r in rows[1:])  # different images

    assert summary["pairs"] == 3
    assert summary["psnr"]["infinite"] == 1 and summary["ssim"]["infinite"] == 0
    assert summary["psnr"]["mean"] == pytest.approx(np.mean(expected["psnr"][1:]), rel=1e-5)  # finite values
    assert summary["ssim"]["mean"] == pytest.approx(np.mean(expected["ssim"]), rel=1e-5)
    assert summary["lpips"]["mean"] == pytest.approx(np.mean(expected["lpips"]), rel=1e-5)


def test_compare_two_files_to_csv(pairs, root, capsys):
    out = root / "rows.csv"
    a, b = pairs["a"] / "p1.png", pairs["b"] / "p1.png"
    assert main(["compare", str(a), str(b), "--metrics", "psnr,ssim", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["pairs"] == 1
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and list(rows[0]) == ["a", "b", "psnr", "ssim"]
    assert rows[0]["a"] == str(a) and rows[0]["b"] == str(b)
    with torch.no_grad():
        psnr = float(rk.load("psnr")(_tensor(a), reference=_tensor(b))[0])
    assert float(rows[0]["psnr"]) == pytest.approx(psnr, rel=1e-6)


def test_compare_sizes_differ_is_an_error(root, capsys):
    _save_smooth(root / "sized-a" / "x.png", (48, 40), seed=1)
    _save_smooth(root / "sized-b" / "x.png", (40, 48), seed=1)
    assert main(["compare", str(root / "sized-a"), str(root / "sized-b"), "--metrics", "ssim,psnr"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "sized-a/x.png is 48×40 but" in captured.err and "sized-b/x.png is 40×48 (W×H)" in captured.err


def test_compare_folder_with_file_is_an_error(pairs, capsys):
    # The inputs are checked before any network loads: no --tiny needed, nothing is downloaded.
    assert main(["compare", str(pairs["a"]), str(pairs["b"] / "p0.png")]) == 2
    assert "rewardkit: error: compare: compare two images or two folders" in capsys.readouterr().err
