"""Measure the gap between rewardkit's tensor preprocessing path (antialiased torch bicubic) and the exact
PIL path (upstream torchvision-on-PIL / transformers CLIPImageProcessorPil) for shortest-side resize + crop.

Usage:
    .venv/bin/python benchmarks/measure_preprocessing_gap.py [--size 224] [--out docs/preprocessing_gap_table.md]

For each input size, image kind and crop rounding it feeds the same uint8 image to
``preprocess_pil([pil], spec)`` and to ``preprocess(to_tensor(pil)[None], spec)`` and reports max / mean
|delta| in normalised units (OpenAI CLIP mean/std) and in [0, 1] pixel units (the same spec with mean 0,
std 1). Two diagnostic columns use a naive single-pass ``F.interpolate`` (no intermediate clipping): its gap
to the uint8 PIL output, and its gap to PIL's *float* ("F" mode) bicubic resize, which has neither uint8
rounding nor clipping, to separate the kernel difference from Pillow's 8-bit storage.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rewardkit.preprocess import (  # noqa: E402
    PreprocessSpec, center_crop, preprocess, preprocess_pil, resize, resized_shape,
)

SIZES_HW = [(512, 768), (768, 512), (832, 1216), (1216, 832), (1024, 1024), (640, 1152)]


def noise_image(height: int, width: int, rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def smooth_image(height: int, width: int, rng: np.random.Generator) -> Image.Image:
    """Gradients + a sine + bicubic-upsampled low-frequency noise (a crude natural-image stand-in)."""
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx + 3 * yy)], axis=-1)
    low = (rng.random((height // 32 + 2, width // 32 + 2, 3)) * 255).astype(np.uint8)
    low = np.asarray(Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC)) / 255.0
    return Image.fromarray(np.clip((0.6 * base + 0.4 * low) * 255, 0, 255).round().astype(np.uint8))


def pil_float_resize_crop(image: Image.Image, spec: PreprocessSpec) -> torch.Tensor:
    """PIL bicubic on float32 ("F" mode) channels, no uint8 rounding or clipping, then the spec's crop."""
    height, width = resized_shape(image.height, image.width, spec)
    array = np.asarray(image).astype(np.float32) / 255.0
    channels = [
        np.asarray(Image.fromarray(array[..., c], mode="F").resize((width, height), Image.Resampling.BICUBIC))
        for c in range(3)
    ]
    return center_crop(torch.from_numpy(np.stack(channels)), spec.size, rounding=spec.crop_rounding)


def single_pass(tensor: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """One antialiased F.interpolate call, no clipping (the naive tensor path), then the spec's crop: [0, 1]."""
    resized = resize(tensor, resized_shape(tensor.shape[-2], tensor.shape[-1], spec), interpolation=spec.interpolation)
    return center_crop(resized, spec.size, rounding=spec.crop_rounding)


def measure(image: Image.Image, spec: PreprocessSpec) -> dict[str, float]:
    unit = dataclasses.replace(spec, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    tensor = TF.to_tensor(image)[None]
    exact_px = preprocess_pil([image], unit)
    normalised = (preprocess(tensor, spec) - preprocess_pil([image], spec)).abs()
    pixels = (preprocess(tensor, unit) - exact_px).abs()
    naive = single_pass(tensor, unit)
    return {
        "max_norm": normalised.max().item(), "mean_norm": normalised.mean().item(),
        "max_px": pixels.max().item(), "mean_px": pixels.mean().item(),
        "max_naive_px": (naive - exact_px).abs().max().item(),
        "max_kernel_px": (naive[0] - pil_float_resize_crop(image, unit)).abs().max().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args()
    specs = {
        "floor (hf)": PreprocessSpec(size=args.size, crop_rounding="floor", pil_backend="hf"),
        "round (torchvision)": PreprocessSpec(size=args.size, crop_rounding="round", pil_backend="torchvision"),
    }
    header = (
        "| input H×W | resized | image | crop (exact backend) | max Δ norm | mean Δ norm | max Δ [0,1] "
        "| mean Δ [0,1] | single-pass max Δ [0,1] | single-pass vs float PIL max Δ [0,1] |"
    )
    lines = [header, "|" + "---|" * 10]
    worst: dict[str, float] = {}
    for kind, make in (("smooth", smooth_image), ("noise", noise_image)):
        for height, width in SIZES_HW:
            image = make(height, width, np.random.default_rng(args.seed))
            for crop_name, spec in specs.items():
                r = measure(image, spec)
                resized = "×".join(map(str, resized_shape(height, width, spec)))
                lines.append(
                    f"| {height}×{width} | {resized} | {kind} | {crop_name} "
                    f"| {r['max_norm']:.4f} | {r['mean_norm']:.4f} "
                    f"| {r['max_px']:.4f} | {r['mean_px']:.5f} | {r['max_naive_px']:.4f} | {r['max_kernel_px']:.5f} |"
                )
                for key, value in r.items():
                    worst[f"{kind}/{key}"] = max(worst.get(f"{kind}/{key}", 0.0), value)
    table = "\n".join(lines)
    print(table)
    print()
    for key, value in sorted(worst.items()):
        print(f"worst {key}: {value:.5f}")
    if args.out is not None:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
