"""Evaluation report files: results.json (strict JSON, NaN counted), scores.csv, report.html sections, PNG saving."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch

from rewardkit.eval_report import (
    curve_svg,
    histogram_svg,
    save_png,
    summarize_scores,
    summary_text,
    write_eval_report,
)
from rewardkit.image_io import load_image, pil_to_tensor
from rewardkit.testing import random_images

NAMES = ["total", "pickscore"]
SET_METRICS = {"fid": {"value": 12.5, "std": None, "n": 4, "n_reference": 6, "preset": "clean", "extractor": "inception"},
               "kid": {"value": 0.01, "std": 0.002, "n": 4, "n_reference": 6, "preset": "clean", "extractor": "inception"}}


def _rows(folder: Path) -> list[dict]:
    images = random_images(4, 24, 20, seed=3)
    scores = [(1.0, 2.0), (3.0, float("nan")), (float("nan"), None), (5.0, 4.0)]
    rows = []
    for index, (image, (total, pick)) in enumerate(zip(images, scores)):
        path = save_png(image, folder / f"{index:05d}.png")
        rows.append({"index": index, "prompt": f"prompt <{index}>", "seed": index % 2, "path": str(path),
                     "total": total, "pickscore": pick})
    return rows


def test_save_png_rounds_like_the_set_metrics(tmp_path: Path) -> None:
    image = random_images(1, 9, 7, seed=1)[0]
    path = save_png(image, tmp_path / "sub" / "a.png")
    loaded = pil_to_tensor(load_image(path))
    assert torch.equal((loaded * 255).round(), (image * 255).round())  # exact: 8-bit grid both ways
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        save_png(image * 2, tmp_path / "bad.png")


def test_summary_counts_nan_and_none_and_never_averages_them() -> None:
    rows = [{"a": 1.0}, {"a": float("nan")}, {"a": None}, {"a": 3.0}, {"a": float("inf")}]
    summary = summarize_scores(rows, ["a"])["a"]
    assert summary["n"] == 2 and summary["nan"] == 3
    assert summary["mean"] == 2.0 and summary["min"] == 1.0 and summary["max"] == 3.0
    assert summary["std"] == pytest.approx(math.sqrt(2.0), rel=1e-12)  # sample std (n - 1)
    single = summarize_scores([{"a": 1.0}, {"a": None}], ["a"])["a"]
    assert single["n"] == 1 and math.isnan(single["std"])
    empty = summarize_scores([{"a": None}], ["a"])["a"]
    assert empty["n"] == 0 and empty["nan"] == 1 and math.isnan(empty["mean"])


def test_writes_results_json_scores_csv_and_report_html(tmp_path: Path) -> None:
    rows = _rows(tmp_path / "images")
    history = [{"step": 0, "train/loss": 1.0}, {"step": 5, "train/loss": 0.5}, {"step": 9, "eval/fid": 3.0}]
    paths = write_eval_report(tmp_path / "out", rows, NAMES, SET_METRICS, config={"seed": 0, "rewards": {"pickscore": 1.0}},
                              history=history, title="bench <tiny>")
    assert sorted(paths) == ["report", "results", "scores"] and all(p.is_file() for p in paths.values())

    text = paths["results"].read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    results = json.loads(text)
    assert results["config"]["rewards"] == {"pickscore": 1.0} and results["num_images"] == 4
    assert results["summary"]["total"] == pytest.approx(
        {"mean": 3.0, "std": 2.0, "min": 1.0, "max": 5.0, "n": 3, "nan": 1})
    assert results["summary"]["pickscore"]["n"] == 2 and results["summary"]["pickscore"]["nan"] == 2
    assert results["set_metrics"]["kid"] == SET_METRICS["kid"] and results["set_metrics"]["fid"]["preset"] == "clean"

    with paths["scores"].open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == ["index", "prompt", "seed", "path", "total", "pickscore"]
    assert [r["total"] for r in table] == ["1.0", "3.0", "", "5.0"]  # NaN -> empty cell
    assert table[2]["pickscore"] == "" and table[1]["prompt"] == "prompt <1>" and Path(table[3]["path"]).is_file()

    page = paths["report"].read_text()
    assert page.count('<img class="grid" src="data:image/png;base64,') == 1  # the annotated grid
    assert page.count("<svg") == len(NAMES) + 2  # one histogram per score, one curve per history key
    assert page.count('<table class="sortable">') == 3  # set metrics, summary, images
    assert page.count('data:image/png;base64,') == 1 + len(rows)  # grid + one thumbnail per table row
    assert "bench &lt;tiny&gt;" in page and "prompt &lt;1&gt;" in page  # escaped
    assert "eval/fid" in page and "train/loss" in page and "Training curve" in page
    assert "<script>" in page and "sortable" in page


def test_histogram_counts_finite_values_only() -> None:
    values = [0.0, 0.1, 0.2, 0.9, 1.0, float("nan"), float("inf")]
    svg = histogram_svg(values, "score")
    counts = [int(c) for c in re.findall(r"<title>(\d+)</title>", svg)]
    assert sum(counts) == 5 and len(counts) == math.ceil(math.sqrt(5))
    assert "n=5" in svg
    assert "no finite scores" in histogram_svg([float("nan")], "x")
    one_value = histogram_svg([2.0, 2.0], "flat")  # zero range: one bin holding both
    assert [int(c) for c in re.findall(r"<title>(\d+)</title>", one_value)] == [2]


def test_curve_skips_missing_and_non_finite_points() -> None:
    history = [{"step": 1, "a": 1.0}, {"step": 2, "a": float("nan")}, {"step": 3}, {"step": 4, "a": 2.0}]
    svg = curve_svg(history, "a")
    points = re.search(r'points="([^"]+)"', svg).group(1).split()
    assert len(points) == 2
    assert "no values" in curve_svg(history, "b")


def test_report_without_saved_images_and_all_nan_column(tmp_path: Path) -> None:
    rows = [{"index": i, "prompt": "p", "seed": i, "path": None, "a": float("nan")} for i in range(3)]
    paths = write_eval_report(tmp_path, rows, ["a"])
    page = paths["report"].read_text()
    assert "No images were saved" in page and "No set metrics" in page and "no finite scores" in page
    assert json.loads(paths["results"].read_text())["summary"]["a"] == {
        "mean": None, "min": None, "max": None, "n": 0, "std": None, "nan": 3}


def test_max_images_limits_the_page_not_the_files(tmp_path: Path) -> None:
    rows = _rows(tmp_path / "images")
    paths = write_eval_report(tmp_path / "out", rows, NAMES, max_images=2)
    page = paths["report"].read_text()
    assert "Showing 2 of 4 images" in page and page.count("data:image/png;base64,") == 1 + 2
    assert len(paths["scores"].read_text().strip().splitlines()) == 1 + 4


def test_bad_input_raises_with_a_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no rows"):
        write_eval_report(tmp_path, [], ["a"])
    with pytest.raises(ValueError, match=r"lack score columns \['b'\]"):
        write_eval_report(tmp_path, [{"index": 0, "prompt": "p", "seed": 0, "path": None, "a": 1.0}], ["a", "b"])


def test_summary_text_lists_scores_and_set_metrics(tmp_path: Path) -> None:
    text = summary_text(_rows(tmp_path), NAMES, SET_METRICS)
    lines = text.splitlines()
    assert lines[0].split() == ["score", "mean", "std", "min", "max", "n", "nan"]
    assert lines[1].split()[:2] == ["total", "3.0000"] and lines[1].split()[-2:] == ["3", "1"]
    assert "kid" in lines[4] and "+- 0.0020" in lines[4] and "preset=clean" in lines[3]
