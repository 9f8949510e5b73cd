"""GPU check: fp32 / bf16 / fp16 agreement with CPU fp32, throughput and peak memory, in a few minutes.

For pickscore, hpsv2, imagereward, aesthetic, the FID-Inception (pool3 features) and LPIPS: the CPU fp32
output is the reference; each (device, dtype[, variant]) run reports max |Δ| against it, Spearman's rank
correlation, images/s (median of ``--repeats`` timed calls after a warm-up) and peak device memory.
Variants on CUDA: ``compile`` (``torch.compile`` of the whole reward, fp32 and bf16). Attention already
runs through PyTorch SDPA in the transformers / open_clip towers, so the plain rows are the SDPA rows.

Weights: the real defaults (network or cache needed), or ``--tiny`` seeded random models from
``rewardkit.testing`` (offline; numbers then only show that every path runs).
Writes ``benchmarks/results/gpu.md`` (``--out``). ``--device cpu --tiny`` is the smoke mode the tests run.

Usage: ``python benchmarks/gpu_check.py`` on a CUDA machine; ``python benchmarks/gpu_check.py --device cpu --tiny``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import describe  # noqa: E402

MODELS = ("pickscore", "hpsv2", "imagereward", "aesthetic", "fid-inception", "lpips")
DTYPES = ("fp32", "bf16", "fp16")
PROMPT = "a photograph of a red fox in the snow"


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [t.double().argsort().argsort().double() for t in (a.flatten(), b.flatten())]
    ra, rb = (r - r.mean() for r in ranks)
    denominator = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denominator) if denominator > 0 else float("nan")


def build(name: str, dtype: str, tiny_root: Path | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function ``images (B,3,H,W) in [0,1] -> float32 (B,)`` or ``(B, D)``, on CPU (moved later)."""
    import rewardkit as rk
    import rewardkit.testing as rkt

    mode = None if dtype == "fp32" else dtype
    if name == "fid-inception":
        from rewardkit.metrics.inception import load_inception

        weights = rkt.tiny_fid_inception(tiny_root)["weights"] if tiny_root else None
        extractor = load_inception(weights)
        return _Wrapped(extractor, lambda m, x: m(m.prep.tensor(x * 255)), mode)
    if name == "lpips":
        reward = rkt.load_tiny("lpips", tiny_root, dtype=mode) if tiny_root else rk.load("lpips", dtype=mode)
        return _Wrapped(reward, lambda m, x: m(x, reference=x.flip(-1)), None)
    reward = rkt.load_tiny(name, tiny_root, dtype=mode) if tiny_root else rk.load(name, dtype=mode)
    return _Wrapped(reward, lambda m, x: m(x, PROMPT), None)


class _Wrapped:
    """A model plus how to call it; ``autocast`` is set for modules that take no ``dtype=`` (FID-Inception)."""

    def __init__(self, module: torch.nn.Module, call: Callable[..., torch.Tensor], autocast: str | None) -> None:
        self.module, self.call, self.autocast = module, call, autocast
        self.compiled: Any = None

    def to(self, device: str) -> "_Wrapped":
        self.module = self.module.to(device)
        return self

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from rewardkit.precision import autocast_for, parse_dtype

        with torch.inference_mode(), autocast_for(images.device, parse_dtype(self.autocast)):
            target = self.compiled or self.module
            return self.call(target, images).float()


def measure(model: _Wrapped, images: torch.Tensor, reference: torch.Tensor, repeats: int) -> dict[str, float]:
    device = images.device
    out = model(images)  # warm-up (and compilation)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = model(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    out = out.cpu()
    return {"max_abs": float((out - reference).abs().max()), "spearman": _spearman(out, reference),
            "images_s": images.shape[0] / times[len(times) // 2], "peak_mib": peak}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from rewardkit.testing import random_images

    tiny_root = Path(tempfile.mkdtemp(prefix="rk-gpu-check-")) if args.tiny else None
    side = 64 if args.tiny else 512
    images = random_images(args.batch, side, side, seed=0)
    rows = []
    for name in args.models:
        reference = build(name, "fp32", tiny_root)(images).cpu()
        for dtype in args.dtypes:
            variants = ["plain", "compile"] if args.device.startswith("cuda") and dtype != "fp16" else ["plain"]
            for variant in variants:
                model = build(name, dtype, tiny_root).to(args.device)
                if variant == "compile":
                    model.compiled = torch.compile(model.module)
                row = {"model": name, "dtype": dtype, "variant": variant,
                       **measure(model, images.to(args.device), reference, args.repeats)}
                rows.append(row)
                print(row, flush=True)
    return rows


def render(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = ["# GPU check: agreement with CPU fp32, throughput, peak memory", "",
             *[f"- {line}" for line in describe()],
             f"- device {args.device}, batch {args.batch}, {'tiny random models (smoke)' if args.tiny else 'real weights'}",
             "", "| model | dtype | variant | max abs Δ vs CPU fp32 | Spearman | images / s | peak MiB |",
             "|---|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['dtype']} | {r['variant']} | {r['max_abs']:.3e} | {r['spearman']:.4f} | "
              f"{r['images_s']:.1f} | {r['peak_mib']:.0f} |" for r in rows]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny random models (offline smoke run)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu.md")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here; use --device cpu --tiny for the smoke run")
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    rows = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(rows, args))
    print(f"written to {args.out}")
    return args.out


if __name__ == "__main__":
    main()
