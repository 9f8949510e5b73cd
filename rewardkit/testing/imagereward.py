"""Tiny ImageReward checkpoints in both real layouts, with an offline BERT tokenizer.

``tiny_imagereward(root, layout)`` writes seeded random weights under ``root`` exactly as they ship:

* ``layout="upstream"``: ``ImageReward.pt`` (``torch.save`` of a plain state dict, THUDM/ImageReward) plus
  ``med_config.json`` beside it, and a ``bert-base-uncased/`` tokenizer folder (upstream downloads that
  tokenizer separately);
* ``layout="diffsynth"``: ``ImageReward/model.safetensors`` (DiffSynth-Studio ``ImageMetrics``: the same
  keys) with the tokenizer files in the same ``ImageReward/`` folder.

Both hold every upstream key, including ``blip.text_encoder.embeddings.position_ids`` and the unused
``blip.vision_proj`` / ``blip.text_proj`` (256-wide, BLIP_Pretrain's ``embed_dim``).

The tokenizer is a real ``BertTokenizer`` over a small WordPiece vocabulary written here: BERT's five
special tokens (``[PAD]`` = 0 as in bert-base-uncased), some whole words, every lower-case letter, digit
and common punctuation mark, and their ``##`` continuations, so any ASCII prompt tokenizes without
``[UNK]``. ``[DEC]`` and ``[ENC]`` are added when it is loaded, as upstream's ``init_tokenizer`` does.

Weights are non-degenerate (DESIGN.md): matrices ~ N(0, 1 / fan_in), embeddings, class token and position
embeddings ~ N(0, 0.5^2), LayerNorm scales 1 + N(0, 0.2^2), biases N(0, 0.1^2), so that the image, the
prompt and every layer move the score (``tests/test_imagereward.py`` checks it).
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import torch

from rewardkit.testing._common import check_layout, save_safetensors, spread_weights

__all__ = ["TINY_IMAGEREWARD_CONFIG", "tiny_imagereward", "write_bert_tokenizer", "tiny_imagereward_state"]

_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # bert-base-uncased ids 0, 100, 101, 102, 103
_WORDS = ["a", "an", "the", "of", "on", "at", "in", "photo", "cat", "dog", "red", "car", "road", "bowl", "fruit",
          "mountains", "dawn", "astronaut", "owl", "painting", "house"]
_CHARS = list(string.ascii_lowercase + string.digits) + list(".,!?'-:;\"()&/")
_BLIP_EMBED_DIM = 256  # BLIP_Pretrain(embed_dim=256): vision_proj / text_proj width (unused by the reward)
_SPREAD = 0.5  # std of embeddings, class token, position embeddings
_NORM_SPREAD, _BIAS_SPREAD = 0.2, 0.1


def _vocabulary() -> list[str]:
    words = [w for w in _WORDS if w not in _CHARS]
    return _SPECIALS + words + _CHARS + ["##" + c for c in _CHARS]


# Vision width != text width and different head counts, so that mixing them up fails the parity tests.
TINY_IMAGEREWARD_CONFIG: dict[str, Any] = {
    "image_size": 224, "patch_size": 32, "vision_width": 48, "vision_layers": 2, "vision_heads": 3,
    "text_width": 32, "text_layers": 2, "text_heads": 2, "text_intermediate": 64,
    "vocab_size": len(_vocabulary()) + 2, "max_positions": 40,
}


def write_bert_tokenizer(folder: str | Path) -> Path:
    """Write ``vocab.txt`` + ``tokenizer_config.json`` of an uncased ``BertTokenizer`` (see module docstring)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(_vocabulary()) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return folder


def _randomize(net: torch.nn.Module, seed: int) -> None:
    spread_weights(net, seed)  # matrices (not embeddings): N(0, 1 / fan_in)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in net.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1 and "norm" in name.lower():  # LayerNorm scale and shift
                param.copy_((1.0 + _NORM_SPREAD * noise) if name.endswith("weight") else _BIAS_SPREAD * noise)
            elif "embeddings." in name or name.endswith(("cls_token", "pos_embed")):
                param.copy_(noise * _SPREAD)
            elif param.ndim == 1:
                param.copy_(_BIAS_SPREAD * noise)


def tiny_imagereward_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The full upstream state dict (``ImageReward.pt`` keys) of the tiny model."""
    from rewardkit.nets.blip import ImageRewardConfig, ImageRewardNet

    config = ImageRewardConfig.coerce(TINY_IMAGEREWARD_CONFIG)
    net = ImageRewardNet(config)
    _randomize(net, seed)
    state = {("" if k.startswith("mlp.") else "blip.") + k: v for k, v in net.state_dict().items()}
    generator = torch.Generator().manual_seed(seed + 2)
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(config.max_positions)[None]
    for prefix, width in (("blip.vision_proj", config.vision_width), ("blip.text_proj", config.text_width)):
        state[f"{prefix}.weight"] = torch.randn(_BLIP_EMBED_DIM, width, generator=generator) / width**0.5
        state[f"{prefix}.bias"] = torch.zeros(_BLIP_EMBED_DIM)
    return state


def _med_config() -> dict[str, Any]:
    """BLIP ``med_config.json`` with the tiny text sizes (the other values are upstream's)."""
    from rewardkit.testing.imagereward_upstream import upstream_med_config

    return upstream_med_config(TINY_IMAGEREWARD_CONFIG)


def tiny_imagereward(root: str | Path, layout: str = "upstream", seed: int = 0) -> dict[str, Any]:
    """Write a tiny ImageReward checkpoint under ``root``; returns ``rk.load("imagereward", **kwargs)`` kwargs.

    Args:
        root: output folder (created).
        layout: ``"upstream"`` or ``"diffsynth"`` (module docstring).
        seed: weight seed.

    Returns:
        ``{"weights": file, "config": TINY_IMAGEREWARD_CONFIG}`` plus ``"tokenizer": folder`` for ``upstream``.
    """
    check_layout(layout, ("upstream", "diffsynth"))
    root = Path(root)
    state = tiny_imagereward_state(seed)
    config = dict(TINY_IMAGEREWARD_CONFIG)
    if layout == "diffsynth":
        folder = root / "ImageReward"
        path = save_safetensors(state, folder / "model.safetensors")
        write_bert_tokenizer(folder)
        return {"weights": str(path), "config": config}
    root.mkdir(parents=True, exist_ok=True)
    path = root / "ImageReward.pt"
    torch.save(state, path)
    (root / "med_config.json").write_text(json.dumps(_med_config(), indent=1))
    return {"weights": str(path), "tokenizer": str(write_bert_tokenizer(root / "bert-base-uncased")), "config": config}
