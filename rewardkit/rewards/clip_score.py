"""CLIPScore (Hessel et al., 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning").

``score = w * max(cos(text, image), 0)`` with ``w = 2.5`` (the paper's eq. 1, ``jmhessel/clipscore``).
``scale=100`` gives torchmetrics' ``CLIPScore`` values (``100 * max(cos, 0)``, computed per image;
torchmetrics' ``compute()`` then averages). Default backbone: OpenAI ViT-L/14
(``openai/clip-vit-large-patch14``, torchmetrics' default); any HF CLIP folder or open_clip checkpoint
can be selected with ``weights=``.

Preprocessing follows the checkpoint's library: HF folders the PIL ``CLIPImageProcessor``
(floor crop), open_clip checkpoints open_clip's eval transform (round crop). Note that torchmetrics on
transformers 5.x preprocesses with the torchvision-backed processor (about one gray level away from
PIL, reference/clip_family.md E5).

DiffSynth-Studio's ``CLIPMetric`` computes ``exp(logit_scale) * cos`` with no clamp on laion ViT-H/14
(QuickGELU): neither this metric nor torchmetrics'.
"""

from __future__ import annotations

from typing import Any

import torch

from rewardkit.nets.clip import OPENAI_VIT_L_14
from rewardkit.rewards.clip_common import ClipEmbeddingReward, load_clip_checkpoint, resolve_device, spec_for

__all__ = ["ClipScoreReward", "load", "CLIPSCORE_W", "TORCHMETRICS_SCALE", "DEFAULT_WEIGHTS"]

CLIPSCORE_W = 2.5  # Hessel et al. 2021, eq. 1
TORCHMETRICS_SCALE = 100.0  # torchmetrics.functional.multimodal.clip_score
DEFAULT_WEIGHTS = "hf:openai/clip-vit-large-patch14"


class ClipScoreReward(ClipEmbeddingReward):
    """``scale * max(cos(text_i, image_i), 0)``, float32 ``(B,)`` in ``[0, scale]``."""

    name = "clip-score"
    higher_is_better = True
    differentiable = True
    requires_prompt = True

    def __init__(self, *args: Any, scale: float = CLIPSCORE_W, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not scale > 0:
            raise ValueError(f"clip-score: scale must be > 0, got {scale}")
        self.scale = float(scale)

    def head(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        cosine = (image_embeds * text_embeds).sum(-1)  # (B,)
        # clamp_min keeps a zero gradient below 0, as max(cos, 0) does.
        return self.scale * cosine.clamp_min(0.0), {"cosine": cosine.detach()}


def load(
    weights: Any = None,
    device: Any = None,
    dtype: Any = None,
    *,
    scale: float = CLIPSCORE_W,
    config: Any = None,
    processor: Any = None,
) -> ClipScoreReward:
    """Load CLIPScore.

    Args:
        weights: any CLIP checkpoint (HF folder, open_clip folder or file); default OpenAI ViT-L/14.
        device: where the model lives (default CPU).
        dtype: ``None`` (exact fp32) or ``"bf16"`` / ``"fp16"`` autocast.
        scale: ``w``; 2.5 (paper, default) or 100 (torchmetrics).
        config: architecture for single-file checkpoints (HF ``CLIPConfig`` kwargs or open_clip config).
        processor: tokenizer/preprocessor folder when not next to the weights.
    """
    checkpoint = load_clip_checkpoint(
        weights or DEFAULT_WEIGHTS,
        name="clip-score",
        default_config={"hf": OPENAI_VIT_L_14, "open_clip": "ViT-L-14"},
        config=config,
        processor=processor,
    )
    reward = ClipScoreReward(checkpoint.towers, spec_for(checkpoint), dtype=dtype, scale=scale)
    return reward.to(resolve_device(device))
