"""``rewardkit geneval DIR``: GenEval over a folder of generated images, its summary table and per-image rows.

Folder layout (GenEval ``generation/diffusers_generate.py``, read as ``evaluation/evaluate_images.py`` reads it):
``DIR/<index>/metadata.jsonl`` (one JSON object: the prompt's metadata) and ``DIR/<index>/samples/<n>.png``,
for every all-digit ``<index>`` folder and every ``<digits>.png`` sample. With ``--metadata FILE.jsonl`` (GenEval's
``prompts/evaluation_metadata.jsonl`` or flow_grpo's ``dataset/geneval/test_metadata.jsonl``), a folder without its
own ``metadata.jsonl`` takes line ``<index>`` (0-based) of that file. The table is ``summary_scores.py``'s.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["add_commands", "COMMANDS", "collect_geneval_folder", "run_geneval", "format_summary"]

_SAMPLE = re.compile(r"\d+\.png")  # evaluate_images.py: re.match(r"\d+\.png", imagename)
_COLUMNS = ("image", "tag", "prompt", "correct", "strict", "partial", "reason", "detections")


def add_commands(commands: Any) -> None:
    """Register ``geneval`` on the main parser's sub-parsers."""
    parser = commands.add_parser("geneval", help="GenEval accuracy of a folder of generated images")
    parser.add_argument("folder", metavar="DIR", help="DIR/<index>/metadata.jsonl + DIR/<index>/samples/<n>.png")
    parser.add_argument("--metadata", metavar="FILE.jsonl", help="one metadata object per line, line <index> for "
                        "folder <index> (used where a folder has no metadata.jsonl)")
    parser.add_argument("--out", metavar="FILE", help="per-image rows as .jsonl or .csv")
    parser.add_argument("--summary", metavar="FILE.json", help="also write the summary as JSON")
    parser.add_argument("--weights", help="Mask2Former HF folder or hf: spec (default Swin-S COCO instance)")
    parser.add_argument("--color-weights", help="colour CLIP checkpoint (default open_clip ViT-L-14 OpenAI)")
    parser.add_argument("--device", help="e.g. cpu, cuda (default cpu)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="CLIP precision")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per detector call")
    parser.add_argument("--tiny", action="store_true", help="tiny RANDOM models (offline; meaningless numbers)")


def _read_lines(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"--metadata {path}: no such file")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def collect_geneval_folder(folder: Path, metadata_file: Path | None = None) -> list[tuple[Path, dict]]:
    """``[(image path, metadata)]`` for GenEval's layout, folders in index order, samples in file-name order."""
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder}: not a folder")
    shared = _read_lines(metadata_file) if metadata_file else None
    found = []
    for sub in sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        own = sub / "metadata.jsonl"
        if own.is_file():
            metadata = json.loads(own.read_text(encoding="utf-8"))  # evaluate_images.py: json.load
        elif shared is not None and int(sub.name) < len(shared):
            metadata = shared[int(sub.name)]
        else:
            raise ValueError(f"{sub}: no metadata.jsonl and no line {int(sub.name)} in --metadata; pass --metadata "
                             "with one line per prompt index")
        samples = sub / "samples"
        images = sorted(p for p in samples.iterdir() if p.is_file() and _SAMPLE.match(p.name)) if samples.is_dir() else []
        found += [(image, metadata) for image in images]
    if not found:
        raise ValueError(f"{folder}: no <index>/samples/<n>.png images (GenEval's layout: DIR/00000/samples/0000.png "
                         "with DIR/00000/metadata.jsonl)")
    return found


def run_geneval(reward: Any, items: list[tuple[Path, dict]], batch_size: int = 8) -> list[dict[str, Any]]:
    """Score ``items`` with a ``geneval`` reward: one row per image (``_COLUMNS``)."""
    from tqdm import tqdm

    from rewardkit.image_io import load_images

    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    rows = []
    for start in tqdm(range(0, len(items), batch_size), desc="geneval", unit="batch", disable=not sys.stderr.isatty()):
        batch = items[start:start + batch_size]
        out = reward.evaluate_pil(load_images([p for p, _ in batch]), metadata=[m for _, m in batch])
        for i, (path, meta) in enumerate(batch):
            rows.append({"image": str(path), "tag": meta.get("tag"), "prompt": meta.get("prompt"),
                         "correct": bool(out.details["correct"][i]), "strict": bool(out.details["strict"][i]),
                         "partial": float(out.details["partial"][i]), "reason": out.details["reason"][i],
                         "detections": out.details["raw"][i], "metadata": json.dumps(meta, sort_keys=True)})
    return rows


def format_summary(summary: dict[str, Any]) -> str:
    """GenEval ``summary_scores.py``'s table."""
    lines = ["Summary", "=======", f"Total images: {summary['images']}", f"Total prompts: {summary['prompts']}",
             f"% correct images: {summary['correct_images']:.2%}", f"% correct prompts: {summary['correct_prompts']:.2%}",
             "", "Task breakdown", "=============="]
    lines += [f"{tag:<16} = {t['accuracy']:.2%} ({t['correct']} / {t['n']})" for tag, t in summary["tags"].items()]
    lines += ["", f"Overall score (avg. over tasks): {summary['overall']:.5f}"]
    return "\n".join(lines)


def _load(args: argparse.Namespace, tiny_root: Path | None) -> Any:
    from rewardkit.registry import load

    if tiny_root is not None:
        if args.weights or args.color_weights:
            raise ValueError("--tiny builds random models; drop --weights / --color-weights")
        from rewardkit.testing import tiny_geneval

        return load("geneval", **tiny_geneval(tiny_root), device=args.device, dtype=args.dtype, score="correct")
    return load("geneval", weights=args.weights, color_weights=args.color_weights, device=args.device,
                dtype=args.dtype, score="correct")


def _cmd_geneval(args: argparse.Namespace) -> None:
    from rewardkit.report import write_scores
    from rewardkit.rewards.geneval_rules import summarize

    if args.out and Path(args.out).suffix.lower() not in (".jsonl", ".csv"):
        raise ValueError(f"--out {args.out}: name the file *.jsonl or *.csv")
    items = collect_geneval_folder(Path(args.folder), Path(args.metadata) if args.metadata else None)
    if args.tiny:
        with tempfile.TemporaryDirectory(prefix="rewardkit-tiny-") as root:
            rows = run_geneval(_load(args, Path(root)), items, args.batch_size)
    else:
        rows = run_geneval(_load(args, None), items, args.batch_size)
    summary = summarize(rows)
    print(format_summary(summary))
    if args.out:
        print(f"wrote {write_scores(rows, [], Path(args.out), key_columns=(*_COLUMNS, 'metadata'))}")
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=2), encoding="utf-8")
        print(f"wrote {args.summary}")


COMMANDS = {"geneval": _cmd_geneval}
