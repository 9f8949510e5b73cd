"""Overheads of the training-side wrappers, each timed side by side with its plain equivalent, on CPU.

1. **Composition** (``rk.compose``): a composed reward against calling its parts one by one on the same
   batch (target <= 1.05x; < 1x when parts share an image tower, whose features compose computes once).
   Cases: pickscore + hpsv2 (two towers, nothing to share); clip-score at two scales on one tower
   (shared); clip-score + aesthetic loaded from one tower folder (one tower in memory, but their
   preprocessing specs differ, HF floor crop vs OpenAI round crop, so features are not shared).
2. **Gradient checkpointing** (``reward_loss(..., checkpoint=True)``): bytes of activations saved for
   the backward pass (``saved_activations``) and forward + backward time, plain vs checkpointed.
3. **Async scoring** (``AsyncRewardScorer``) on the tiny diffusers SD pipeline
   (``rewardkit.testing.pipelines``): sample N batches then score them one by one, vs submit each
   batch to the scorer as soon as it is sampled and sample the next meanwhile.

Models: seeded random CLIP checkpoints in the rewards' real formats (``bench_clip_rewards.write_checkpoint``)
of a "medium" size (image 224/32, vision width 384 x 6 layers, text 256 x 4 layers, embed 256); ``--size
tiny`` for a smoke run. Timings: median of ``--repeats`` after one warm-up, modes interleaved within
every repeat, under ``torch.inference_mode()`` except the backprop section; prompt caches warm in
every mode alike.

Usage:
    .venv/bin/python benchmarks/bench_compose.py                 # writes benchmarks/results/compose.md
    .venv/bin/python benchmarks/bench_compose.py --size tiny --repeats 2 --out /tmp/compose.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import rewardkit as rk  # noqa: E402
from bench_clip_rewards import PROMPTS, Arch, machine_description, write_checkpoint  # noqa: E402
from rewardkit.integrations.async_scoring import AsyncRewardScorer  # noqa: E402
from rewardkit.training.backprop import reward_loss, saved_activations  # noqa: E402

SIZES = {
    "medium": Arch(224, 32, 384, 6, 6, 256, 4, 4, 256),  # ~1/10 of ViT-B/16's image-tower compute
    "tiny": Arch(64, 16, 64, 2, 4, 64, 2, 4, 32),
}
COMPOSE_BATCH, COMPOSE_SIDE = 16, 256  # 8 prompts x 2 images
BACKPROP_BATCH, BACKPROP_SIDE = 8, 256
ASYNC_BATCHES, ASYNC_BATCH, ASYNC_STEPS = 8, 4, 2  # tiny SD: 32x32 output, CFG on
CLIPSCORE_TORCHMETRICS_SCALE = 100.0  # the second clip-score scale (torchmetrics' convention)


def median_s(times: list[float]) -> float:
    return statistics.median(times)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(modes: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """One warm-up call per mode, then ``repeats`` rounds calling every mode once per round."""
    for fn in modes.values():
        fn()
    times: dict[str, list[float]] = {label: [] for label in modes}
    for _ in range(repeats):
        for label, fn in modes.items():
            times[label].append(timed(fn))
    return times


def load_rewards(root: Path, arch: Arch) -> dict[str, Any]:
    pick = rk.load("pickscore", **write_checkpoint("pickscore", root / "pick", arch, 0)["rk"])
    hps = rk.load("hpsv2", **write_checkpoint("hpsv2", root / "hps", arch, 1)["rk"])
    aesthetic_files = write_checkpoint("aesthetic", root / "aes", arch, 2)["rk"]
    clip = rk.load("clip-score", weights=aesthetic_files["clip_weights"])  # loaded first: full towers cached
    clip100 = rk.load("clip-score", weights=aesthetic_files["clip_weights"], scale=CLIPSCORE_TORCHMETRICS_SCALE)
    clip100.name = "clip-score-100"
    aesthetic = rk.load("aesthetic", **aesthetic_files)
    assert clip.towers is clip100.towers is aesthetic.towers, "the tower cache should share one tower"
    return {"pickscore": pick, "hpsv2": hps, "clip-score": clip, "clip-score-100": clip100, "aesthetic": aesthetic}


def bench_compose(rewards: dict[str, Any], repeats: int) -> list[dict[str, Any]]:
    images = torch.rand(COMPOSE_BATCH, 3, COMPOSE_SIDE, COMPOSE_SIDE, generator=torch.Generator().manual_seed(0))
    prompts = [PROMPTS[i // 2] for i in range(COMPOSE_BATCH)]
    cases = {
        "pickscore + hpsv2 (two towers)": ["pickscore", "hpsv2"],
        "clip-score x2 scales (one tower, shared features)": ["clip-score", "clip-score-100"],
        "clip-score + aesthetic (one tower, specs differ: not shared)": ["clip-score", "aesthetic"],
    }
    rows = []
    for label, names in cases.items():
        parts = [rewards[n] for n in names]
        composed = rk.compose({part: 1.0 for part in parts})
        shares = len({part.feature_key(images) for part in parts}) < len(parts)

        def one_by_one() -> list[torch.Tensor]:
            return [part(images, prompts) for part in parts]

        with torch.inference_mode():
            expected = sum(one_by_one())
            delta = (composed(images, prompts) - expected).abs().max().item()
            times = interleaved({"composed": lambda: composed(images, prompts), "parts": one_by_one}, repeats)
        rows.append({"case": label, "shared": shares, "composed": median_s(times["composed"]),
                     "parts": median_s(times["parts"]), "max_delta": delta})
        print(f"[compose] {label}: ratio {rows[-1]['composed'] / rows[-1]['parts']:.3f}", flush=True)
    return rows


def bench_checkpoint(reward: Any, repeats: int) -> dict[str, Any]:
    images = torch.rand(BACKPROP_BATCH, 3, BACKPROP_SIDE, BACKPROP_SIDE, generator=torch.Generator().manual_seed(1))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(BACKPROP_BATCH)]
    stats, grads = {}, {}
    for mode in (False, True):
        x = images.clone().requires_grad_(True)
        with saved_activations(exclude=reward) as stats[mode]:
            loss = reward_loss(reward, x, prompts, checkpoint=mode)
        (grads[mode],) = torch.autograd.grad(loss, x)

    def step(mode: bool) -> Callable[[], Any]:
        x = images.clone().requires_grad_(True)
        return lambda: torch.autograd.grad(reward_loss(reward, x, prompts, checkpoint=mode), x)

    times = interleaved({"plain": step(False), "checkpoint": step(True)}, repeats)
    return {"plain_bytes": stats[False].bytes, "ckpt_bytes": stats[True].bytes, "plain_count": stats[False].count,
            "ckpt_count": stats[True].count, "identical_grads": bool(torch.equal(grads[False], grads[True])),
            "plain_s": median_s(times["plain"]), "ckpt_s": median_s(times["checkpoint"])}


def bench_async(reward: Any, repeats: int) -> dict[str, Any]:
    from rewardkit.testing.pipelines import generate_images, tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=0)
    jobs = [([PROMPTS[(b + i) % len(PROMPTS)] for i in range(ASYNC_BATCH)],
             [b * ASYNC_BATCH + i for i in range(ASYNC_BATCH)]) for b in range(ASYNC_BATCHES)]

    def sample(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        return generate_images(pipe, prompts, seeds, num_inference_steps=ASYNC_STEPS)

    def sequential(threads: int) -> Callable[[], list[torch.Tensor]]:
        def run() -> list[torch.Tensor]:
            torch.set_num_threads(threads)
            try:
                batches = [sample(p, s) for p, s in jobs]
                with torch.inference_mode():
                    return [reward(x, p).clone() for x, (p, _) in zip(batches, jobs)]
            finally:
                torch.set_num_threads(1)
        return run

    scorer = AsyncRewardScorer(reward, num_threads=1)

    def overlapped() -> list[torch.Tensor]:
        futures = [scorer.submit(sample(p, s), p) for p, s in jobs]  # sample batch k+1 while k is scored
        return [future.result() for future in futures]

    def component(fn: Callable[[], Any]) -> float:
        return median_s([timed(fn) for _ in range(repeats)])

    with scorer:
        torch.set_num_threads(1)
        delta = max((a - b).abs().max().item() for a, b in zip(sequential(1)(), overlapped()))
        times = interleaved({"sequential, 1 thread": sequential(1), "sequential, 2 threads": sequential(2),
                             "async (sampler 1 thread + scorer 1 thread)": overlapped}, repeats)
        x = sample(*jobs[0])
        with torch.inference_mode():
            parts = {"sample one batch": component(lambda: sample(*jobs[0])),
                     "score one batch": component(lambda: reward(x, jobs[0][0]))}
    return {"times": {k: median_s(v) for k, v in times.items()}, "max_delta": delta, "parts": parts}


def render(args: argparse.Namespace, header: list[str], compose_rows, ckpt, overlap) -> str:
    arch = SIZES[args.size]
    lines = ["# Composition, gradient checkpointing and async scoring overheads (CPU)", "",
             f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`", "", *header,
             f"- model size `{args.size}`: {arch.describe()}; seeded random weights in each reward's real format",
             f"- median of {args.repeats} interleaved repeats after one warm-up; {args.threads} torch thread(s) "
             "unless stated", "", "## 1. Composed reward vs its parts called one by one", "",
             f"Batch: {COMPOSE_BATCH} images of {COMPOSE_SIDE}x{COMPOSE_SIDE}, 8 prompts x 2, "
             "torch.inference_mode(), warm prompt caches. ratio = composed / parts (target <= 1.05; < 1 when shared).",
             "", "| case | features shared | composed s | parts one by one s | ratio | max abs delta vs sum of parts |",
             "|---|---|---:|---:|---:|---:|"]
    for row in compose_rows:
        lines.append(f"| {row['case']} | {'yes' if row['shared'] else 'no'} | {row['composed']:.3f} | "
                     f"{row['parts']:.3f} | {row['composed'] / row['parts']:.3f} | {row['max_delta']:.1e} |")
    lines += ["", "## 2. Gradient checkpointing of the image tower (reward_loss, pickscore)", "",
              f"Batch: {BACKPROP_BATCH} images of {BACKPROP_SIDE}x{BACKPROP_SIDE}, forward + backward to the pixels. "
              "Saved = distinct storages autograd keeps for the backward (weights excluded), measured with "
              "`saved_activations`.", "",
              "| mode | saved tensors | saved MB | forward + backward s |", "|---|---:|---:|---:|",
              f"| plain | {ckpt['plain_count']} | {ckpt['plain_bytes'] / 1e6:.2f} | {ckpt['plain_s']:.3f} |",
              f"| checkpoint=True | {ckpt['ckpt_count']} | {ckpt['ckpt_bytes'] / 1e6:.2f} | {ckpt['ckpt_s']:.3f} |",
              "", f"Saved activations: {ckpt['ckpt_bytes'] / ckpt['plain_bytes']:.3f}x; time: "
              f"{ckpt['ckpt_s'] / ckpt['plain_s']:.3f}x; gradients bit-identical: {ckpt['identical_grads']}.", "",
              "## 3. Async scoring overlapping sampling (tiny SD pipeline + pickscore)", "",
              f"{ASYNC_BATCHES} batches of {ASYNC_BATCH} prompts, {ASYNC_STEPS} DDIM steps with CFG, 32x32 output; "
              "the reward scores each 32x32 batch (resized to the tower's input). Sequential = sample all "
              "batches, then score them one by one; async = `scorer.submit` right after each batch is sampled.",
              "", "| mode | s for all batches | x sequential (1 thread) |", "|---|---:|---:|"]
    base = overlap["times"]["sequential, 1 thread"]
    for label, seconds in overlap["times"].items():
        lines.append(f"| {label} | {seconds:.3f} | {seconds / base:.3f} |")
    sample_s, score_s = overlap["parts"]["sample one batch"], overlap["parts"]["score one batch"]
    lines += ["", f"One batch: sampling {sample_s:.3f} s, scoring {score_s:.3f} s; perfect overlap would give "
              f"{max(sample_s, score_s) / (sample_s + score_s):.3f}x. Async scores equal the sequential ones "
              f"(max abs delta {overlap['max_delta']:.1e}).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="medium", choices=sorted(SIZES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for sections 1-2 (1: least noisy)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "compose.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("REWARDKIT_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    header = machine_description(args.threads)
    header.append(f"- loadavg at start: {os.getloadavg()[0]:.2f}")
    print("\n".join(header), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        rewards = load_rewards(Path(tmp), SIZES[args.size])
        compose_rows = bench_compose(rewards, args.repeats)
        torch.set_num_threads(args.threads)
        ckpt = bench_checkpoint(rewards["pickscore"], args.repeats)
        print(f"[checkpoint] saved {ckpt['ckpt_bytes'] / ckpt['plain_bytes']:.3f}x, time "
              f"{ckpt['ckpt_s'] / ckpt['plain_s']:.3f}x", flush=True)
        overlap = bench_async(rewards["pickscore"], args.repeats)
    header.append(f"- loadavg at end: {os.getloadavg()[0]:.2f}")
    report = render(args, header, compose_rows, ckpt, overlap)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
