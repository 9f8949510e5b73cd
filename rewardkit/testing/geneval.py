"""Tiny GenEval models, built offline: a random Mask2Former (HF folder) and a random open_clip colour CLIP.

``tiny_geneval(root)`` writes

* ``mask2former/``: ``Mask2FormerForUniversalSegmentation`` with a 4-stage Swin of width 16 and 80 COCO labels,
  saved with ``save_pretrained`` plus a ``Mask2FormerImageProcessor`` (shortest side 64), the layout of
  ``facebook/mask2former-swin-small-coco-instance``. The class head is scaled up so that its softmax is peaked:
  some queries then pass GenEval's 0.3 threshold and the rules see detections (a default-initialised head gives
  every class about 1/81 and nothing would ever be detected).
* ``clip/``: an open_clip hub folder (``open_clip_config.json`` + ``open_clip_model.safetensors``), the layout of
  ``timm/vit_large_patch14_clip_224.openai``, from :mod:`rewardkit.testing.clip`'s tiny open_clip model.

and returns ``rk.load("geneval", **kwargs)`` keyword arguments. The numbers are meaningless; the loading,
post-processing, colour and rule code is the real one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rewardkit.testing._common import check_layout, save_hf_model, save_safetensors

__all__ = ["tiny_geneval", "tiny_mask2former", "TINY_CLASS_HEAD_SCALE"]

_LAYOUTS = ("upstream",)
TINY_CLASS_HEAD_SCALE = 40.0  # peaks the random class softmax so that some detections pass 0.3
_COCO_LABELS = 80


def tiny_mask2former(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random COCO-instance Mask2Former HF folder (~0.4M parameters) and return it."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor, SwinConfig

    from rewardkit.rewards.geneval_rules import GENEVAL_CLASSES

    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, use_pretrained_backbone=False, num_labels=_COCO_LABELS,
                               num_queries=12, hidden_dim=32, mask_feature_size=32, feature_size=32, encoder_layers=1,
                               decoder_layers=2, num_attention_heads=2, encoder_feedforward_dim=64, dim_feedforward=64,
                               id2label=dict(enumerate(GENEVAL_CLASSES)),
                               label2id={n: i for i, n in enumerate(GENEVAL_CLASSES)})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Mask2FormerForUniversalSegmentation(config).eval()
        with torch.no_grad():
            model.class_predictor.weight.mul_(TINY_CLASS_HEAD_SCALE)
    folder = save_hf_model(model, folder)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}, size_divisor=32,
                              num_labels=_COCO_LABELS).save_pretrained(str(folder))
    return folder


def tiny_geneval(root: str | Path, layout: str = "upstream", seed: int = 0) -> dict[str, Any]:
    """Tiny detector + colour CLIP under ``root``; returns ``weights`` and ``color_weights`` for ``rk.load``."""
    from rewardkit.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from rewardkit.testing.clip import _open_clip_model, tiny_open_clip_config

    check_layout(layout, _LAYOUTS)
    root = Path(root)
    detector = tiny_mask2former(root / "mask2former", seed)
    clip = root / "clip"
    save_safetensors(_open_clip_model(seed + 5).state_dict(), clip / "open_clip_model.safetensors")
    preprocess = {"mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD), "interpolation": "bicubic",
                  "resize_mode": "shortest"}
    (clip / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_open_clip_config(),
                                                            "preprocess_cfg": preprocess}, indent=1))
    return {"weights": str(detector), "color_weights": str(clip)}
