"""PickScore (Kirstain et al., 2023, "Pick-a-Pic: An Open Dataset of User Preferences for Text-to-Image Generation").

Upstream: ``yuvalkirstain/PickScore`` README (``calc_probs``): the HF ``CLIPModel``
``yuvalkirstain/PickScore_v1`` (CLIP-H/14 fine-tuned on Pick-a-Pic, exact GELU) with the processor of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``; score = ``logit_scale.exp() * cos(text, image)``.

Preprocessing: the exact path reproduces the PIL ``CLIPImageProcessor`` (shortest side -> 224 bicubic,
floor center crop, OpenAI mean/std). transformers 5.x made the torchvision backend the default
processor, which differs from PIL by about one gray level (reference/clip_family.md E5): rewardkit
follows the PIL processor that PickScore was evaluated with. The tensor path uses an antialiased
bicubic resize (gap in docs/preprocessing_gap.md).

Deviations of DiffSynth-Studio's ``PickScoreMetric`` not reproduced: QuickGELU in both towers,
a prompt x image matrix for list prompts (rewardkit pairs prompt i with image i).
"""

from __future__ import annotations

from typing import Any

import torch

from rewardkit.nets.clip import LAION_VIT_H_14
from rewardkit.rewards.clip_common import ClipEmbeddingReward, load_clip_checkpoint, resolve_device, spec_for

__all__ = ["PickScoreReward", "load", "DEFAULT_WEIGHTS", "DEFAULT_PROCESSOR"]

DEFAULT_WEIGHTS = "hf:yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "hf:laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # yuvalkirstain/PickScore README


class PickScoreReward(ClipEmbeddingReward):
    """``exp(logit_scale) * cos(text_i, image_i)``, float32 ``(B,)``; typical real-weight values ~18-23."""

    name = "pickscore"
    higher_is_better = True
    differentiable = True
    requires_prompt = True

    def head(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        return self.logit_scaled_cosine(image_embeds, text_embeds)

    def probabilities(self, images: torch.Tensor, prompt: str) -> torch.Tensor:
        """Upstream ``calc_probs``: softmax of the scores over the images for one prompt, ``(B,)``."""
        return torch.softmax(self(images, prompt), dim=0)


def load(
    weights: Any = None, device: Any = None, dtype: Any = None, *, config: Any = None, processor: Any = None
) -> PickScoreReward:
    """Load PickScore.

    Args:
        weights: HF folder / ``hf:`` / ``ms:`` spec, or a single HF-keys file (DiffSynth
            ``PickScore/model.safetensors``); default ``hf:yuvalkirstain/PickScore_v1``.
        device: where the model lives (default CPU).
        dtype: ``None`` (exact fp32) or ``"bf16"`` / ``"fp16"`` autocast.
        config: ``CLIPConfig`` (or kwargs dict) for single-file checkpoints of another size.
        processor: folder/spec with tokenizer + ``preprocessor_config.json`` when not next to the weights.
    """
    checkpoint = load_clip_checkpoint(
        weights or DEFAULT_WEIGHTS,
        name="pickscore",
        default_config={"hf": LAION_VIT_H_14},
        config=config,
        processor=processor,
        fallback_processor=DEFAULT_PROCESSOR,
    )
    reward = PickScoreReward(checkpoint.towers, spec_for(checkpoint), dtype=dtype)
    return reward.to(resolve_device(device))
