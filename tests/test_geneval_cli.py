"""``rewardkit geneval``: GenEval's folder layout, the summary table, per-image rows (tiny random models)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

import rewardkit as rk
import rewardkit.testing as rkt
from rewardkit.cli import main
from rewardkit.cli_geneval import collect_geneval_folder
from rewardkit.rewards.geneval_rules import summarize
from rewardkit.vlm.judge import tensor_to_pil

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

METADATA = [
    {"tag": "single_object", "include": [{"class": "bowl", "count": 1}], "prompt": "a photo of a bowl"},
    {"tag": "counting", "include": [{"class": "spoon", "count": 2}], "exclude": [{"class": "spoon", "count": 3}],
     "prompt": "a photo of two spoons"},
    {"tag": "colors", "include": [{"class": "skis", "count": 1, "color": "red"}], "prompt": "a photo of red skis"},
]


def _layout(root, own_metadata: bool):
    """GenEval's layout: <index>/metadata.jsonl + <index>/samples/<n>.png (two samples per prompt)."""
    images = tensor_to_pil(rkt.random_images(6, 64, 80, seed=5))
    for index, meta in enumerate(METADATA):
        folder = root / f"{index:05d}"
        (folder / "samples").mkdir(parents=True)
        if own_metadata:
            (folder / "metadata.jsonl").write_text(json.dumps(meta))
        for n in range(2):
            images[2 * index + n].save(folder / "samples" / f"{n:04d}.png")
        Image.new("RGB", (8, 8)).save(folder / "samples" / "grid.png")  # not a sample: ignored as upstream
    return root


def test_cli_prints_geneval_table_and_writes_rows(tmp_path, capsys) -> None:
    root = _layout(tmp_path / "gen", own_metadata=True)
    out, summary = tmp_path / "rows.jsonl", tmp_path / "summary.json"
    assert main(["geneval", str(root), "--tiny", "--out", str(out), "--summary", str(summary)]) == 0
    printed = capsys.readouterr().out
    assert "Total images: 6" in printed and "Total prompts: 3" in printed and "Overall score" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["tag"] for r in rows] == ["single_object"] * 2 + ["counting"] * 2 + ["colors"] * 2
    assert all(r["image"].endswith((".png")) and "grid" not in r["image"] for r in rows)
    # the rows are the library's verdicts on the same files with the same tiny models
    reward = rk.load("geneval", **rkt.tiny_geneval(tmp_path / "models"), score="correct")
    items = collect_geneval_folder(root)
    expected = reward.evaluate_pil([p for p, _ in items], metadata=[m for _, m in items])
    assert [r["correct"] for r in rows] == [bool(v) for v in expected.details["correct"]]
    assert [r["partial"] for r in rows] == pytest.approx(expected.details["partial"].tolist())
    assert json.loads(summary.read_text()) == json.loads(json.dumps(summarize(rows)))


def test_shared_metadata_file_and_csv(tmp_path, capsys) -> None:
    root = _layout(tmp_path / "gen", own_metadata=False)
    with pytest.raises(ValueError, match="no metadata.jsonl"):
        collect_geneval_folder(root)
    shared = tmp_path / "evaluation_metadata.jsonl"
    shared.write_text("".join(json.dumps(m) + "\n" for m in METADATA))
    assert [m["tag"] for _, m in collect_geneval_folder(root, shared)] == [m["tag"] for m in METADATA for _ in range(2)]
    assert main(["geneval", str(root), "--metadata", str(shared), "--tiny", "--out", str(tmp_path / "rows.csv")]) == 0
    assert (tmp_path / "rows.csv").read_text().splitlines()[0].startswith("image,tag,prompt,correct")
    assert main(["geneval", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err
