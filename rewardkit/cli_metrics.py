"""The set-level commands of the ``rewardkit`` CLI: ``fid-stats`` and ``fid`` (``compare``: cli_compare).

Thin: argument parsing and files; the numbers come from ``rewardkit.metrics``. One Inception pass
serves FID, KID and IS together (they share the extractor); CMMD and FD-DINOv2 run their own networks.
Results are printed as JSON (and written with ``--out``); a value that is not finite is written as
``null`` with a ``reason``, so the output is valid JSON. Everything knowable up front (output paths, the
device, image counts against ``--kid-subset-size`` / ``--is-splits``, feature rows in a ``--stats`` file)
is checked before any network runs. Progress bars show on terminals; logs get one summary line per pass.
The options and loader shared with ``compare`` (``_common``, ``_load``, ``_metric_list``, ``_json_text``)
live here; ``rewardkit.cli_compare`` imports them (one way).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

from rewardkit.cli_checks import check_device, check_output, report_pass, weights_hint

__all__ = ["add_commands", "COMMANDS", "run_fid", "run_fid_stats"]

SET_METRICS = ("fid", "kid", "is", "cmmd", "fd-dinov2")
INCEPTION_METRICS = ("fid", "kid", "is")
_REGISTRY_NAME = {"fid": "fid", "kid": "kid", "is": "inception-score", "cmmd": "cmmd", "fd-dinov2": "fd-dinov2"}
MIN_SET_IMAGES = 2  # every set metric needs two images a side (rewardkit.metrics.fid.MIN_IMAGES)


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
    """Register ``fid-stats`` and ``fid`` on the main parser's sub-parsers."""
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
    with weights_hint(name):
        return load(registry_name, weights=weights, device=args.device, **options)


def _count_images(spec: str, recursive: bool, what: str) -> int:
    """Images in a folder (or 1 for a file), counted from the listing before any network is loaded."""
    from rewardkit.image_io import list_images

    path = Path(spec)
    if path.is_file():
        return 1
    if not path.is_dir():
        raise FileNotFoundError(f"{what} {path}: no such file or folder")
    count = len(list_images(path, recursive=recursive))
    if count < MIN_SET_IMAGES:
        hint = "" if recursive else " (add --recursive to read sub-folders)"
        raise ValueError(f"{what} {path}: found {count} images, set metrics need at least {MIN_SET_IMAGES}{hint}")
    return count


def _stats_file_counts(path: str) -> tuple[int, int | None]:
    """``(n, feature rows or None)`` of a statistics file, read without checking its identity (that comes later)."""
    import numpy as np

    if not Path(path).is_file():
        raise FileNotFoundError(f"--stats {path}: no such file; make one with `rewardkit fid-stats DIR --out FILE`")
    with np.load(path, allow_pickle=False) as data:
        rows = int(data["features"].shape[0]) if "features" in data.files else None
        return (int(data["n"]) if "n" in data.files else 0), rows


def run_fid_stats(args: argparse.Namespace) -> dict[str, Any]:
    """Compute and write the reference statistics of ``args.folder``; returns a summary."""
    from rewardkit.metrics.frechet import GaussianReference, GaussianStats, save_statistics

    check_output(args.out)
    check_device(args.device)
    _count_images(args.folder, args.recursive, "DIR")
    metric = _load(args.metric, args)
    stats, rows, began = GaussianStats(metric.extractor.feature_dim), [], time.perf_counter()
    for features in metric.iter_features(args.folder, description=f"{args.metric} statistics"):
        stats.update(features)
        if args.features:
            rows.append(features)
    report_pass(f"{args.metric} statistics: read", stats.n, time.perf_counter() - began)
    if stats.n < 2:
        raise ValueError(f"{args.folder}: need at least 2 images for statistics, found {stats.n}")
    import torch

    reference = GaussianReference.from_stats(stats, {**metric.extractor.identity(), "source": str(args.folder)})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
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
    _check_fid_inputs(args, names)
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
            count, began = 0, time.perf_counter()
            for features in lead.iter_features(args.reference, description=f"{lead.name} reference"):
                count += features.shape[0]
                for member in members:
                    if member.name != "inception-score":
                        member.update_features(features, real=True)
            report_pass(f"{lead.name} reference: read", count, time.perf_counter() - began)
        count, began = 0, time.perf_counter()
        for features in lead.iter_features(args.generated, description=f"{lead.name} generated"):
            count += features.shape[0]
            for member in members:
                member.update_features(features, real=False)
        report_pass(f"{lead.name} generated: read", count, time.perf_counter() - began)
        result["n_generated"] = count
    for name in names:
        result[_REGISTRY_NAME[name]] = _value(metrics[name].compute())
    return result


def _check_fid_inputs(args: argparse.Namespace, names: list[str]) -> None:
    """Everything ``fid`` can check before loading a network: --out, --device, image counts against the
    KID subset size and the IS splits, and feature rows in a --stats file for KID / CMMD."""
    from rewardkit.metrics.inception_score_math import IS_SPLITS

    if args.out:
        check_output(args.out)
    check_device(args.device)
    n_gen = _count_images(args.generated, args.recursive, "GEN_DIR")
    if args.stats:
        n_ref, rows = _stats_file_counts(args.stats)
        needs_rows = [n for n in names if n in ("kid", "cmmd")]
        if needs_rows and rows is None:
            raise ValueError(f"--stats {args.stats} holds no feature rows; {', '.join(needs_rows)} need them: remake "
                             "it with `rewardkit fid-stats DIR --out FILE --features` (same --metric / --preset)")
        n_ref = rows if rows is not None else n_ref
    else:
        n_ref = _count_images(args.reference, args.recursive, "REF_DIR")
    if "kid" in names:
        size = args.kid_subset_size
        if size < MIN_SET_IMAGES:
            raise ValueError(f"--kid-subset-size must be at least {MIN_SET_IMAGES}, got {size}")
        small = [f"{n} {side}" for side, n in (("generated", n_gen), ("reference", n_ref)) if 0 < n < size]
        if small and args.kid_small_set == "error":
            fit = min(n for n in (n_gen, n_ref) if n > 0)
            raise ValueError(f"--kid-subset-size {size} is more than the {' and '.join(small)} images; pass "
                             f"--kid-subset-size {fit} (or less), or --kid-small-set shrink")
    splits = IS_SPLITS if args.is_splits is None else args.is_splits
    if "is" in names and (splits < 1 or n_gen < max(splits, MIN_SET_IMAGES)):
        raise ValueError(f"--is-splits {splits}: the Inception Score needs at least {max(splits, MIN_SET_IMAGES)} "
                         f"generated images and splits >= 1, found {n_gen} images; pass --is-splits {max(1, n_gen)} "
                         "(or less)")


def _fix_reference(metric: Any, reference: Any, rows: Any, path: str) -> None:
    """Give a metric the real side from a statistics file (Gaussian statistics, or stored feature rows)."""
    if hasattr(metric, "set_reference"):
        metric.set_reference(reference)
    elif metric.name != "inception-score":  # IS needs no reference
        if rows is None:
            raise ValueError(f"{path} holds no feature rows; {metric.name} needs them: remake it with "
                             "`rewardkit fid-stats DIR --out FILE --features` (with the same --metric / --preset)")
        metric.set_reference_rows(rows.float())


def _json_text(value: Any) -> str:
    """JSON with every non-finite float as null (``allow_nan=False`` then guarantees valid JSON)."""
    def clean(item: Any) -> Any:
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {key: clean(inner) for key, inner in item.items()}
        return [clean(inner) for inner in item] if isinstance(item, list) else item

    return json.dumps(clean(value), indent=2, allow_nan=False)


def _cmd_fid_stats(args: argparse.Namespace) -> None:
    print(_json_text(run_fid_stats(args)))


def _cmd_fid(args: argparse.Namespace) -> None:
    result = run_fid(args)
    text = _json_text(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", "utf-8")
    print(text)


COMMANDS = {"fid-stats": _cmd_fid_stats, "fid": _cmd_fid}
