"""The ``rewardkit`` command line: ``list``, ``score``, ``demo`` (+ ``fid-stats``, ``fid``; ``compare`` in cli_compare).

Thin by design: it parses arguments, reads and writes files and prints; the scores come from the library
(``rk.load`` and each reward's ``evaluate_pil`` / ``evaluate``). Model code is imported only by the command
that needs it, so ``rewardkit --help`` imports neither transformers nor open_clip.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from rewardkit import __version__
from rewardkit.cli_checks import check_device, check_output, one_line, report_pass, weights_hint
from rewardkit.cli_inputs import OUTPUT_SUFFIXES, check_rewards, collect_images, parse_weights, read_prompts
from rewardkit.registry import list_rewards

__all__ = ["main", "run_score", "score_images", "make_demo_images"]

DEMO_REWARDS = ("clip-score", "pickscore", "hpsv2", "aesthetic", "bioclip")
# Library errors become one line `rewardkit: error: ...` and exit code 2, never a traceback (ImageLoadError is a
# ValueError; OSError covers unreadable inputs and unwritable outputs; ImportError a missing optional package).
_USER_ERRORS = (ValueError, TypeError, KeyError, OSError, ImportError)
_DEMO_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 70, 220), "yellow": (250, 220, 50),
                 "purple": (120, 40, 160), "white": (250, 250, 250), "black": (15, 15, 15), "orange": (250, 140, 40)}
_DEMO_SIZES = ((128, 128), (160, 96), (64, 64), (96, 144), (160, 160), (112, 80), (80, 112), (144, 120))  # (W, H)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rewardkit", description="Rewards and metrics for text-to-image models.")
    parser.add_argument("--version", action="version", version=f"rewardkit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    lister = commands.add_parser("list", help="list registered rewards and metrics")
    lister.add_argument("--kind", choices=("reward", "distribution"), help="only this kind")
    lister.add_argument("--json", action="store_true", help="print the registry metadata as JSON")
    score = commands.add_parser("score", help="score image files or folders with one or more rewards")
    score.add_argument("names", nargs="+", metavar="NAME", help="reward names (see `rewardkit list`)")
    score.add_argument("--images", nargs="+", required=True, metavar="DIR|FILE", help="image folders or files")
    prompts = score.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", metavar="TEXT", help="one prompt for every image")
    prompts.add_argument("--prompts", metavar="FILE", help=".txt (one line per image, in order) or .jsonl/.csv "
                         "with columns 'image' (file name or path relative to its folder) and 'prompt'")
    score.add_argument("--weights", action="append", default=[], metavar="SPEC|NAME=SPEC",
                       help="local path, hf:owner/repo[/file] or ms:owner/repo[/file]; NAME=SPEC per reward")
    score.add_argument("--server", action="append", default=[], metavar="URL|NAME=URL",
                       help="VLM judges: an OpenAI-compatible server (vLLM, SGLang) serving the judge, "
                       "e.g. http://host:8000/v1, instead of local weights")
    score.add_argument("--served-model", action="append", default=[], metavar="MODEL|NAME=MODEL",
                       help="VLM judges: the model name on --server (default: the server's first model)")
    score.add_argument("--device", help="e.g. cpu, cuda, cuda:1, mps (default: cpu)")
    score.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="fp32 = exact (default)")
    score.add_argument("--batch-size", type=int, default=16, metavar="N", help="images per batch (default 16)")
    score.add_argument("--preprocess", choices=("exact", "tensor"), default="exact", help="exact: upstream PIL "
                       "preprocessing, any sizes (default); tensor: the tensor path, one image size per batch")
    score.add_argument("--tiny", action="store_true", help="use tiny RANDOM models from rewardkit.testing "
                       "(offline; the numbers are meaningless, for trying the CLI)")
    score.add_argument("--out", required=True, metavar="FILE", help="scores.jsonl or scores.csv")
    from rewardkit.cli_serve import add_engine_flags

    add_engine_flags(score)  # --engine ray (Ray Data) and its flags
    demo = commands.add_parser("demo", help="offline demo: tiny random models score synthetic images, with a report")
    demo.add_argument("--out", default="rewardkit-demo", metavar="DIR", help="output folder (default ./rewardkit-demo)")
    demo.add_argument("--rewards", nargs="+", default=list(DEMO_REWARDS), metavar="NAME",
                      help=f"rewards to run (default: {' '.join(DEMO_REWARDS)})")
    from rewardkit.cli_metrics import add_commands
    from rewardkit.cli_compare import add_commands as add_compare
    from rewardkit.cli_geneval import add_commands as add_geneval

    add_commands(commands)
    add_compare(commands)
    add_geneval(commands)
    from rewardkit.cli_verify import add_commands as add_verify

    add_verify(commands)
    from rewardkit.cli_serve import add_commands as add_serve

    add_serve(commands)
    return parser


def _cmd_list(args: argparse.Namespace) -> None:
    entries = list_rewards(args.kind)
    if args.json:
        print(json.dumps(entries, indent=2))
        return
    yes_no = {True: "yes", False: "no"}
    def needs(entry: dict) -> str:  # what a reward takes beside the scored images and prompts
        keys = [key for key, flag in (("reference=", "requires_reference"), ("source=", "requires_source"),
                                      ("metadata=", "requires_metadata")) if entry[flag]]
        return ",".join(keys) or "-"

    table = [("NAME", "KIND", "DIFF", "PROMPT", "NEEDS", "DEFAULT WEIGHTS", "DESCRIPTION")] + [
        (e["name"], e["kind"], yes_no[e["differentiable"]], yes_no[e["requires_prompt"]], needs(e),
         e["default_weights"] or "-", e["description"]) for e in entries]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])


def _batch_tensor(batch: list[Any], paths: Sequence[Path], device: str | None) -> Any:
    from rewardkit.image_io import to_tensor

    sizes = sorted({image.size for image in batch})
    if len(sizes) > 1:
        shown = ", ".join(f"{w}×{h}" for w, h in sizes)
        raise ValueError(f"--preprocess tensor needs one image size per batch, got sizes (W×H) {shown} in the batch "
                         f"starting at {paths[0]}; use --preprocess exact (the default) for images of mixed sizes")
    tensor = to_tensor(batch)
    return tensor if device is None else tensor.to(device)


def score_images(rewards: dict[str, Any], paths: Sequence[Path], prompts: list[str] | None, *, batch_size: int = 16,
                 preprocess: str = "exact", device: str | None = None) -> dict[str, list[float]]:
    """Score files in batches with every reward (the loop behind ``score`` and ``demo``): ``{name: scores}``."""
    import torch
    from tqdm import tqdm

    from rewardkit.image_io import load_images

    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    scores: dict[str, list[float]] = {name: [] for name in rewards}
    began = time.perf_counter()
    with torch.inference_mode(), tqdm(total=len(paths), desc="scoring", unit="img",
                                      disable=not sys.stderr.isatty()) as bar:
        for start in range(0, len(paths), batch_size):
            batch_paths = paths[start : start + batch_size]
            batch, tensor = load_images(batch_paths), None
            batch_prompts = None if prompts is None else prompts[start : start + batch_size]
            for name, reward in rewards.items():
                texts = batch_prompts if reward.requires_prompt else None
                if preprocess == "exact" and hasattr(reward, "evaluate_pil"):
                    values = reward.evaluate_pil(batch, texts).scores
                else:
                    tensor = _batch_tensor(batch, batch_paths, device) if tensor is None else tensor
                    evaluate = getattr(reward, "evaluate", None)  # the protocol only promises __call__
                    values = evaluate(tensor, texts).scores if evaluate else reward(tensor, texts)
                scores[name] += values.float().cpu().tolist()
            bar.update(len(batch_paths))
    report_pass("scored", len(paths), time.perf_counter() - began)
    return scores


def _load_rewards(names: Sequence[str], weights: dict[str, str], device: str | None, dtype: str | None,
                  tiny_root: Path | None, served: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    if tiny_root is None:
        from rewardkit.registry import load

        served = served or {}
        loaded = {}
        for name in names:
            # --dtype fp32 is the CLI's default, not a request: a served judge runs in the server's dtype.
            local_dtype = None if name in served and dtype in (None, "fp32") else dtype
            with weights_hint(name):
                loaded[name] = load(name, weights=weights.get(name), device=device, dtype=local_dtype,
                                    **served.get(name, {}))
        return loaded
    from transformers.utils import logging as hf_logging

    from rewardkit.testing import load_tiny

    bars_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # silence transformers' "Writing model shards" while tiny models are saved
    try:
        return {name: load_tiny(name, tiny_root, device=device, dtype=dtype) for name in names}
    finally:
        if bars_on:
            hf_logging.enable_progress_bar()


def run_score(names: Sequence[str], image_specs: Sequence[str], *, prompt: str | None = None,
              prompts_file: str | None = None, weights: Sequence[str] = (), device: str | None = None,
              dtype: str | None = None, batch_size: int = 16, preprocess: str = "exact",
              tiny_root: Path | None = None, outs: Sequence[Path] = (), servers: Sequence[str] = (),
              served_models: Sequence[str] = ()) -> list[dict[str, Any]]:
    """What ``rewardkit score`` does before printing: writes ``outs`` and returns one row per image."""
    names = list(dict.fromkeys(names))
    served: dict[str, dict[str, str]] = {}
    for flag, key, specs in (("--server", "server", servers), ("--served-model", "served_model", served_models)):
        for name, value in parse_weights(specs, names, flag).items():
            served.setdefault(name, {})[key] = value
    if tiny_root is not None and served:
        raise ValueError("--tiny builds random local models; drop --server / --served-model")
    for out in outs:
        if out.suffix.lower() not in OUTPUT_SUFFIXES:
            raise ValueError(f"--out {out}: unknown format {out.suffix!r}; name the file *.jsonl or *.csv")
        check_output(out)
    check_device(device)
    weight_specs = parse_weights(weights, names)
    if tiny_root is not None and weight_specs:
        raise ValueError("--tiny builds random models; drop --weights (or drop --tiny to load real weights)")
    from rewardkit.report import write_scores

    images = collect_images(image_specs)
    prompts = read_prompts(images, prompt, prompts_file)
    check_rewards(names, prompts is not None, list(served))
    rewards = _load_rewards(names, weight_specs, device, dtype, tiny_root, served)
    paths = [path for path, _ in images]
    scores = score_images(rewards, paths, prompts, batch_size=batch_size, preprocess=preprocess, device=device)
    rows = [{"image": str(path), "prompt": None if prompts is None else prompts[i], **{n: scores[n][i] for n in names}}
            for i, path in enumerate(paths)]
    for out in outs:
        write_scores(rows, names, out)
    return rows


def _print_summary(rows: list[dict[str, Any]], names: Sequence[str], written: Sequence[Path]) -> None:
    from rewardkit.report import summarize

    width = max(len("reward"), *map(len, names))
    print(f"{'reward':<{width}}  {'mean':>10}  {'min':>10}  {'max':>10}  {'n':>6}")
    for name, stats in summarize(rows, names).items():
        print(f"{name:<{width}}  {stats['mean']:>10.4f}  {stats['min']:>10.4f}  {stats['max']:>10.4f}  {stats['n']:>6}")
    for path in written:
        print(f"wrote {path}")


def _cmd_score(args: argparse.Namespace) -> None:
    if args.engine == "ray":
        from rewardkit.cli_serve import run_score_ray

        return _print_summary(run_score_ray(args), list(dict.fromkeys(args.names)), [Path(args.out)])
    options = dict(prompt=args.prompt, prompts_file=args.prompts, weights=args.weights, device=args.device,
                   dtype=args.dtype, batch_size=args.batch_size, preprocess=args.preprocess, outs=[Path(args.out)],
                   servers=args.server, served_models=args.served_model)
    if args.tiny:
        with tempfile.TemporaryDirectory(prefix="rewardkit-tiny-") as tiny_root:
            rows = run_score(args.names, args.images, tiny_root=Path(tiny_root), **options)
    else:
        rows = run_score(args.names, args.images, **options)
    _print_summary(rows, list(dict.fromkeys(args.names)), options["outs"])


def make_demo_images(folder: Path, seed: int = 0) -> list[tuple[Path, str]]:
    """Draw 8 synthetic PNGs (a gradient and two shapes each; deterministic for a seed): ``[(path, prompt)]``."""
    from PIL import Image, ImageDraw

    rng, made = random.Random(seed), []
    folder.mkdir(parents=True, exist_ok=True)
    for index, (w, h) in enumerate(_DEMO_SIZES):
        top, bottom, *shape_colours = rng.sample(sorted(_DEMO_COLOURS), 4)
        mask = Image.linear_gradient("L").rotate(90 * (index % 2)).resize((w, h))  # vertical / horizontal
        image = Image.composite(*(Image.new("RGB", (w, h), _DEMO_COLOURS[c]) for c in (bottom, top)), mask)
        draw, parts = ImageDraw.Draw(image), []
        for side, colour in enumerate(shape_colours):  # one shape in the left half, one in the right half
            shape, fill = rng.choice(("circle", "square", "triangle")), _DEMO_COLOURS[colour]
            x, y = (0.25 + 0.5 * side + rng.uniform(-0.04, 0.04)) * w, rng.uniform(0.35, 0.65) * h
            r = rng.uniform(0.12, 0.22) * min(w, h)
            if shape == "circle":
                draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
            elif shape == "square":
                draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
            else:
                draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
            parts.append(f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}")
        path = folder / f"{index:02d}-{'-'.join(p.split()[-1] for p in parts)}.png"
        image.save(path)
        made.append((path, f"{' and '.join(parts)} on a {top} to {bottom} gradient"))
    return made


def _cmd_demo(args: argparse.Namespace) -> None:
    from rewardkit.report import write_report

    out, names = Path(args.out), list(dict.fromkeys(args.rewards))
    made = make_demo_images(out / "images")
    prompts_file = out / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"image": p.name, "prompt": t}) + "\n" for p, t in made), "utf-8")
    outs = [out / "scores.jsonl", out / "scores.csv"]
    rows = run_score(names, [str(out / "images")], prompts_file=str(prompts_file), tiny_root=out / "models",
                     batch_size=4, outs=outs)
    title = f"rewardkit demo: {len(rows)} synthetic images, tiny RANDOM models ({', '.join(names)})"
    reports = write_report(rows, [Path(row["image"]) for row in rows], names, out, title)
    print(f"wrote {len(made)} images to {out / 'images'}, prompts to {prompts_file}, models to {out / 'models'}")
    _print_summary(rows, names, [*outs, *reports])
    print("note: tiny random models give meaningless numbers; the demo exercises the real loading and scoring "
          "code offline. Score your own images with `rewardkit score NAME --images DIR --prompt TEXT --out FILE`.")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 bad usage or bad input)."""
    try:
        args = _build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    from rewardkit.cli_geneval import COMMANDS as GENEVAL_COMMANDS
    from rewardkit.cli_metrics import COMMANDS
    from rewardkit.cli_compare import COMMANDS as COMPARE_COMMANDS
    from rewardkit.cli_verify import COMMANDS as VERIFY_COMMANDS

    from rewardkit.cli_serve import COMMANDS as SERVE_COMMANDS

    command = {"list": _cmd_list, "score": _cmd_score, "demo": _cmd_demo, **COMMANDS, **GENEVAL_COMMANDS,
               **COMPARE_COMMANDS, **VERIFY_COMMANDS, **SERVE_COMMANDS}[args.command]
    try:
        command(args)
    except _USER_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"rewardkit: error: {one_line(str(message)) or type(exc).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
