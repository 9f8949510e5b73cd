"""Human Preference Score v2 / v2.1 (Wu et al., 2023, "Human Preference Score v2").

Upstream: ``tgxs002/HPSv2`` (866735e) ``hpsv2/img_score.py::score``: open_clip ``ViT-H-14`` (exact
GELU) with the HPS checkpoint (``xswu/HPSv2``: ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``,
``{"state_dict": open_clip keys}``), ``light_augmentation=True`` preprocessing (``ToTensor`` ->
longest side to 224 with tensor bicubic -> zero pad to 224x224 -> OpenAI mean/std) and the score
``diag(normalize(image) @ normalize(text).T)``: the **raw cosine**, about 0.2-0.35 on real images.
v2.0 and v2.1 scores are not comparable (upstream README).

Upstream preprocessing already works on tensors, so rewardkit's tensor path *is* the upstream
computation (the exact path only adds ``ToTensor`` on PIL input). One deliberate difference: where the short
side rounds to 0 px (e.g. 2000x3 -> 224x0), upstream's resize raises; rewardkit keeps 1 px, as Pillow's
``Image.thumbnail`` does (``preprocess.resized_shape``), on both paths. Upstream runs CUDA fp16 autocast;
rewardkit's exact mode is fp32 and ``dtype="bf16"/"fp16"`` is its fast mode.

DiffSynth-Studio's ``HPSv2Metric`` deviations not reproduced: QuickGELU, shortest-side crop instead
of the letterbox, and ``x exp(logit_scale)`` (about 100x upstream's values).
"""

from __future__ import annotations

from typing import Any

import torch

from rewardkit.rewards.clip_common import ClipEmbeddingReward, load_clip_checkpoint, resolve_device, spec_for

__all__ = ["HPSReward", "load_v2", "load_v21", "HPS_ARCHITECTURE", "WEIGHTS_V2", "WEIGHTS_V21"]

HPS_ARCHITECTURE = "ViT-H-14"  # open_clip config name; hpsv2/img_score.py create_model_and_transforms
WEIGHTS_V2 = "hf:xswu/HPSv2/HPS_v2_compressed.pt"  # hpsv2/utils.py hps_version_map
WEIGHTS_V21 = "hf:xswu/HPSv2/HPS_v2.1_compressed.pt"


class HPSReward(ClipEmbeddingReward):
    """HPS: ``cos(text_i, image_i)`` (raw cosine, as ``hpsv2.score`` returns it), float32 ``(B,)``."""

    name = "hpsv2"
    higher_is_better = True
    differentiable = True
    requires_prompt = True

    def head(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        cosine = (image_embeds * text_embeds).sum(-1)  # (B,)
        return cosine, {}


def _load(name: str, default_weights: str, weights: Any, device: Any, dtype: Any, config: Any) -> HPSReward:
    checkpoint = load_clip_checkpoint(
        weights or default_weights,
        name=name,
        default_config={"open_clip": HPS_ARCHITECTURE},
        config=config,
    )
    # Letterbox (ResizeMaxSize + zero pad), not open_clip's default shortest-side crop.
    reward = HPSReward(checkpoint.towers, spec_for(checkpoint, mode="longest-pad"), dtype=dtype)
    reward.name = name
    return reward.to(resolve_device(device))


def load_v2(weights: Any = None, device: Any = None, dtype: Any = None, *, config: Any = None) -> HPSReward:
    """Load HPS v2.0.

    Args:
        weights: upstream ``.pt`` (``{"state_dict": ...}``), DiffSynth ``HPSv2/model.safetensors``,
            or an open_clip folder; default ``hf:xswu/HPSv2/HPS_v2_compressed.pt``.
        device: where the model lives (default CPU).
        dtype: ``None`` (exact fp32) or ``"bf16"`` / ``"fp16"`` autocast.
        config: open_clip model name or config dict for checkpoints of another size (default ViT-H-14).
    """
    return _load("hpsv2", WEIGHTS_V2, weights, device, dtype, config)


def load_v21(weights: Any = None, device: Any = None, dtype: Any = None, *, config: Any = None) -> HPSReward:
    """Load HPS v2.1 (same architecture, different weights); arguments as ``load_v2``."""
    return _load("hpsv2.1", WEIGHTS_V21, weights, device, dtype, config)
