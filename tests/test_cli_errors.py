"""User errors of the ``rewardkit`` CLI are one line ``rewardkit: error: ...``, exit 2, before any work (issue 13.5).

Every case runs ``rewardkit.cli.main([...])``. Where the check must come before any model is loaded, model
loading is made to fail the test (``no_models``); where a model must be looked for (missing weights), the
feature and scoring passes are (``no_scoring``). The images are tiny PNGs; no network, no weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rewardkit.cli as cli
import rewardkit.registry as registry
import rewardkit.testing as rkt
from rewardkit.cli import main
from rewardkit.metrics.base import FeatureMetric

READ_ONLY = "/sys/rewardkit-test-out"  # sysfs refuses new files even to root (chmod does not stop root)


def _refuse(*args, **kwargs):
    raise AssertionError("work ran before the user error was reported: the check must come first")


@pytest.fixture
def no_models(monkeypatch):
    monkeypatch.setattr(registry, "load", _refuse)
    monkeypatch.setattr(rkt, "load_tiny", _refuse)


@pytest.fixture
def no_scoring(monkeypatch):
    monkeypatch.setattr(FeatureMetric, "iter_features", _refuse)
    monkeypatch.setattr(cli, "score_images", _refuse)


def _save(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> Path:
    """PNG files img0.png, ... of the given (W, H) sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index, (width, height) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"img{index}.png")
    return folder


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    return {"gen": _save(tmp_path / "gen", [(40, 48)] * 3), "ref": _save(tmp_path / "ref", [(40, 48)] * 3, seed=1),
            "wide": _save(tmp_path / "wide", [(48, 40)] * 3, seed=2), "one": _save(tmp_path / "one", [(40, 48)])}


def _error(code: int, capsys) -> str:
    """The one stderr line of a user error (asserts exit 2, one line, the prefix, no traceback)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("rewardkit: error: "), err
    return lines[0]


def test_missing_fid_weights_name_the_cli_flag(folders, capsys, no_scoring) -> None:
    line = _error(main(["fid", str(folders["gen"]), str(folders["ref"])]), capsys)
    assert "--weights fid=PATH" in line and "weights=..." not in line


def test_missing_lpips_weights_name_the_cli_flag(folders, capsys, no_scoring) -> None:
    line = _error(main(["compare", str(folders["gen"]), str(folders["ref"]), "--metrics", "lpips"]), capsys)
    assert "--weights lpips=PATH" in line and "weights=..." not in line


def test_failed_download_is_one_line(folders, capsys, no_scoring, monkeypatch, tmp_path) -> None:
    # Offline mode off: the library tries to download, the test's socket guard refuses (as a network would).
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "REWARDKIT_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    line = _error(main(["fid", str(folders["gen"]), str(folders["ref"])]), capsys)
    assert "download" in line and "--weights fid=PATH" in line


def _out_cases(folders: dict[str, Path], out: str) -> list[list[str]]:
    gen, ref = str(folders["gen"]), str(folders["ref"])
    return [["fid", gen, ref, "--out", out + ".json"], ["fid-stats", ref, "--out", out + ".npz"],
            ["compare", gen, ref, "--metrics", "psnr", "--out", out + ".jsonl"],
            ["score", "aesthetic", "--images", gen, "--tiny", "--out", out + ".jsonl"]]


def test_unwritable_out_is_reported_before_any_work(folders, capsys, no_models, tmp_path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    for out, expected in ((READ_ONLY, "cannot write"), (str(tmp_path / "a-file" / "result"), "is a file")):
        for argv in _out_cases(folders, out):
            line = _error(main(argv), capsys)
            assert f"--out {out}" in line and expected in line, argv


def test_cuda_without_cuda_is_reported_before_any_work(folders, capsys, no_models, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gen, ref = str(folders["gen"]), str(folders["ref"])
    for argv in (["fid", gen, ref], ["compare", gen, ref], ["fid-stats", ref, "--out", "x.npz"],
                 ["score", "aesthetic", "--images", gen, "--out", "x.jsonl"]):
        line = _error(main([*argv, "--device", "cuda"]), capsys)
        assert "--device cuda: CUDA is not available" in line, argv


def test_kid_subset_larger_than_the_sets_names_the_flags(folders, capsys, no_models) -> None:
    line = _error(main(["fid", str(folders["gen"]), str(folders["ref"]), "--metrics", "fid,kid"]), capsys)
    assert "--kid-subset-size 1000" in line and "--kid-subset-size 3" in line and "--kid-small-set shrink" in line
    assert "subset_size=" not in line


def test_is_splits_larger_than_the_set_names_the_flag(folders, capsys, no_models) -> None:
    line = _error(main(["fid", str(folders["gen"]), str(folders["ref"]), "--metrics", "is"]), capsys)
    assert "--is-splits 10" in line and "found 3 images" in line


def test_a_one_image_folder_is_refused_up_front(folders, capsys, no_models) -> None:
    line = _error(main(["fid", str(folders["one"]), str(folders["ref"])]), capsys)
    assert "found 1 images" in line and "at least 2" in line


def test_compare_sizes_are_checked_up_front_in_w_x_h(folders, capsys, no_models) -> None:
    line = _error(main(["compare", str(folders["gen"]), str(folders["wide"]), "--metrics", "lpips"]), capsys)
    assert "is 40×48 but" in line and "is 48×40 (W×H)" in line


def test_ms_ssim_minimum_size_is_checked_before_scoring(folders, capsys, monkeypatch) -> None:
    from rewardkit.metrics.ssim import MSSSIM

    monkeypatch.setattr(MSSSIM, "score_pairs", _refuse)
    line = _error(main(["compare", str(folders["gen"]), str(folders["ref"]), "--metrics", "ms-ssim"]), capsys)
    assert re.search(r"--metrics ms-ssim: needs images of at least (\d+)×\1, .*img0\.png is 40×48 \(W×H\)", line)


def test_compare_writes_valid_json_with_null_and_a_reason(folders, capsys, tmp_path) -> None:
    out = tmp_path / "rows.jsonl"
    gen = str(folders["gen"])
    assert main(["compare", gen, gen, "--metrics", "psnr,ssim", "--out", str(out)]) == 0
    captured = capsys.readouterr()

    def refuse_constant(name: str):
        raise AssertionError(f"bare {name} in JSON output")

    summary = json.loads(captured.out, parse_constant=refuse_constant)
    assert summary["psnr"]["mean"] is None and "identical" in summary["psnr"]["reason"]
    assert summary["psnr"]["infinite"] == 3 and summary["ssim"]["mean"] == pytest.approx(1.0)
    rows = [json.loads(line, parse_constant=refuse_constant) for line in out.read_text().splitlines()]
    assert [row["psnr"] for row in rows] == [None] * 3
    # Not a terminal: one summary line instead of a progress bar.
    assert re.fullmatch(r"compared 3 pairs in \d+\.\d s \(\d+\.\d pairs/s\)", captured.err.strip())
