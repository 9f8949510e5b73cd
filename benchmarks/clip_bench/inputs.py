"""The benchmark batch: GRPO-shaped prompts and smooth random images (PIL and float tensor)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

GROUPS, GROUP_SIZE, IMAGE_SIDE = 8, 4, 512  # GRPO batch: 8 prompts x 4 images, 512 px
PROMPTS = (
    "a red fox sitting in a snowy forest at dawn, highly detailed",
    "an astronaut riding a horse on the moon, digital art",
    "a bowl of ramen with a soft-boiled egg, studio photograph",
    "a watercolor painting of a lighthouse on a cliff during a storm",
    "a futuristic city skyline at night with neon signs and flying cars",
    "a close-up portrait of an old fisherman, dramatic lighting",
    "a cozy reading nook with a cat sleeping on a pile of books",
    "a low-poly 3d render of a mountain landscape with a river",
)


def make_images(count: int, side: int, seed: int) -> list[Image.Image]:
    """Smooth random RGB images: coarse and medium bicubic-upsampled noise plus a random oriented wave."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64) / side
    images = []
    for _ in range(count):
        layers = []
        for cells in (6, 40):
            grid = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
            up = Image.fromarray(grid).resize((side, side), Image.Resampling.BICUBIC)
            layers.append(np.asarray(up, dtype=np.float64) / 255.0)
        angle, freq = rng.uniform(0, np.pi), rng.uniform(2.0, 12.0)
        phase = rng.uniform(0, 2 * np.pi, 3)
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle))[..., None] + phase)
        mixed = 0.55 * layers[0] + 0.2 * layers[1] + 0.25 * wave
        images.append(Image.fromarray(np.clip(np.round(mixed * 255.0), 0, 255).astype(np.uint8), mode="RGB"))
    return images


def to_float_tensor(images: list[Image.Image]) -> torch.Tensor:
    """The same pixels as float ``(B, 3, H, W)`` in [0, 1] (what a diffusers pipeline returns)."""
    array = np.stack([np.asarray(image) for image in images])  # (B, H, W, 3) uint8
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous().float().div_(255.0)
