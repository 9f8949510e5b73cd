"""The BLIP towers of ImageReward: a ViT image encoder and a BERT text encoder with cross-attention.

Upstream: ``THUDM/ImageReward`` (c1392c6) ``ImageReward/models/BLIP/vit.py`` (timm-style ViT, pre-norm
blocks, exact GELU, LayerNorm eps 1e-6, all tokens after the final ``norm``), ``BLIP/med.py`` (BERT of
transformers 4.15 with a cross-attention block in every layer, ``med_config.json``: GELU, LayerNorm
eps 1e-12, no token-type embeddings) and ``BLIP/blip_pretrain.py`` (``encoder_width`` = the ViT width).
Parameter names equal upstream's, so ``ImageReward.pt`` loads once ``blip.`` is stripped.

Attention runs through ``F.scaled_dot_product_attention``. Upstream computes ``softmax(QK^T / sqrt(d)) V``
explicitly and masks padding by adding -10000 to the scores; in float32 those weights underflow to exactly
0, so a boolean mask gives the same result (the parity test bounds the difference by float32 rounding).
Dropout and drop-path are inactive in eval mode and are left out.

Architectures only: no paths, no downloads (``rewardkit.rewards.imagereward`` loads checkpoints).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rewardkit.nets.aesthetic_mlp import AestheticMLP

__all__ = ["ImageRewardConfig", "ImageRewardNet", "VisionTransformer", "BertTextEncoder", "VIT_LAYER_NORM_EPS",
           "BERT_LAYER_NORM_EPS"]

VIT_LAYER_NORM_EPS = 1e-6  # BLIP vit.py: norm_layer = partial(nn.LayerNorm, eps=1e-6)
BERT_LAYER_NORM_EPS = 1e-12  # BLIP med_config.json: layer_norm_eps


@dataclass(frozen=True)
class ImageRewardConfig:
    """Sizes of the two towers; the defaults are ImageReward v1.0's.

    Attributes:
        image_size, patch_size: ViT input side and patch side (``create_vit('large', 224)``: 224, 16).
        vision_width, vision_layers, vision_heads, vision_mlp_ratio: ViT-L: 1024, 24, 16, 4.
        text_width, text_layers, text_heads, text_intermediate: ``med_config.json``: 768, 12, 12, 3072.
        vocab_size: bert-base-uncased's 30522 plus ``[DEC]`` and ``[ENC]``.
        max_positions: ``med_config.json`` ``max_position_embeddings``.
        pad_token_id: BERT's ``[PAD]`` id.
    """

    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_mlp_ratio: float = 4.0
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    vocab_size: int = 30524
    max_positions: int = 512
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        checks = [("vision_width", "vision_heads"), ("text_width", "text_heads"), ("image_size", "patch_size")]
        for whole, part in checks:
            if getattr(self, whole) % getattr(self, part):
                raise ValueError(f"ImageRewardConfig: {whole}={getattr(self, whole)} is not a multiple of "
                                 f"{part}={getattr(self, part)}; fix the architecture given as config=")

    @classmethod
    def coerce(cls, config: ImageRewardConfig | dict[str, Any] | None) -> ImageRewardConfig:
        """``None`` -> the defaults; a dict -> ``ImageRewardConfig(**dict)`` (unknown keys: ``TypeError``)."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(config) - known)
            if unknown:
                raise TypeError(f"ImageRewardConfig: unknown fields {unknown}; known fields are {sorted(known)}")
            return cls(**config)
        raise TypeError(f"ImageRewardConfig: expected an ImageRewardConfig or a dict of its fields, "
                        f"got {type(config).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention on ``(B, L, D)`` projections; ``mask`` is boolean ``(B, 1, 1, S)`` (True = keep)."""
    batch, length, width = q.shape

    def split(t: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, heads, L, D / heads)
        return t.view(batch, t.shape[1], heads, width // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(batch, length, width)


# ------------------------------------------------------------------------------------------------ ViT
class _VitAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)  # qkv_bias=True
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # upstream reshape(B, N, 3, heads, d): same split
        return self.proj(_attend(q, k, v, self.heads))


class _VitMlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _VitBlock(nn.Module):
    def __init__(self, config: ImageRewardConfig) -> None:
        super().__init__()
        width = config.vision_width
        self.norm1 = nn.LayerNorm(width, eps=VIT_LAYER_NORM_EPS)
        self.attn = _VitAttention(width, config.vision_heads)
        self.norm2 = nn.LayerNorm(width, eps=VIT_LAYER_NORM_EPS)
        self.mlp = _VitMlp(width, int(width * config.vision_mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, config: ImageRewardConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, config.vision_width, kernel_size=config.patch_size, stride=config.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)  # (B, N, D)


class VisionTransformer(nn.Module):
    """BLIP ``VisionTransformer``: normalised pixels ``(B, 3, S, S)`` -> all tokens ``(B, 1 + N, D)``."""

    def __init__(self, config: ImageRewardConfig) -> None:
        super().__init__()
        self.image_size = config.image_size
        num_patches = (config.image_size // config.patch_size) ** 2
        self.patch_embed = _PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.vision_width))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, config.vision_width))
        self.blocks = nn.ModuleList(_VitBlock(config) for _ in range(config.vision_layers))
        self.norm = nn.LayerNorm(config.vision_width, eps=VIT_LAYER_NORM_EPS)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if tuple(pixels.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"BLIP ViT: expected preprocessed pixels (B, 3, {self.image_size}, {self.image_size}), "
                             f"got {tuple(pixels.shape)}; preprocess the images first")
        x = self.patch_embed(pixels.to(self.patch_embed.proj.weight.dtype))  # autocast still applies
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# ----------------------------------------------------------------------------------------------- BERT
class _Attention(nn.Module):
    """med.py ``BertSelfAttention`` (``self``) + ``BertSelfOutput`` (``output``): Q from the text, K/V from
    the text (self-attention) or from the image tokens (cross-attention, input width ``kv_width``)."""

    def __init__(self, config: ImageRewardConfig, kv_width: int) -> None:
        super().__init__()
        width = config.text_width
        self.heads = config.text_heads
        self.self = nn.Module()
        self.self.query = nn.Linear(width, width)
        self.self.key = nn.Linear(kv_width, width)
        self.self.value = nn.Linear(kv_width, width)
        self.output = nn.Module()
        self.output.dense = nn.Linear(width, width)
        self.output.LayerNorm = nn.LayerNorm(width, eps=BERT_LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        s = self.self
        attended = _attend(s.query(x), s.key(context), s.value(context), self.heads, mask)
        return self.output.LayerNorm(self.output.dense(attended) + x)


class _BertLayer(nn.Module):
    def __init__(self, config: ImageRewardConfig) -> None:
        super().__init__()
        width = config.text_width
        self.attention = _Attention(config, width)
        self.crossattention = _Attention(config, config.vision_width)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(width, config.text_intermediate)
        self.output = nn.Module()
        self.output.dense = nn.Linear(config.text_intermediate, width)
        self.output.LayerNorm = nn.LayerNorm(width, eps=BERT_LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, x, mask)
        x = self.crossattention(x, image_embeds)  # image attention mask: all ones
        hidden = F.gelu(self.intermediate.dense(x))
        return self.output.LayerNorm(self.output.dense(hidden) + x)


class _BertEmbeddings(nn.Module):
    def __init__(self, config: ImageRewardConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.text_width, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_positions, config.text_width)
        self.LayerNorm = nn.LayerNorm(config.text_width, eps=BERT_LAYER_NORM_EPS)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions)[None])


class BertTextEncoder(nn.Module):
    """med.py ``BertModel(add_pooling_layer=False)`` in multimodal mode, bidirectional (``is_decoder=False``).

    ``forward(input_ids (B, L), attention_mask (B, L) of 0/1, image_embeds (B, N, Dv))`` -> the last hidden
    states ``(B, L, D)``. Every text token attends to every image token.
    """

    def __init__(self, config: ImageRewardConfig) -> None:
        super().__init__()
        self.max_positions = config.max_positions
        self.embeddings = _BertEmbeddings(config)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(_BertLayer(config) for _ in range(config.text_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_embeds: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > self.max_positions:
            raise ValueError(f"BLIP text encoder: {input_ids.shape[1]} tokens exceed max_positions="
                             f"{self.max_positions}; tokenize with a smaller max_length")
        x = self.embeddings(input_ids)
        keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L): padding keys are never attended
        for layer in self.encoder.layer:
            x = layer(x, keep, image_embeds)
        return x


class ImageRewardNet(nn.Module):
    """ImageReward's three parts under upstream's names (``ImageReward.pt`` keys minus ``blip.``).

    ``visual_encoder`` (BLIP ViT), ``text_encoder`` (BERT with cross-attention) and ``mlp``: ImageReward.py's
    ``MLP``, which is improved-aesthetic-predictor's head (same widths and dropouts, no activations), on the
    ``[CLS]`` state of width ``text_width``. BLIP's ``vision_proj`` / ``text_proj`` are unused by the reward.
    """

    def __init__(self, config: ImageRewardConfig | dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config = ImageRewardConfig.coerce(config)
        self.visual_encoder = VisionTransformer(self.config)
        self.text_encoder = BertTextEncoder(self.config)
        self.mlp = AestheticMLP(input_size=self.config.text_width)

    def cls_features(self, pixels: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``(B, 3, S, S)`` + tokens ``(B, L)`` -> the ``[CLS]`` hidden state ``(B, D)``."""
        image_embeds = self.visual_encoder(pixels)
        return self.text_encoder(input_ids, attention_mask, image_embeds)[:, 0]
