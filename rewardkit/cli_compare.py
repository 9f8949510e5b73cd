"""The paired command of the ``rewardkit`` CLI: ``compare`` (SSIM, MS-SSIM, PSNR, LPIPS of image pairs).

Thin: argument parsing and files; the numbers come from ``rewardkit.metrics``. Two files, or two folders
matched by name, are compared pair by pair; ``--out`` writes one row per pair (.jsonl or .csv) and the
printed JSON summary holds each metric's mean over the finite values (a mean that does not exist is
``null`` with a ``reason``). Everything knowable up front (the output path, the device, the pairing, pair
sizes against each other and MS-SSIM's minimum, read from the image headers) is checked before any network
runs. The options shared with ``fid`` (``--weights``, ``--tiny``, ...) and the loader come from
``rewardkit.cli_metrics`` (one way: it imports nothing from here).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from rewardkit.cli_checks import check_device, check_output, report_pass
from rewardkit.cli_metrics import _common, _json_text, _load, _metric_list

__all__ = ["add_commands", "COMMANDS", "run_compare"]

PAIRED_METRICS = ("ssim", "ms-ssim", "psnr", "lpips")
PAIR_SUFFIXES = (".jsonl", ".csv")
_EXIF_ORIENTATION = 0x0112  # EXIF tag; values 5-8 rotate by 90 degrees, so width and height swap on load
_TRANSPOSED = (5, 6, 7, 8)


def add_commands(commands: Any) -> None:
    """Register ``compare`` on the main parser's sub-parsers."""
    compare = commands.add_parser("compare", help="paired metrics (SSIM, PSNR, LPIPS) of two files or folders")
    compare.add_argument("a", metavar="A")
    compare.add_argument("b", metavar="B")
    compare.add_argument("--metrics", default="ssim,psnr,lpips", help=f"comma-separated: {','.join(PAIRED_METRICS)}")
    compare.add_argument("--out", metavar="FILE", help="per-pair rows as .jsonl or .csv")
    _common(compare)


def _pairs(a: str, b: str, recursive: bool = False) -> list[tuple[Path, Path]]:
    from rewardkit.compat.diffsynth_sets import _pairs as pairs

    return [(Path(x), Path(y)) for x, y, _ in pairs(a, b, what="compare", recursive=recursive)]


def _image_size(path: Path) -> tuple[int, int]:
    """``(W, H)`` of an image file as ``load_image`` will give it (EXIF rotation applied), from its header."""
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
        return (height, width) if image.getexif().get(_EXIF_ORIENTATION, 1) in _TRANSPOSED else (width, height)


def _check_pair_sizes(pairs: list[tuple[Path, Path]], minimum: dict[str, int]) -> None:
    """Equal sizes within each pair and every metric's minimum side, from the headers (no pixels decoded)."""
    for path_a, path_b in pairs:
        (wa, ha), (wb, hb) = _image_size(path_a), _image_size(path_b)
        if (wa, ha) != (wb, hb):
            raise ValueError(f"{path_a} is {wa}×{ha} but {path_b} is {wb}×{hb} (W×H); paired metrics compare images "
                             "of equal size: resize one side first")
        for name, side in minimum.items():
            if min(wa, ha) < side:
                raise ValueError(f"--metrics {name}: needs images of at least {side}×{side}, {path_a} is {wa}×{ha} "
                                 f"(W×H); drop {name} from --metrics or compare larger images")


def _size_text(tensor: Any) -> str:
    return f"{tensor.shape[-1]}×{tensor.shape[-2]}"


def run_compare(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per-pair paired metrics of two files or two name-matched folders."""
    import torch
    from tqdm import tqdm

    from rewardkit.image_io import load_image, pil_to_tensor

    names = _metric_list(args.metrics, PAIRED_METRICS)
    if args.out:
        if Path(args.out).suffix.lower() not in PAIR_SUFFIXES:
            raise ValueError(f"--out {args.out}: unknown format {Path(args.out).suffix!r}; name the file *.jsonl or *.csv")
        check_output(args.out)
    check_device(args.device)
    pairs = _pairs(args.a, args.b, args.recursive)  # input errors before any network is loaded (or downloaded)
    metrics = {n: _load_paired(n, args) for n in names if n != "lpips"}  # closed-form: nothing to load
    _check_pair_sizes(pairs, {n: m.min_size for n, m in metrics.items() if getattr(m, "min_size", None)})
    if "lpips" in names:
        metrics = {n: metrics[n] if n != "lpips" else _load(n, args) for n in names}
    for metric in metrics.values():
        metric.to(args.device or "cpu")
    rows, began = [], time.perf_counter()
    for path_a, path_b in tqdm(pairs, desc="compare", unit="pair", disable=not sys.stderr.isatty()):
        a, b = pil_to_tensor(load_image(path_a))[None], pil_to_tensor(load_image(path_b))[None]
        if a.shape != b.shape:
            raise ValueError(f"{path_a} is {_size_text(a)} but {path_b} is {_size_text(b)} (W×H); paired metrics "
                             "compare images of equal size: resize one side first")
        row: dict[str, Any] = {"a": str(path_a), "b": str(path_b)}
        with torch.no_grad():
            for name, metric in metrics.items():
                row[name] = float(metric(a, reference=b)[0])
        rows.append(row)
    report_pass("compared", len(rows), time.perf_counter() - began, unit="pairs")
    return rows


def _load_paired(name: str, args: argparse.Namespace) -> Any:
    from rewardkit.registry import load

    return load(name, device=args.device)


def _summary(rows: list[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """Mean of the finite values per metric and how many were not finite; a mean that does not exist is
    ``None`` (JSON null) with a ``reason``, never a bare NaN."""
    out: dict[str, Any] = {"pairs": len(rows)}
    for name in names:
        finite = [r[name] for r in rows if math.isfinite(r[name])]
        entry: dict[str, Any] = {"mean": sum(finite) / len(finite) if finite else None,
                                 "infinite": len(rows) - len(finite)}
        if not finite:
            note = " (PSNR is infinite for identical images)" if name == "psnr" else ""
            entry["reason"] = f"none of the {len(rows)} values is finite{note}"
        out[name] = entry
    return out


def _cmd_compare(args: argparse.Namespace) -> None:
    from rewardkit.report import write_scores

    rows = run_compare(args)
    names = _metric_list(args.metrics, PAIRED_METRICS)
    if args.out:
        write_scores(rows, names, Path(args.out), key_columns=("a", "b"))
    print(_json_text(_summary(rows, names)))


COMMANDS = {"compare": _cmd_compare}
