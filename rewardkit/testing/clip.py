"""Tiny CLIP-family checkpoints (clip-score, PickScore, HPSv2, aesthetic, BioCLIP) in the real formats.

Each ``tiny_<reward>(root, layout=...)`` writes a checkpoint under ``root`` exactly as the upstream
project (``layout="upstream"``) or DiffSynth-Studio's ``ImageMetrics`` (``layout="diffsynth"``)
ships it, and returns the keyword arguments for ``rk.load(name, **kwargs)``. The real loading code
then reads it. Tokenizers are the real CLIP BPE, built from the vocabulary that ships inside
open_clip, so prompts tokenize exactly as with real weights.

Example:
    >>> import rewardkit as rk, rewardkit.testing as rkt
    >>> reward = rk.load("pickscore", **rkt.tiny_pickscore("/tmp/rk-tiny"))
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import torch

from rewardkit.testing._common import check_layout as _check_layout
from rewardkit.testing._common import save_hf_model
from rewardkit.testing._common import save_safetensors as _save_safetensors
from rewardkit.testing._common import spread_weights as _spread_weights

__all__ = [
    "TINY_IMAGE_SIZE", "write_clip_tokenizer", "tiny_hf_clip_config", "tiny_open_clip_config",
    "write_hf_clip_folder", "tiny_clip_score", "tiny_pickscore", "tiny_hpsv2", "tiny_aesthetic",
    "tiny_bioclip",
]

TINY_IMAGE_SIZE = 32
_WIDTH, _LAYERS, _HEADS, _EMBED = 32, 2, 2, 16
# CLIP BPE: 256 bytes + 256 bytes with "</w>" + 48894 merges + 2 specials = 49408 ids (openai/CLIP).
_NUM_MERGES = 49152 - 256 - 2
_SOT, _EOT = "<|startoftext|>", "<|endoftext|>"


def write_clip_tokenizer(folder: str | Path) -> Path:
    """Write a Hugging Face CLIP tokenizer (``vocab.json``, ``merges.txt``, configs) into ``folder``.

    Built from ``open_clip/bpe_simple_vocab_16e6.txt.gz`` (the OpenAI CLIP BPE), so token ids equal
    those of ``openai/clip-vit-*`` and laion CLIP tokenizers.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe  # the vocabulary file open_clip ships
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : _NUM_MERGES + 1]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(line.split()) for line in lines]
    tokens += [_SOT, _EOT]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
    specials = {"bos_token": _SOT, "eos_token": _EOT, "pad_token": _EOT, "unk_token": _EOT}
    tokenizer_config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=1))
    return folder


def _write_preprocessor_config(folder: Path, size: int) -> None:
    from rewardkit.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    config = {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD), "do_convert_rgb": True,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=1))


def tiny_hf_clip_config(hidden_act: str = "gelu") -> dict[str, Any]:
    """``CLIPConfig`` kwargs of a ~1.7M-parameter CLIP (the real 49408-token vocabulary dominates)."""
    common = {"hidden_size": _WIDTH, "intermediate_size": 4 * _WIDTH, "num_attention_heads": _HEADS,
              "num_hidden_layers": _LAYERS, "hidden_act": hidden_act, "layer_norm_eps": 1e-5}
    return {
        "projection_dim": _EMBED,
        "text_config": {**common, "max_position_embeddings": 77, "vocab_size": 49408,
                        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
        "vision_config": {**common, "image_size": TINY_IMAGE_SIZE, "patch_size": 8},
    }


def tiny_open_clip_config() -> dict[str, Any]:
    """open_clip model config of a tiny ViT CLIP (exact GELU, like ViT-H-14 and ViT-L-14)."""
    return {
        "embed_dim": _EMBED,
        "vision_cfg": {"image_size": TINY_IMAGE_SIZE, "layers": _LAYERS, "width": _WIDTH,
                       "head_width": _WIDTH // _HEADS, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": _WIDTH, "heads": _HEADS,
                     "layers": _LAYERS},
    }


def _hf_clip_model(seed: int, hidden_act: str) -> torch.nn.Module:
    from transformers import CLIPConfig, CLIPModel

    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(**tiny_hf_clip_config(hidden_act)))
    _spread_weights(model, seed)
    return model.eval()


def _open_clip_model(seed: int) -> torch.nn.Module:
    from rewardkit.nets.clip import build_open_clip_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_open_clip_model(tiny_open_clip_config())
    _spread_weights(model, seed)
    return model.eval()


def _with_position_ids(state: dict[str, torch.Tensor], vision: bool = True, text: bool = True) -> dict:
    # DiffSynth's ImageMetrics files keep the position_ids buffers older transformers saved.
    state = dict(state)
    if text:
        state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    if vision:
        state["vision_model.embeddings.position_ids"] = torch.arange((TINY_IMAGE_SIZE // 8) ** 2 + 1)[None]
    return state


def write_hf_clip_folder(folder: str | Path, *, seed: int = 0, hidden_act: str = "gelu") -> Path:
    """A Hugging Face CLIP folder: ``config.json``, ``model.safetensors``, tokenizer, preprocessor."""
    folder = Path(folder)
    save_hf_model(_hf_clip_model(seed, hidden_act), folder)
    write_clip_tokenizer(folder)
    _write_preprocessor_config(folder, TINY_IMAGE_SIZE)
    return folder


def tiny_clip_score(root: str | Path, layout: str = "upstream", seed: int = 0) -> dict[str, Any]:
    """OpenAI-style (QuickGELU) HF CLIP folder, as ``openai/clip-vit-large-patch14`` ships."""
    _check_layout(layout, ("upstream",))
    return {"weights": str(write_hf_clip_folder(Path(root) / "clip-score", seed=seed, hidden_act="quick_gelu"))}


def tiny_pickscore(root: str | Path, layout: str = "upstream", seed: int = 1) -> dict[str, Any]:
    """``upstream``: an HF folder like ``yuvalkirstain/PickScore_v1``; ``diffsynth``:
    ``PickScore/model.safetensors`` (HF keys + position_ids) beside its processor files."""
    _check_layout(layout, ("upstream", "diffsynth"))
    root = Path(root)
    if layout == "upstream":
        return {"weights": str(write_hf_clip_folder(root / "PickScore_v1", seed=seed))}
    folder = root / "PickScore"
    _save_safetensors(_with_position_ids(_hf_clip_model(seed, "gelu").state_dict()), folder / "model.safetensors")
    write_clip_tokenizer(folder)
    _write_preprocessor_config(folder, TINY_IMAGE_SIZE)
    return {"weights": str(folder / "model.safetensors"), "config": tiny_hf_clip_config()}


def tiny_hpsv2(root: str | Path, layout: str = "upstream", seed: int = 2) -> dict[str, Any]:
    """``upstream``: ``HPS_v2_compressed.pt`` = ``{"state_dict": open_clip keys}``; ``diffsynth``:
    ``HPSv2/model.safetensors`` (flat open_clip keys)."""
    _check_layout(layout, ("upstream", "diffsynth"))
    state = _open_clip_model(seed).state_dict()
    root = Path(root)
    if layout == "upstream":
        path = root / "HPS_v2_compressed.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": state}, path)
    else:
        path = _save_safetensors(state, root / "HPSv2" / "model.safetensors")
    return {"weights": str(path), "config": tiny_open_clip_config()}


def _aesthetic_head_state(seed: int) -> dict[str, torch.Tensor]:
    from rewardkit.nets.aesthetic_mlp import AestheticMLP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AestheticMLP(input_size=_EMBED).state_dict()


def tiny_aesthetic(root: str | Path, layout: str = "upstream", seed: int = 3) -> dict[str, Any]:
    """``upstream``: the MLP ``.pth`` + an OpenAI-style HF CLIP folder; ``diffsynth``:
    ``Aesthetic/model.safetensors`` (``vision_model.*``, ``visual_projection.weight``, ``layers.*``,
    stray ``vision_model.embeddings.position_ids``)."""
    _check_layout(layout, ("upstream", "diffsynth"))
    root = Path(root)
    head = _aesthetic_head_state(seed)
    if layout == "upstream":
        clip_folder = write_hf_clip_folder(root / "clip-vit-l-14", seed=seed, hidden_act="quick_gelu")
        head_path = root / "sac+logos+ava1-l14-linearMSE.pth"
        torch.save(head, head_path)
        return {"weights": str(head_path), "clip_weights": str(clip_folder)}
    clip_state = _hf_clip_model(seed, "quick_gelu").state_dict()
    vision = {k: v for k, v in clip_state.items() if k.startswith(("vision_model.", "visual_projection."))}
    merged = {**_with_position_ids(vision, text=False), **head}
    path = _save_safetensors(merged, root / "Aesthetic" / "model.safetensors")
    return {"weights": str(path), "config": tiny_hf_clip_config("quick_gelu")}


def tiny_bioclip(root: str | Path, layout: str = "upstream", seed: int = 4) -> dict[str, Any]:
    """``upstream``: an open_clip hub folder like ``imageomics/bioclip-2``; ``diffsynth``:
    ``BioCLIPv2/open_clip_model.safetensors`` (flat open_clip keys)."""
    _check_layout(layout, ("upstream", "diffsynth"))
    from rewardkit.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    state = _open_clip_model(seed).state_dict()
    root = Path(root)
    if layout == "diffsynth":
        path = _save_safetensors(state, root / "BioCLIPv2" / "open_clip_model.safetensors")
        return {"weights": str(path), "config": tiny_open_clip_config()}
    folder = root / "bioclip-2"
    _save_safetensors(state, folder / "open_clip_model.safetensors")
    preprocess_cfg = {"mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD),
                      "interpolation": "bicubic", "resize_mode": "shortest"}
    config = {"model_cfg": tiny_open_clip_config(), "preprocess_cfg": preprocess_cfg}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=1))
    return {"weights": str(folder)}


