"""Tiny checkpoints for the embedding-based distribution metrics CMMD and FD-DINOv2, in the real formats.

* ``tiny_cmmd``: a Hugging Face ``CLIPModel`` folder (``config.json`` + ``model.safetensors``, written by
  ``save_pretrained``) like ``openai/clip-vit-large-patch14-336``: QuickGELU, patch 14, image size 42.
* ``tiny_fd_dinov2``: ``layout="upstream"``: a ``Dinov2Model`` folder like ``facebook/dinov2-large``
  (518 px position grid, patch 14, so a 224 px input resizes the grid as with the real model);
  ``layout="torch-hub"``: the same weights as torch.hub's ``dinov2_vitl14_pretrain.pth`` (flat
  ``blocks.N.attn.qkv.weight`` keys), with the architecture passed as ``config``.

Weights are re-drawn (matrices by ``spread_weights``; LayerNorm, biases, layer scales, tokens and
positions by :func:`respread_all`) so that every parameter moves the features and a key-mapping error
cannot hide behind a default value (LayerNorm weight 1, bias 0). Builders reuse a folder that exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rewardkit.testing._common import check_layout as _check_layout
from rewardkit.testing._common import save_hf_model
from rewardkit.testing._common import spread_weights as _spread_weights

__all__ = [
    "TINY_CMMD_IMAGE_SIZE", "TINY_DINOV2_IMAGE_SIZE", "tiny_cmmd_config", "tiny_dinov2_config", "respread_all",
    "write_hf_clip_vision_folder", "write_hf_dinov2_folder", "hf_to_hub_dinov2", "tiny_cmmd", "tiny_fd_dinov2",
]

TINY_CMMD_IMAGE_SIZE = 42  # 3 x 3 patches of 14 px
TINY_DINOV2_IMAGE_SIZE = 518  # facebook/dinov2-large's 37 x 37 position grid
_PATCH = 14
_WIDTH, _LAYERS, _HEADS, _EMBED, _VOCAB = 32, 2, 2, 16, 64
_SCALE_JITTER = 0.2  # spread of LayerNorm weights / layer scales around 1 and of biases around 0
_CMMD_FOLDER = "clip-vit-large-patch14-336"
_DINOV2_FOLDER = "dinov2-large"
_HUB_FILE = "dinov2_vitl14_pretrain.pth"


def tiny_cmmd_config() -> dict[str, Any]:
    """``CLIPConfig`` kwargs of a tiny OpenAI-style CLIP (QuickGELU, patch 14, small text vocabulary)."""
    common = {"hidden_size": _WIDTH, "intermediate_size": 4 * _WIDTH, "num_attention_heads": _HEADS,
              "num_hidden_layers": _LAYERS, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    return {
        "projection_dim": _EMBED,
        "text_config": {**common, "max_position_embeddings": 77, "vocab_size": _VOCAB,
                        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
        "vision_config": {**common, "image_size": TINY_CMMD_IMAGE_SIZE, "patch_size": _PATCH},
    }


def tiny_dinov2_config(image_size: int = TINY_DINOV2_IMAGE_SIZE) -> dict[str, Any]:
    """``Dinov2Config`` kwargs of a tiny DINOv2 (ViT-L/14's settings at width 32, depth 2)."""
    return {"hidden_size": _WIDTH, "num_hidden_layers": _LAYERS, "num_attention_heads": _HEADS, "mlp_ratio": 4,
            "image_size": image_size, "patch_size": _PATCH, "layerscale_value": 1.0, "layer_norm_eps": 1e-6,
            "hidden_act": "gelu", "qkv_bias": True, "use_swiglu_ffn": False}


def respread_all(model: torch.nn.Module, seed: int) -> None:
    """``spread_weights`` for matrices, then random LayerNorm weights, biases, layer scales and embeddings."""
    _spread_weights(model, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim >= 2 and "embedding" not in name and "token" not in name:
                continue  # drawn by spread_weights
            if param.ndim == 4:  # patch projection: unit-variance output per unit-variance input
                param.copy_(noise / param[0].numel() ** 0.5)
            elif name.endswith("bias"):
                param.copy_(_SCALE_JITTER * noise)
            elif "embedding" in name or "token" in name:  # CLS / mask tokens, position and token tables
                param.copy_(noise)
            else:  # LayerNorm weights, DINOv2 layer scales (lambda1)
                param.copy_(1.0 + _SCALE_JITTER * noise)


def _save(model: torch.nn.Module, folder: Path) -> Path:
    return save_hf_model(model.eval(), folder)


def _exists(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _tiny_clip(seed: int) -> torch.nn.Module:
    from transformers import CLIPConfig, CLIPModel

    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(**tiny_cmmd_config()))
    respread_all(model, seed)
    return model


def write_hf_clip_vision_folder(folder: str | Path, *, seed: int = 0) -> Path:
    """A ``CLIPVisionModelWithProjection`` folder with the vision side of ``tiny_cmmd``'s CLIP (same seed)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = Path(folder)
    if _exists(folder):
        return folder
    clip = _tiny_clip(seed)
    vision_config = CLIPVisionConfig(**tiny_cmmd_config()["vision_config"], projection_dim=_EMBED)
    model = CLIPVisionModelWithProjection(vision_config)
    model.vision_model.load_state_dict(clip.vision_model.state_dict())
    model.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    return _save(model, folder)


def write_hf_dinov2_folder(folder: str | Path, *, seed: int = 0, image_size: int = TINY_DINOV2_IMAGE_SIZE) -> Path:
    """A ``Dinov2Model`` folder (``config.json`` + ``model.safetensors``) of :func:`tiny_dinov2_config`."""
    from transformers import Dinov2Config, Dinov2Model

    folder = Path(folder)
    if _exists(folder):
        return folder
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2Model(Dinov2Config(**tiny_dinov2_config(image_size)))
    respread_all(model, seed)
    return _save(model, folder)


def hf_to_hub_dinov2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' checkpoint keys -> torch.hub DINOv2 keys (query/key/value fused into ``attn.qkv``)."""
    top = {"embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
           "embeddings.position_embeddings": "pos_embed", "layernorm.weight": "norm.weight",
           "layernorm.bias": "norm.bias", "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias"}
    block = {"attention.output.dense.": "attn.proj.", "layer_scale1.lambda1": "ls1.gamma",
             "layer_scale2.lambda1": "ls2.gamma"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        index, rest = key.removeprefix("encoder.layer.").split(".", 1)
        if rest.startswith("attention.attention."):  # query/key/value -> one fused qkv, written at "query"
            _, _, name, kind = rest.split(".")
            if name == "query":
                parts = [state[f"encoder.layer.{index}.attention.attention.{part}.{kind}"]
                         for part in ("query", "key", "value")]
                out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
            continue
        for old, new in block.items():
            rest = rest.replace(old, new)
        out[f"blocks.{index}.{rest}"] = value
    return out


def tiny_cmmd(root: str | Path, layout: str = "upstream", seed: int = 0) -> dict[str, Any]:
    """A tiny full ``CLIPModel`` HF folder, as ``openai/clip-vit-large-patch14-336`` ships; ``{"weights": folder}``."""
    _check_layout(layout, ("upstream",))
    folder = Path(root) / f"seed{seed}" / _CMMD_FOLDER
    if not _exists(folder):
        _save(_tiny_clip(seed), folder)
    return {"weights": str(folder)}


def tiny_fd_dinov2(root: str | Path, layout: str = "upstream", seed: int = 0) -> dict[str, Any]:
    """``upstream``: a ``Dinov2Model`` HF folder like ``facebook/dinov2-large`` (``{"weights": folder}``);
    ``torch-hub``: ``dinov2_vitl14_pretrain.pth`` with hub keys (``{"weights": file, "config": kwargs}``)."""
    _check_layout(layout, ("upstream", "torch-hub"))
    root = Path(root) / f"seed{seed}"
    folder = write_hf_dinov2_folder(root / _DINOV2_FOLDER, seed=seed)
    if layout == "upstream":
        return {"weights": str(folder)}
    path = root / _HUB_FILE
    if not path.is_file():
        from safetensors.torch import load_file

        torch.save(hf_to_hub_dinov2(load_file(str(folder / "model.safetensors"))), path)
    return {"weights": str(path), "config": tiny_dinov2_config()}
