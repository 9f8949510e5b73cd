"""BioCLIP 2 (Gu et al., 2025, "BioCLIP 2: Emergent Properties from Scaling Hierarchical Contrastive Learning").

Upstream: ``imageomics/bioclip-2`` on the Hugging Face hub, an open_clip ``ViT-L-14`` (exact GELU)
in open_clip hub format, loaded with ``open_clip.create_model_and_transforms('hf-hub:imageomics/bioclip-2')``.
Score: ``exp(logit_scale) * cos(text, image)`` (the logit pybioclip feeds to its softmax; a per-image
similarity is DiffSynth-Studio's framing, kept for compatibility). Prompts are taxonomic strings such
as "a photo of Animalia Chordata Mammalia Carnivora Canidae Canis Canis lupus familiaris with common
name domestic dog.".

Preprocessing: open_clip's eval transform with the ``preprocess_cfg`` stored in the hub folder
(shortest side -> 224 bicubic, round crop, normalisation from the config; the real config's values
are unverified here, so they are read from the file, never assumed).

Unlike DiffSynth-Studio's ``BioCLIPMetric``, this works on transformers 5.x (no
``get_image_features`` call) and checks that prompt and image counts match.
"""

from __future__ import annotations

from typing import Any

import torch

from rewardkit.rewards.clip_common import ClipEmbeddingReward, load_clip_checkpoint, resolve_device, spec_for

__all__ = ["BioCLIPReward", "load", "DEFAULT_WEIGHTS", "BIOCLIP_ARCHITECTURE"]

DEFAULT_WEIGHTS = "hf:imageomics/bioclip-2"
BIOCLIP_ARCHITECTURE = "ViT-L-14"  # for single-file checkpoints (DiffSynth BioCLIPv2/open_clip_model.safetensors)


class BioCLIPReward(ClipEmbeddingReward):
    """``exp(logit_scale) * cos(text_i, image_i)``, float32 ``(B,)``."""

    name = "bioclip"
    higher_is_better = True
    differentiable = True
    requires_prompt = True

    def head(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        return self.logit_scaled_cosine(image_embeds, text_embeds)


def load(weights: Any = None, device: Any = None, dtype: Any = None, *, config: Any = None) -> BioCLIPReward:
    """Load BioCLIP 2.

    Args:
        weights: open_clip hub folder / ``hf:`` spec, or a single open_clip-keys file; default
            ``hf:imageomics/bioclip-2``.
        device: where the model lives (default CPU).
        dtype: ``None`` (exact fp32) or ``"bf16"`` / ``"fp16"`` autocast.
        config: open_clip model name or config dict for single-file checkpoints (default ViT-L-14).
    """
    checkpoint = load_clip_checkpoint(
        weights or DEFAULT_WEIGHTS,
        name="bioclip",
        default_config={"open_clip": BIOCLIP_ARCHITECTURE},
        config=config,
    )
    reward = BioCLIPReward(checkpoint.towers, spec_for(checkpoint), dtype=dtype)
    return reward.to(resolve_device(device))
