"""Score-level gap between the tensor path and the exact (PIL) path on non-square 512-1216 px inputs.

For each CLIP-family reward, a ViT-B/16-sized random checkpoint in the reward's real format (the same
writer as ``bench_clip_rewards.py``) scores smooth random images of several SDXL-like sizes twice:
through ``reward.score_pil`` (upstream PIL preprocessing) and through ``reward(tensor)`` (antialiased
torch bicubic on the same uint8 pixels / 255). Prints and writes a markdown table of max / mean |Δ|
in score units and as a fraction of the score spread over the set.

    python benchmarks/measure_tensor_path_gap.py [--size tiny] [--out benchmarks/results/tensor_path_gap.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_clip_rewards import ALL_REWARDS, PROMPTS, SIZES, write_checkpoint  # noqa: E402

import rewardkit as rk  # noqa: E402

# (height, width): SDXL/SD3 training buckets and their transposes; square 1024 as a control.
SHAPES = ((512, 768), (768, 512), (832, 1216), (1216, 832), (640, 1152), (1152, 640), (1024, 1024))
PER_SHAPE = 4


def smooth_image(height: int, width: int, seed: int) -> Image.Image:
    """Low-frequency colour noise plus fine texture: natural-image-like spectra, deterministic."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, height // 32, width // 32, generator=generator)
    base = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    texture = 0.08 * torch.randn(1, 3, height, width, generator=generator)
    array = ((base + texture).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array, "RGB")


def measure(name: str, arch, root: Path) -> dict[str, float]:
    reward = rk.load(name, **write_checkpoint(name, root / name, arch, seed=0)["rk"])
    prompts_needed = reward.requires_prompt
    exact, tensor = [], []
    with torch.inference_mode():
        for index, (height, width) in enumerate(SHAPES):
            images = [smooth_image(height, width, seed=100 * index + k) for k in range(PER_SHAPE)]
            prompts = list(PROMPTS[:PER_SHAPE]) if prompts_needed else None
            pixels = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]).float() / 255
            exact.append(reward.score_pil(images, prompts))
            tensor.append(reward(pixels, prompts))
    exact_all, tensor_all = torch.cat(exact), torch.cat(tensor)
    delta = (tensor_all - exact_all).abs()
    spread = (exact_all.max() - exact_all.min()).item()
    return {"max": delta.max().item(), "mean": delta.mean().item(), "spread": spread,
            "max_frac": delta.max().item() / spread, "n": len(exact_all)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rewards", nargs="+", default=list(ALL_REWARDS), choices=ALL_REWARDS)
    parser.add_argument("--size", default="vit-b-16", choices=sorted(SIZES))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tensor_path_gap.md")
    args = parser.parse_args()
    os.environ.setdefault("REWARDKIT_OFFLINE", "1")
    lines = [
        f"# Tensor path vs exact path, score units ({args.size} random checkpoints, {PER_SHAPE} images per shape)",
        "",
        "Shapes (H x W): " + ", ".join(f"{h}x{w}" for h, w in SHAPES),
        "",
        "| reward | n | max abs delta | mean abs delta | score spread | max delta / spread |",
        "|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.rewards:
            row = measure(name, SIZES[args.size], Path(tmp))
            lines.append(f"| {name} | {row['n']} | {row['max']:.2e} | {row['mean']:.2e} | {row['spread']:.3g} | "
                         f"{row['max_frac']:.2%} |")
            print(lines[-1], flush=True)
    report = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
