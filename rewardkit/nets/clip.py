"""CLIP towers behind one interface, whatever library the checkpoint belongs to.

Two adapters, one job each:

* ``HFClipTowers`` wraps a ``transformers`` ``CLIPModel`` (or ``CLIPVisionModelWithProjection`` for
  image-only rewards) and its tokenizer: OpenAI CLIP, laion CLIP in HF format, PickScore_v1.
* ``OpenClipTowers`` wraps an ``open_clip`` ``CLIP`` model and its tokenizer: HPSv2, BioCLIP 2, any
  open_clip architecture.

Both expose ``encode_image(pixels) -> (B, D)`` and ``encode_text(list[str]) -> (B, D)`` returning the
*projected, unnormalised* embeddings exactly as the library computes them (no re-implementation of the
transformer), plus ``logit_scale`` (the stored log-scale, a scalar tensor) and ``image_size``.

Architectures only: no file paths, no downloads (see ``rewardkit.rewards.clip_common`` for loading).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

__all__ = [
    "ClipTowers", "HFClipTowers", "OpenClipTowers", "PromptEmbeddingCache", "build_open_clip_model",
    "LAION_VIT_H_14", "OPENAI_VIT_L_14",
]


class ClipTowers(nn.Module):
    """Common interface of the CLIP adapters (see module docstring)."""

    has_text: bool = True

    @property
    def image_size(self) -> int:
        raise NotImplementedError

    @property
    def logit_scale(self) -> torch.Tensor:
        raise NotImplementedError

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels``: normalised ``(B, 3, S, S)`` -> projected image embeddings ``(B, D)``."""
        raise NotImplementedError

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """``texts``: ``B`` strings -> projected text embeddings ``(B, D)`` on the model's device."""
        raise NotImplementedError

    def _device(self) -> torch.device:
        return next(self.parameters()).device


class HFClipTowers(ClipTowers):
    """A ``transformers`` CLIP model (full or vision-only) with its tokenizer.

    The pooled outputs are projected the way ``CLIPModel.get_image_features`` /
    ``get_text_features`` do; calling the sub-modules directly keeps the result a tensor on both
    transformers 4.x (tensor) and 5.x (``BaseModelOutputWithPooling``) APIs.
    """

    def __init__(self, model: nn.Module, tokenizer: Any | None, max_length: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.has_text = hasattr(model, "text_model")
        config = model.config
        vision_config = getattr(config, "vision_config", config)
        self._image_size = int(vision_config.image_size)
        if self.has_text:
            self.max_length = int(max_length or config.text_config.max_position_embeddings)

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output  # (B, width)
        return self.model.visual_projection(pooled)  # (B, D)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        if not self.has_text or self.tokenizer is None:
            raise RuntimeError("this CLIP model was loaded without a text tower/tokenizer")
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self._device())
        pooled = self.model.text_model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).pooler_output  # (B, width)
        return self.model.text_projection(pooled)  # (B, D)


class OpenClipTowers(ClipTowers):
    """An ``open_clip`` CLIP model with its tokenizer (``open_clip.tokenizer.SimpleTokenizer`` or HF)."""

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        size = model.visual.image_size
        self._image_size = int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels, normalize=False)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self._device())  # (B, context_length) int64
        return self.model.encode_text(tokens, normalize=False)


def build_open_clip_model(model_cfg: dict[str, Any]) -> nn.Module:
    """A randomly initialised open_clip model from an open_clip model config dict.

    ``model_cfg`` is what ``open_clip.get_model_config(name)`` returns or the ``model_cfg`` of a hub
    folder's ``open_clip_config.json`` (``embed_dim``, ``vision_cfg``, ``text_cfg``, optional
    ``quick_gelu``, ``custom_text``).
    """
    import open_clip

    cfg = dict(model_cfg)
    if "multimodal_cfg" in cfg:
        raise ValueError("CoCa-style open_clip models (multimodal_cfg) are not supported as CLIP rewards")
    custom_text = bool(cfg.pop("custom_text", False)) or "hf_model_name" in cfg.get("text_cfg", {})
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    return cls(**cfg)


class PromptEmbeddingCache:
    """LRU cache of normalised text embeddings keyed by (prompt, precision mode).

    GRPO batches repeat each prompt G times and RL loops re-score the same prompt set every epoch:
    the text tower runs once per distinct prompt. Text embeddings do not depend on the images and the
    towers are frozen, so caching never changes a gradient that reaches the pixels.

    Thread-safe: trainers score batches from worker threads, and an eviction by one thread between
    another's membership test and its read would raise ``KeyError``; each lookup holds one lock.
    """

    def __init__(self, max_size: int = 4096) -> None:
        self.max_size = max_size
        self._store: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        with self._lock:
            self._store.clear()

    def __getstate__(self) -> dict[str, Any]:
        # Cached tensors are derived data: do not pickle them (nor the lock).
        return {"max_size": self.max_size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["max_size"])

    def lookup(self, prompts: list[str], mode: str, encode: Any) -> torch.Tensor:
        """Embeddings ``(B, D)`` for ``prompts``, calling ``encode(list_of_new_prompts)`` once for misses."""
        with self._lock:
            return self._lookup(prompts, mode, encode)

    def _lookup(self, prompts: list[str], mode: str, encode: Any) -> torch.Tensor:
        missing = list(dict.fromkeys(p for p in prompts if (p, mode) not in self._store))
        if missing:
            # Computed outside inference mode so that tensors cached during RL sampling
            # (torch.inference_mode) can be reused later in a grad-enabled reward-backprop step.
            with torch.inference_mode(False), torch.no_grad():
                fresh = encode(missing)
            for prompt, row in zip(missing, fresh):
                self._store[(prompt, mode)] = row.clone()
        rows = []
        for prompt in prompts:
            self._store.move_to_end((prompt, mode))
            rows.append(self._store[(prompt, mode)])
        while len(self._store) > self.max_size:
            self._store.popitem(last=False)
        return torch.stack(rows)


# Architectures of single-file checkpoints that carry no config (``transformers.CLIPConfig`` kwargs).
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K config.json; PickScore_v1 is a fine-tune of it. Exact GELU:
# transformers PR #25787 and open_clip's ViT-H-14.json (DiffSynth's quick_gelu here is a deviation).
LAION_VIT_H_14: dict[str, Any] = {
    "projection_dim": 1024,
    "text_config": {
        "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
        "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    },
    "vision_config": {
        "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16, "num_hidden_layers": 32,
        "image_size": 224, "patch_size": 14, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
    },
}
# openai/clip-vit-large-patch14 config.json: OpenAI weights were trained with QuickGELU.
OPENAI_VIT_L_14: dict[str, Any] = {
    "projection_dim": 768,
    "text_config": {
        "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
        "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    },
    "vision_config": {
        "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
        "image_size": 224, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    },
}
