"""Fast mode (``dtype="bf16"``, weights held in bf16) vs exact fp32 for CLIP-family rewards, on this CPU.

Reuses the seeded ViT-B/16-size checkpoints of ``clip_bench.checkpoints`` (as ``bench_clip_rewards`` does), in
each reward's real format. Tensor path, prompt cache cleared before every call, median of ``--repeats``
interleaved calls after a warm-up, under ``torch.inference_mode``. Prints and writes one table (``--out``)
headed by ``machine.py``'s facts: the speed-up needs native bf16 (AVX512-BF16 / AMX on CPU); without it
oneDNN emulates bf16 and fast is slower.

Usage: ``python benchmarks/bench_fast_mode.py pickscore hpsv2 aesthetic --out benchmarks/results/fast_mode_<machine>.md``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rewardkit as rk  # noqa: E402
from clip_bench.checkpoints import SIZES, write_checkpoint  # noqa: E402
from clip_bench.inputs import PROMPTS, make_images, to_float_tensor  # noqa: E402
from machine import describe  # noqa: E402


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = (t.argsort().argsort().double() for t in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float(ra @ rb / (ra.norm() * rb.norm()))


def bench(name: str, root: Path, images: torch.Tensor, prompts: list[str], repeats: int) -> str:
    kwargs = write_checkpoint(name, root / name, SIZES["vit-b-16"], 0)["rk"]
    models = {"exact": rk.load(name, **kwargs), "fast": rk.load(name, **kwargs, dtype="bf16")}
    times: dict[str, list[float]] = {key: [] for key in models}
    out = {}
    with torch.inference_mode():
        for model in models.values():
            model(images, prompts)  # warm-up
        for _ in range(repeats):
            for key, model in models.items():
                model.prompt_cache.clear()
                start = time.perf_counter()
                out[key] = model(images, prompts)
                times[key].append(time.perf_counter() - start)
    exact, fast = statistics.median(times["exact"]), statistics.median(times["fast"])
    gap = (out["exact"] - out["fast"]).abs().max().item()
    return (f"| {name} | {exact:.3f} | {fast:.3f} | {exact / fast:.2f}x | {gap:.3e} | "
            f"{spearman(out['exact'], out['fast']):.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rewards", nargs="+", choices=("pickscore", "clip-score", "hpsv2", "aesthetic", "bioclip"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = to_float_tensor(make_images(args.batch, 256, seed=0))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    lines = [*[f"- {line}" for line in describe()],
             f"- ViT-B/16-size seeded random weights, batch {args.batch} of 256x256, tensor path, cold prompt cache, "
             f"median of {args.repeats} interleaved calls, {args.threads} threads", "",
             "| reward | exact s/batch | fast s/batch | speed-up | max abs Δ | Spearman |", "|---|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.rewards:
            lines.append(bench(name, Path(tmp), images, prompts, args.repeats))
            print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# Fast mode vs exact (CPU)\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
