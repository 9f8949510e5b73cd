"""Tiny, seeded, randomly initialised checkpoints in the real formats, built offline.

Each ``tiny_<name>(root, layout=...)`` writes a checkpoint under ``root`` exactly as the upstream
project (``layout="upstream"``) or DiffSynth-Studio's ``ImageMetrics`` (``layout="diffsynth"``)
ships it, and returns the keyword arguments for ``rk.load(name, **kwargs)``. The real loading code
then reads it. One module per family; this package re-exports them all.

Example:
    >>> import rewardkit as rk, rewardkit.testing as rkt
    >>> reward = rk.load("pickscore", **rkt.tiny_pickscore("/tmp/rk-tiny"))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rewardkit.testing.clip import (
    TINY_IMAGE_SIZE,
    tiny_aesthetic,
    tiny_bioclip,
    tiny_clip_score,
    tiny_hf_clip_config,
    tiny_hpsv2,
    tiny_open_clip_config,
    tiny_pickscore,
    write_clip_tokenizer,
    write_hf_clip_folder,
)
from rewardkit.testing.diffsynth_tree import DIFFSYNTH_TREE_METRICS, build_diffsynth_tree
from rewardkit.testing.dino import tiny_cmmd, tiny_fd_dinov2
from rewardkit.testing.fid import tiny_fid_inception
from rewardkit.testing.hpsv3 import tiny_hpsv3
from rewardkit.testing.imagereward import tiny_imagereward
from rewardkit.testing.lpips import tiny_lpips
from rewardkit.testing.geneval import tiny_geneval
from rewardkit.testing.ocr import tiny_ocr
from rewardkit.testing.metrics import PixelFeatures
from rewardkit.testing.qwen_image_bench import tiny_qwen_image_bench
from rewardkit.testing.unified_reward import tiny_unified_reward_2, tiny_unified_reward_edit
from rewardkit.testing.vlm import (
    forced_answer_processor,
    tiny_qwen_processor,
    tiny_qwen_tokenizer,
    tiny_qwen_vl,
    tiny_qwen_vl_config,
    write_tiny_qwen_processor,
)

__all__ = [
    "TINY_IMAGE_SIZE", "write_clip_tokenizer", "tiny_hf_clip_config", "tiny_open_clip_config",
    "write_hf_clip_folder", "tiny_clip_score", "tiny_pickscore", "tiny_hpsv2", "tiny_aesthetic",
    "tiny_bioclip", "tiny_fid_inception", "tiny_lpips", "tiny_cmmd", "tiny_fd_dinov2", "tiny_imagereward", "PixelFeatures",
    "load_tiny", "random_images",
    "tiny_qwen_image_bench",
    "tiny_qwen_vl", "tiny_qwen_tokenizer", "tiny_qwen_processor", "write_tiny_qwen_processor",
    "tiny_qwen_vl_config", "forced_answer_processor",
    "tiny_unified_reward_2", "tiny_unified_reward_edit",
    "tiny_hpsv3",
    "tiny_ocr",
    "tiny_geneval",
    "build_diffsynth_tree", "DIFFSYNTH_TREE_METRICS",
]


def load_tiny(name: str, root: str | Path, layout: str = "upstream", **options: Any) -> Any:
    """``rk.load(name, **tiny_<name>(root, layout), **options)``: a tiny random reward or metric, offline.

    Entries without a model (SSIM, PSNR) have no builder and load with ``rk.load(name)`` directly.
    """
    from rewardkit.registry import get_entry, load

    entry = get_entry(name)
    if entry.tiny is None:
        return load(name, **options)
    builder = globals().get(entry.tiny)
    if builder is None:
        raise KeyError(f"no tiny builder {entry.tiny!r} for {name!r} in rewardkit.testing")
    return load(name, **builder(Path(root) / name, layout=layout), **options)


def random_images(batch: int, height: int = 48, width: int = 40, seed: int = 0) -> torch.Tensor:
    """Smooth random images ``(B, 3, H, W)`` in ``[0, 1]`` (low-frequency noise, not white noise)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, max(2, height // 8), max(2, width // 8), generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
