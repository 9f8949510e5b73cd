"""Tests of rewardkit.report: score files, summary statistics, grid PNG and HTML page."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from PIL import Image

from rewardkit.report import THUMBNAIL_SIZE, summarize, write_report, write_scores

NAMES = ["pickscore", "aesthetic"]


def _rows_and_images(folder: Path) -> tuple[list[dict], list[Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    sizes, colours = [(64, 64), (160, 96), (80, 120)], [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    paths = []
    for index, (size, colour) in enumerate(zip(sizes, colours)):
        paths.append(folder / f"{index}.png")
        Image.new("RGB", size, colour).save(paths[-1])
    rows = [
        {"image": str(paths[0]), "prompt": "a red <b>square</b>", "pickscore": 21.123456789, "aesthetic": 5.5},
        {"image": str(paths[1]), "prompt": "a green field", "pickscore": -3.25, "aesthetic": math.nan},
        {"image": str(paths[2]), "prompt": None, "pickscore": 0.000123, "aesthetic": None},
    ]
    return rows, paths


def test_summarize_skips_nan_none_and_inf():
    rows = [{"a": 1.0, "b": math.nan}, {"a": 3.0, "b": None}, {"a": math.nan, "b": math.inf}, {"a": 2.0}]
    stats = summarize(rows, ["a", "b"])
    assert stats["a"] == {"mean": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert stats["b"]["n"] == 0 and all(math.isnan(stats["b"][k]) for k in ("mean", "min", "max"))


def test_write_report_grid_and_html(tmp_path):
    rows, paths = _rows_and_images(tmp_path / "imgs")
    png, page = write_report(rows, paths, NAMES, tmp_path / "report", "test report")
    assert png == tmp_path / "report" / "report.png" and page == tmp_path / "report" / "report.html"
    with Image.open(png) as grid:
        assert grid.mode == "RGB" and grid.width >= 3 * THUMBNAIL_SIZE and grid.height > THUMBNAIL_SIZE
    text = page.read_text(encoding="utf-8")
    for row in rows:
        for name in NAMES:
            value = row[name]
            if value is not None and math.isfinite(value):
                assert f"{value:.4f}" in text and f'data-value="{value!r}"' in text
    assert text.count("data:image/png;base64,") == len(rows)
    assert "n/a" in text and "&lt;b&gt;square&lt;/b&gt;" in text and "<b>square" not in text
    assert "<script>" in text and 'class="sortable"' in text and "test report" in text
    assert "5.9579" in text  # summary: mean of the pickscore column


def test_write_report_checks_lengths(tmp_path):
    rows, paths = _rows_and_images(tmp_path / "imgs")
    with pytest.raises(ValueError, match="one path per row"):
        write_report(rows, paths[:2], NAMES, tmp_path, "t")


def test_write_scores_nan_as_null_and_empty(tmp_path):
    rows, _ = _rows_and_images(tmp_path / "imgs")
    lines = write_scores(rows, NAMES, tmp_path / "s.jsonl").read_text().splitlines()
    parsed = [json.loads(line) for line in lines]
    assert parsed[1]["aesthetic"] is None and parsed[0]["pickscore"] == 21.123456789
    with write_scores(rows, NAMES, tmp_path / "s.csv").open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == ["image", "prompt", *NAMES]
    assert table[1]["aesthetic"] == "" and table[2]["prompt"] == "" and float(table[0]["aesthetic"]) == 5.5
