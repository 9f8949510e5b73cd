"""Scoring shared by the CLIP-family rewards (clip-score, PickScore, HPS, aesthetic, BioCLIP).

:class:`ClipEmbeddingReward` is their base (preprocessing, towers, prompt-embedding cache, precision) and
:func:`spec_for` the preprocessing a checkpoint's own library applies. Loading (checkpoint formats, the
shared-tower cache, fast-mode copies) is ``rewardkit.rewards.clip_loading``; its public names are re-exported
here, so ``from rewardkit.rewards.clip_common import load_clip_checkpoint`` keeps working.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from rewardkit.nets.clip import ClipTowers, PromptEmbeddingCache
from rewardkit.precision import autocast_for, dtype_name, parse_dtype
from rewardkit.preprocess import PreprocessSpec, preprocess
from rewardkit.protocols import Reward, RewardOutput
from rewardkit.rewards.clip_loading import (
    HF_FOLDER_PATTERNS,
    ClipCheckpoint,
    content_key,
    fast_towers,
    load_clip_checkpoint,
    load_hf_towers_from_state,
)
from rewardkit.rewards.exact_path import ExactPathMixin

# The loading names are re-exported: reward modules, verify.py and tests import them from here.
__all__ = ["ClipCheckpoint", "load_clip_checkpoint", "ClipEmbeddingReward", "resolve_device", "spec_for",
           "load_hf_towers_from_state", "content_key", "fast_towers", "HF_FOLDER_PATTERNS"]


def resolve_device(device: Any) -> torch.device:
    """``None`` -> CPU; anything else -> ``torch.device(device)``."""
    return torch.device("cpu") if device is None else torch.device(device)


def spec_for(checkpoint: ClipCheckpoint, **overrides: Any) -> PreprocessSpec:
    """The upstream preprocessing of a checkpoint's own library, unless overridden.

    HF checkpoints are preprocessed the way ``CLIPImageProcessor`` does it (PIL backend, floor crop);
    open_clip checkpoints the way open_clip's eval transform does it (torchvision, round crop). The
    normalisation stored with the weights wins over the OpenAI default.
    """
    size = checkpoint.towers.image_size
    if checkpoint.resize_size not in (None, size):
        raise ValueError(
            f"{checkpoint.source}: preprocessing with resize {checkpoint.resize_size} != crop {size} is not "
            "supported (rewardkit's CLIP preprocessing resizes the shortest side to the crop size, as CLIP does)"
        )
    if checkpoint.interpolation != "bicubic" or checkpoint.resize_mode != "shortest":
        raise ValueError(
            f"{checkpoint.source}: preprocessing {checkpoint.resize_mode!r}/{checkpoint.interpolation!r} is not "
            "supported (rewardkit implements shortest-side bicubic resize + center crop and the HPS letterbox)"
        )
    fields: dict[str, Any] = {"size": size}
    if checkpoint.fmt == "hf":
        fields.update(crop_rounding="floor", pil_backend="hf")
    else:
        fields.update(crop_rounding="round", pil_backend="torchvision")
    if checkpoint.image_mean is not None:
        fields.update(mean=tuple(checkpoint.image_mean), std=tuple(checkpoint.image_std))
    fields.update(overrides)
    return PreprocessSpec(**fields)


class ClipEmbeddingReward(ExactPathMixin, Reward):
    """Base of the CLIP-family rewards: preprocessing, towers, prompt cache, precision.

    Subclasses implement ``head(image_embeds, text_embeds) -> (scores, details)`` on L2-normalised
    float32 embeddings ``(B, D)`` (``text_embeds`` is ``None`` for image-only rewards).
    """

    context_keys = frozenset()

    def __init__(self, towers: ClipTowers, spec: PreprocessSpec, dtype: Any = None) -> None:
        super().__init__()
        self.autocast_dtype = parse_dtype(dtype)
        self.towers = fast_towers(towers, self.autocast_dtype)  # fast mode: low-precision weights, held once
        self.spec = spec
        self.prompt_cache = PromptEmbeddingCache()
        self.freeze()

    def _apply(self, fn, recurse: bool = True):  # .to()/.cuda()/.half(): cached embeddings are stale
        self.prompt_cache.clear()
        return super()._apply(fn, recurse)

    @property
    def device(self) -> torch.device:
        return next(self.towers.parameters()).device

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``(B, 3, S, S)`` -> L2-normalised float32 image embeddings ``(B, D)``."""
        with autocast_for(pixels.device, self.autocast_dtype):
            embeds = self.towers.encode_image(pixels)
        return F.normalize(embeds.float(), dim=-1)

    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """``B`` prompts -> L2-normalised float32 text embeddings ``(B, D)``; distinct prompts encoded once."""

        def encode(texts: list[str]) -> torch.Tensor:
            with autocast_for(self.device, self.autocast_dtype):
                embeds = self.towers.encode_text(texts)
            return F.normalize(embeds.float(), dim=-1)

        return self.prompt_cache.lookup(prompts, dtype_name(self.autocast_dtype), encode)

    def head(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def logit_scaled_cosine(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """CLIP's logit: ``exp(logit_scale) * cos(text_i, image_i)`` (B,), with the cosine as a detail."""
        cosine = (image_embeds * text_embeds).sum(-1)  # (B,)
        return self.towers.logit_scale.float().exp() * cosine, {"cosine": cosine.detach()}

    def score_pixels(self, pixels: torch.Tensor, prompts: list[str] | None) -> RewardOutput:
        """Score already-preprocessed pixels (either path) on the model's device."""
        return self.score_features(self.image_embeds(pixels.to(self.device)), prompts)

    def score(self, images: torch.Tensor, prompts: list[str] | None, **context: Any) -> RewardOutput:
        """Tensor path: differentiable antialiased resize/crop/normalise, then the towers."""
        out = self.score_features(self.features(images), prompts)
        return RewardOutput(out.scores.to(images.device), out.details)

    # Shared-feature protocol, used by rk.compose to run one image tower for several parts.
    def feature_key(self, images: torch.Tensor) -> tuple:
        """Parts with equal keys compute the same ``features(images)`` (same tower, preprocessing, precision)."""
        return ("clip-image-embeds", id(self.towers), self.spec, self.autocast_dtype)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Validated images ``(B, 3, H, W)`` -> normalised float32 image embeddings ``(B, D)`` (tensor path)."""
        return self.image_embeds(preprocess(images.to(self.device), self.spec))

    def score_features(self, image_embeds: torch.Tensor, prompts: list[str] | None) -> RewardOutput:
        """Scores from ``features(...)`` output: float32 ``(B,)`` on the model's device."""
        text_embeds = self.text_embeds(prompts) if self.requires_prompt else None
        scores, details = self.head(image_embeds, text_embeds)
        return RewardOutput(scores.float(), details)
