"""Tests of the ``rewardkit`` command line (tiny random models; no network)."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rewardkit
from rewardkit.cli import main, parse_weights
from rewardkit.image_io import list_images, load_images, to_tensor
from rewardkit.registry import names as registry_names
from rewardkit.testing import load_tiny

MIXED_SIZES = [(40, 48), (64, 64), (50, 30)]  # (W, H)


def _make_images(folder: Path, sizes=MIXED_SIZES, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index, (width, height) in enumerate(sizes):
        pixels = (rng.random((height, width, 3)) * 255).astype(np.uint8)
        path = folder / f"img{index}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def _library_scores(name: str, root: Path, paths: list[Path], prompts) -> list[float]:
    reward = load_tiny(name, root)
    with torch.inference_mode():
        return reward.evaluate_pil(load_images(paths), prompts).scores.tolist()


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_list_prints_a_table(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:4] == ["NAME", "KIND", "DIFF", "PROMPT"]
    for name in registry_names():
        assert name in out


def test_list_json_parses(capsys):
    assert main(["list", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in entries] == registry_names()
    assert {"kind", "differentiable", "requires_prompt", "default_weights", "description"} <= set(entries[0])
    assert main(["list", "--kind", "reward", "--json"]) == 0
    assert all(e["kind"] == "reward" for e in json.loads(capsys.readouterr().out))


def test_version(capsys):
    assert main(["--version"]) == 0
    assert rewardkit.__version__ in capsys.readouterr().out


def test_score_jsonl_equals_library(tmp_path, capsys):
    paths = _make_images(tmp_path / "imgs")
    out = tmp_path / "scores.jsonl"
    argv = ["score", "pickscore", "aesthetic", "--images", str(tmp_path / "imgs"), "--prompt", "a cat", "--tiny",
            "--batch-size", "2", "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    stdout = captured.out
    assert "pickscore" in stdout and "aesthetic" in stdout and str(out) in stdout
    # stderr is not a terminal: one summary line instead of a progress bar.
    assert re.fullmatch(r"scored 3 images in \d+\.\d s \(\d+\.\d img/s\)", captured.err.strip()), captured.err
    rows = _read_jsonl(out)
    assert [r["image"] for r in rows] == [str(p) for p in paths]
    assert all(list(r) == ["image", "prompt", "pickscore", "aesthetic"] and r["prompt"] == "a cat" for r in rows)
    for name, prompts in (("pickscore", "a cat"), ("aesthetic", None)):
        got = [r[name] for r in rows]
        assert all(math.isfinite(v) for v in got)
        expected = _library_scores(name, tmp_path / "lib", paths, prompts)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_score_csv_with_txt_prompts(tmp_path):
    paths = _make_images(tmp_path / "imgs")
    prompts = ["a red fox", "a blue lake", "a green hill"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "scores.csv"
    argv = ["score", "hpsv2", "--images", *map(str, paths), "--prompts", str(tmp_path / "prompts.txt"), "--tiny",
            "--out", str(out)]
    assert main(argv) == 0
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["image", "prompt", "hpsv2"]
    assert [r["prompt"] for r in rows] == prompts
    got = [float(r["hpsv2"]) for r in rows]
    np.testing.assert_allclose(got, _library_scores("hpsv2", tmp_path / "lib", paths, prompts), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_prompt_table_matched_by_name(tmp_path, suffix):
    paths = _make_images(tmp_path / "imgs")
    table = [("img2.png", "third"), ("img0.png", "first"), ("img1.png", "second")]  # not in image order
    prompts_file = tmp_path / f"prompts{suffix}"
    if suffix == ".jsonl":
        prompts_file.write_text("".join(json.dumps({"image": i, "prompt": p}) + "\n" for i, p in table))
    else:
        prompts_file.write_text("image,prompt\n" + "".join(f"{i},{p}\n" for i, p in table))
    out = tmp_path / "scores.jsonl"
    argv = ["score", "hpsv2", "--images", str(tmp_path / "imgs"), "--prompts", str(prompts_file), "--tiny",
            "--out", str(out)]
    assert main(argv) == 0
    rows = _read_jsonl(out)
    assert [r["prompt"] for r in rows] == ["first", "second", "third"]
    assert [r["image"] for r in rows] == [str(p) for p in paths]


def test_prompt_table_missing_image_is_an_error(tmp_path, capsys):
    _make_images(tmp_path / "imgs")
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"image": "img0.png", "prompt": "x"}) + "\n")
    argv = ["score", "hpsv2", "--images", str(tmp_path / "imgs"), "--prompts", str(prompts_file), "--tiny",
            "--out", str(tmp_path / "s.jsonl")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("rewardkit: error:") and "img1.png" in err and "Traceback" not in err


def test_txt_prompt_count_mismatch(tmp_path, capsys):
    _make_images(tmp_path / "imgs")
    (tmp_path / "prompts.txt").write_text("one\ntwo\n")
    argv = ["score", "pickscore", "--images", str(tmp_path / "imgs"), "--prompts", str(tmp_path / "prompts.txt"),
            "--tiny", "--out", str(tmp_path / "s.jsonl")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "2 prompts" in err and "3 images" in err


def test_unknown_reward_suggests_a_name(tmp_path, capsys):
    _make_images(tmp_path / "imgs")
    argv = ["score", "pickscor", "--images", str(tmp_path / "imgs"), "--prompt", "x", "--out", str(tmp_path / "s.csv")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("rewardkit: error:") and "'pickscore'" in err


def test_bad_out_suffix(tmp_path, capsys):
    _make_images(tmp_path / "imgs")
    argv = ["score", "hpsv2", "--images", str(tmp_path / "imgs"), "--prompt", "x", "--tiny",
            "--out", str(tmp_path / "scores.txt")]
    assert main(argv) == 2
    assert ".jsonl or *.csv" in capsys.readouterr().err


def test_missing_prompt_is_an_error(tmp_path, capsys):
    _make_images(tmp_path / "imgs")
    argv = ["score", "pickscore", "--images", str(tmp_path / "imgs"), "--tiny", "--out", str(tmp_path / "s.csv")]
    assert main(argv) == 2
    assert "--prompt" in capsys.readouterr().err


def test_tensor_path_mixed_sizes_is_an_error(tmp_path, capsys):
    _make_images(tmp_path / "imgs")
    argv = ["score", "hpsv2", "--images", str(tmp_path / "imgs"), "--prompt", "x", "--tiny", "--preprocess",
            "tensor", "--out", str(tmp_path / "s.jsonl")]
    assert main(argv) == 2
    assert "--preprocess exact" in capsys.readouterr().err


def test_tensor_path_equals_library(tmp_path):
    paths = _make_images(tmp_path / "imgs", sizes=[(48, 40)] * 3)
    out = tmp_path / "s.jsonl"
    argv = ["score", "hpsv2", "--images", str(tmp_path / "imgs"), "--prompt", "x", "--tiny", "--preprocess",
            "tensor", "--out", str(out)]
    assert main(argv) == 0
    with torch.inference_mode():
        expected = load_tiny("hpsv2", tmp_path / "lib").evaluate(to_tensor(paths), "x").scores.tolist()
    np.testing.assert_allclose([r["hpsv2"] for r in _read_jsonl(out)], expected, rtol=1e-5, atol=1e-6)


def test_corrupt_image_is_an_error(tmp_path, capsys):
    _make_images(tmp_path / "imgs")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    argv = ["score", "hpsv2", "--images", str(tmp_path / "imgs"), "--prompt", "x", "--tiny",
            "--out", str(tmp_path / "s.jsonl")]
    assert main(argv) == 2
    assert "broken.png" in capsys.readouterr().err


def test_parse_weights():
    assert parse_weights(["hf:a/b"], ["pickscore"]) == {"pickscore": "hf:a/b"}
    assert parse_weights(["pickscore=/w/p", "hpsv2=/w/h.pt"], ["pickscore", "hpsv2"]) == {
        "pickscore": "/w/p", "hpsv2": "/w/h.pt"}
    with pytest.raises(ValueError, match="--weights NAME=VALUE"):
        parse_weights(["/w/p"], ["pickscore", "hpsv2"])
    assert parse_weights(["http://h:8000/v1"], ["unified-reward-2"], "--server") == {
        "unified-reward-2": "http://h:8000/v1"}
    with pytest.raises(ValueError, match="not among"):
        parse_weights(["aesthetic=/w/a"], ["pickscore"])


def test_weights_with_tiny_is_an_error(tmp_path, capsys):
    _make_images(tmp_path / "imgs")
    argv = ["score", "hpsv2", "--images", str(tmp_path / "imgs"), "--prompt", "x", "--tiny", "--weights", "/w.pt",
            "--out", str(tmp_path / "s.jsonl")]
    assert main(argv) == 2
    assert "--tiny" in capsys.readouterr().err


def test_demo_writes_everything(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    for name in ("scores.jsonl", "scores.csv", "report.png", "report.html", "prompts.jsonl"):
        assert (out / name).is_file(), name
    rows = _read_jsonl(out / "scores.jsonl")
    assert len(rows) == len(list_images(out / "images")) >= 6
    assert all(math.isfinite(r[n]) for r in rows for n in ("clip-score", "pickscore", "hpsv2", "aesthetic", "bioclip"))
    sizes = {Image.open(r["image"]).size for r in rows}
    assert len(sizes) > 1 and all(64 <= s <= 160 for size in sizes for s in size)
    assert "meaningless" in capsys.readouterr().out


def test_import_and_help_stay_light():
    code = ("import sys, json; import rewardkit.cli; from rewardkit.cli import main; rc = main(['--help']); "
            "print(json.dumps([rc, sorted(m for m in ('transformers', 'open_clip') if m in sys.modules)]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.splitlines()[-1]) == [0, []]
    script = Path(sys.executable).parent / "rewardkit"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "rewardkit.cli"]
    help_run = subprocess.run([*command, "--help"], capture_output=True, text=True)
    assert help_run.returncode == 0 and "score" in help_run.stdout


def test_server_flags_only_for_judges_and_edit_rewards_are_refused(tmp_path, capsys):
    _make_images(tmp_path / "imgs")
    base = ["--images", str(tmp_path / "imgs"), "--prompt", "x", "--out", str(tmp_path / "s.jsonl")]
    assert main(["score", "hpsv2", "--server", "http://127.0.0.1:9/v1", *base]) == 2
    assert "apply to VLM judges" in capsys.readouterr().err
    assert main(["score", "unified-reward-edit", "--server", "http://127.0.0.1:9/v1", *base]) == 2
    assert "source=" in capsys.readouterr().err
    assert main(["score", "unified-reward-2", "--tiny", "--server", "http://127.0.0.1:9/v1", *base]) == 2
    assert "drop --server" in capsys.readouterr().err


def test_score_with_a_served_judge(tmp_path, tiny_root, monkeypatch):
    # A real local OpenAI-compatible server runs a tiny random Qwen3.5 forced to answer like UnifiedReward 2.0.
    import rewardkit.testing as rkt
    from rewardkit.testing.vlm_server import serve_tiny_vlm

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the server process: one torch thread (tiny model)
    model = rkt.tiny_unified_reward_2(tiny_root / "cli-served")["weights"]
    paths = _make_images(tmp_path / "imgs")
    answer = "Alignment Score (1-5): 4\nCoherence Score (1-5): 3.5\nStyle Score (1-5): 2"
    with serve_tiny_vlm(model, forced_answer=answer, served_name="UnifiedReward") as url:
        argv = ["score", "unified-reward-2", "--images", str(tmp_path / "imgs"), "--prompt", "a cat",
                "--server", url, "--served-model", "UnifiedReward", "--out", str(tmp_path / "s.jsonl")]
        assert main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(rows) == len(paths) and all(row["unified-reward-2"] == pytest.approx(9.5 / 3) for row in rows)
