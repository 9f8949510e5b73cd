"""The set-level and paired commands of the ``rewardkit`` CLI: ``fid-stats``, ``fid`` and ``compare``.

Thin: argument parsing and files; the numbers come from ``rewardkit.metrics``. One Inception pass
serves FID, KID and IS together (they share the extractor); CMMD and FD-DINOv2 run their own networks.
Results are printed as JSON (and written with ``--out``); progress bars show on terminals.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Sequence

__all__ = ["add_commands", "COMMANDS", "run_fid", "run_compare", "run_fid_stats"]

SET_METRICS = ("fid", "kid", "is", "cmmd", "fd-dinov2")
INCEPTION_METRICS = ("fid", "kid", "is")
PAIRED_METRICS = ("ssim", "ms-ssim", "psnr", "lpips")
_REGISTRY_NAME = {"fid": "fid", "kid": "kid", "is": "inception-score", "cmmd": "cmmd", "fd-dinov2": "fd-dinov2"}


def _metric_list(text: str, allowed: Sequence[str]) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise ValueError(f"unknown metric(s) {unknown or text!r}; choose from {', '.join(allowed)} (comma-separated)")
    return list(dict.fromkeys(names))


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", action="append", default=[], metavar="NAME=SPEC",
                        help="weights per metric, e.g. fid=./pt_inception.pth (default: upstream files)")
    parser.add_argument("--preset", default="clean", help="FID-Inception resize preset: clean (default), "
                        "legacy-pytorch, torch-fidelity, torchmetrics, diffsynth")
    parser.add_argument("--recursive", action="store_true", help="also read images in sub-folders")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N")
    parser.add_argument("--workers", type=int, default=0, metavar="N", help="DataLoader workers (default 0)")
    parser.add_argument("--device", help="e.g. cpu, cuda (default: cpu)")
    parser.add_argument("--tiny", action="store_true", help="tiny RANDOM networks from rewardkit.testing "
                        "(offline; meaningless numbers, for trying the CLI)")


def add_commands(commands: Any) -> None:
    """Register the three sub-commands on the main parser's sub-parsers."""
    stats = commands.add_parser("fid-stats", help="reference statistics (.npz) of an image folder")
    stats.add_argument("folder", metavar="DIR")
    stats.add_argument("--out", required=True, metavar="FILE.npz")
    stats.add_argument("--metric", choices=("fid", "fd-dinov2", "cmmd"), default="fid",
                       help="whose features (default fid = FID-Inception pool3)")
    stats.add_argument("--features", action="store_true", help="also store every feature row (needed for KID/CMMD "
                       "against this file)")
    _common(stats)
    fid = commands.add_parser("fid", help="FID / KID / IS / CMMD / FD-DINOv2 of a generated folder")
    fid.add_argument("generated", metavar="GEN_DIR")
    source = fid.add_mutually_exclusive_group(required=True)
    source.add_argument("reference", nargs="?", metavar="REF_DIR")
    source.add_argument("--stats", metavar="FILE.npz", help="reference statistics from `rewardkit fid-stats`")
    fid.add_argument("--foreign-stats", action="store_true", help="accept a pytorch-fid / clean-fid .npz (mu, sigma) "
                     "without rewardkit metadata; you vouch that its preset matches --preset")
    fid.add_argument("--metrics", default="fid", help=f"comma-separated: {','.join(SET_METRICS)} (default fid)")
    fid.add_argument("--kid-subset-size", type=int, default=1000, metavar="N")
    fid.add_argument("--kid-small-set", choices=("error", "shrink"), default="error",
                     help="fewer images than the subset size: error (default) or shrink the subsets")
    fid.add_argument("--is-splits", type=int, metavar="N", help="Inception Score splits (default 10); IS needs "
                     "at least this many generated images")
    fid.add_argument("--out", metavar="FILE.json", help="also write the JSON result here")
    _common(fid)
    compare = commands.add_parser("compare", help="paired metrics (SSIM, PSNR, LPIPS) of two files or folders")
    compare.add_argument("a", metavar="A")
    compare.add_argument("b", metavar="B")
    compare.add_argument("--metrics", default="ssim,psnr,lpips", help=f"comma-separated: {','.join(PAIRED_METRICS)}")
    compare.add_argument("--out", metavar="FILE", help="per-pair rows as .jsonl or .csv")
    _common(compare)


def _weights(specs: Sequence[str]) -> dict[str, str]:
    out = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep:
            raise ValueError(f"--weights {spec!r}: use NAME=SPEC, e.g. fid=./pt_inception.pth")
        out[name] = value
    return out


def _load(name: str, args: argparse.Namespace, **options: Any) -> Any:
    """``rk.load`` of a set metric (``_REGISTRY_NAME`` keys) with the CLI's options (tiny or real weights)."""
    from rewardkit import testing as rkt
    from rewardkit.registry import get_entry, load

    registry_name = _REGISTRY_NAME.get(name, name)
    weights = _weights(args.weights).get(name)
    if args.tiny and weights is not None:
        raise ValueError(f"--tiny builds random weights for every metric; drop --weights {name}=... or --tiny")
    if args.tiny:
        import tempfile

        builder = getattr(rkt, get_entry(registry_name).tiny)
        built = builder(Path(tempfile.gettempdir()) / "rewardkit-tiny" / registry_name)
        weights, options = built.pop("weights"), {**built, **options}
    if registry_name in ("fid", "kid", "inception-score"):
        options["preset"] = args.preset
    if get_entry(registry_name).kind == "distribution":
        options.update(batch_size=args.batch_size, num_workers=args.workers, recursive=args.recursive)
    return load(registry_name, weights=weights, device=args.device, **options)


def run_fid_stats(args: argparse.Namespace) -> dict[str, Any]:
    """Compute and write the reference statistics of ``args.folder``; returns a summary."""
    from rewardkit.metrics.frechet import GaussianReference, GaussianStats, save_statistics

    metric = _load(args.metric, args)
    stats, rows = GaussianStats(metric.extractor.feature_dim), []
    for features in metric.iter_features(args.folder, description=f"{args.metric} statistics"):
        stats.update(features)
        if args.features:
            rows.append(features)
    if stats.n < 2:
        raise ValueError(f"{args.folder}: need at least 2 images for statistics, found {stats.n}")
    import torch

    reference = GaussianReference.from_stats(stats, {**metric.extractor.identity(), "source": str(args.folder)})
    save_statistics(args.out, reference, torch.cat(rows) if rows else None)
    return {"out": str(args.out), "n": stats.n, **reference.meta}


def _value(tensor: Any) -> Any:
    values = [float(v) for v in tensor.reshape(-1)]
    if len(values) == 2:
        return {"mean": values[0], "std": values[1]}
    return values[0]


def run_fid(args: argparse.Namespace) -> dict[str, Any]:
    """Compute the requested set metrics of ``args.generated`` against a folder or statistics file."""
    from rewardkit.metrics.frechet import load_statistics

    names = _metric_list(args.metrics, SET_METRICS)
    result: dict[str, Any] = {"generated": str(args.generated), "reference": str(args.reference or args.stats)}
    inception = [n for n in names if n in INCEPTION_METRICS]
    metrics: dict[str, Any] = {}
    if inception:
        first = _load("fid", args)
        extractor = first.extractor
        options = {"batch_size": args.batch_size, "num_workers": args.workers, "recursive": args.recursive}
        from rewardkit.metrics.inception_score import InceptionScore
        from rewardkit.metrics.kid import KID

        metrics["fid"] = first
        if "kid" in names:
            metrics["kid"] = KID(extractor, subset_size=args.kid_subset_size, small_set=args.kid_small_set, **options)
        if "is" in names:
            splits = {} if args.is_splits is None else {"splits": args.is_splits}
            metrics["is"] = InceptionScore(extractor, **splits, **options)
        result["preset"] = extractor.prep.preset
    for name in names:
        if name not in INCEPTION_METRICS:
            metrics[name] = _load(name, args)
    groups = {"inception": [m for n, m in metrics.items() if n in INCEPTION_METRICS]} if inception else {}
    groups.update({n: [m] for n, m in metrics.items() if n not in INCEPTION_METRICS})
    for members in groups.values():
        lead = members[0]
        if args.stats:
            reference, rows = load_statistics(args.stats, identity=lead.extractor.identity(), foreign=args.foreign_stats)
            for member in members:
                _fix_reference(member, reference, rows, args.stats)
        else:
            for features in lead.iter_features(args.reference, description=f"{lead.name} reference"):
                for member in members:
                    if member.name != "inception-score":
                        member.update_features(features, real=True)
        count = 0
        for features in lead.iter_features(args.generated, description=f"{lead.name} generated"):
            count += features.shape[0]
            for member in members:
                member.update_features(features, real=False)
        result["n_generated"] = count
    for name in names:
        result[_REGISTRY_NAME[name]] = _value(metrics[name].compute())
    return result


def _fix_reference(metric: Any, reference: Any, rows: Any, path: str) -> None:
    """Give a metric the real side from a statistics file (Gaussian statistics, or stored feature rows)."""
    if hasattr(metric, "set_reference"):
        metric.set_reference(reference)
    elif metric.name != "inception-score":  # IS needs no reference
        if rows is None:
            raise ValueError(f"{path} holds no feature rows; {metric.name} needs them: remake it with "
                             "`rewardkit fid-stats DIR --out FILE --features` (with the same --metric / --preset)")
        metric.set_reference_rows(rows.float())


def _pairs(a: str, b: str, recursive: bool = False) -> list[tuple[Path, Path]]:
    from rewardkit.compat.diffsynth_sets import _pairs as pairs

    return [(Path(x), Path(y)) for x, y, _ in pairs(a, b, what="compare", recursive=recursive)]


def run_compare(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per-pair paired metrics of two files or two name-matched folders."""
    import torch

    from rewardkit.image_io import load_image, pil_to_tensor

    names = _metric_list(args.metrics, PAIRED_METRICS)
    pairs = _pairs(args.a, args.b, args.recursive)  # input errors before any network is loaded (or downloaded)
    metrics = {n: _load(n, args) if n == "lpips" else _load_paired(n, args) for n in names}
    for metric in metrics.values():
        metric.to(args.device or "cpu")
    rows = []
    for path_a, path_b in pairs:
        a, b = pil_to_tensor(load_image(path_a))[None], pil_to_tensor(load_image(path_b))[None]
        if a.shape != b.shape:
            raise ValueError(f"{path_a.name} and {path_b.name} differ in size ({tuple(a.shape[2:])} vs "
                             f"{tuple(b.shape[2:])}); paired metrics compare equal sizes: resize one side first")
        row: dict[str, Any] = {"a": str(path_a), "b": str(path_b)}
        with torch.no_grad():
            for name, metric in metrics.items():
                row[name] = float(metric(a, reference=b)[0])
        rows.append(row)
    return rows


def _load_paired(name: str, args: argparse.Namespace) -> Any:
    from rewardkit.registry import load

    return load(name, device=args.device)


def _summary(rows: list[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"pairs": len(rows)}
    for name in names:
        finite = [r[name] for r in rows if math.isfinite(r[name])]
        out[name] = {"mean": sum(finite) / len(finite) if finite else float("nan"), "infinite": len(rows) - len(finite)}
    return out


def _cmd_fid_stats(args: argparse.Namespace) -> None:
    print(json.dumps(run_fid_stats(args), indent=2))


def _cmd_fid(args: argparse.Namespace) -> None:
    result = run_fid(args)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n", "utf-8")
    print(text)


def _cmd_compare(args: argparse.Namespace) -> None:
    from rewardkit.report import write_scores

    rows = run_compare(args)
    names = _metric_list(args.metrics, PAIRED_METRICS)
    if args.out:
        write_scores(rows, names, Path(args.out), key_columns=("a", "b"))
    print(json.dumps(_summary(rows, names), indent=2))


COMMANDS = {"fid-stats": _cmd_fid_stats, "fid": _cmd_fid, "compare": _cmd_compare}
