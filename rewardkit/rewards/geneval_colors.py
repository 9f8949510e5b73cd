"""GenEval's colour classifier: zero-shot CLIP (open_clip ViT-L-14, OpenAI weights) on masked object crops.

Upstream: ``djghosh13/geneval`` ``evaluation/evaluate_images.py`` (``ImageCrops``, ``color_classification``)
with ``clip_benchmark``'s ``zero_shot_classifier`` / ``run_classification``. Per object: the image is
composited over a ``#999`` grey background through the object's mask, cropped to its box (PIL ``crop``), and
preprocessed by open_clip's eval transform. Per class, each of the 10 colours is embedded as the normalised
mean of the normalised text embeddings of three templates; the colour with the largest cosine wins (the
``100 x`` logit scale of clip_benchmark does not change the argmax). Upstream runs CUDA fp16 autocast
(clip_benchmark's default); rewardkit's exact mode is float32.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import torch

from rewardkit.rewards.geneval_rules import COLORS, Detection

__all__ = ["ClipColorClassifier", "color_templates", "DEFAULT_COLOR_WEIGHTS", "CROP_BACKGROUND"]

DEFAULT_COLOR_WEIGHTS = "hf:timm/vit_large_patch14_clip_224.openai"  # open_clip "ViT-L-14", pretrained="openai"
COLOR_ARCHITECTURE = "ViT-L-14"  # evaluate_images.py --options clip_model default
CROP_BACKGROUND = "#999"  # evaluate_images.py --options bgcolor default


def color_templates(classname: str) -> list[str]:
    """The three prompt templates of ``color_classification`` for one class, with ``{c}`` for the colour."""
    return [f"a photo of a {{c}} {classname}", f"a photo of a {{c}}-colored {classname}", "a photo of a {c} object"]


class ClipColorClassifier:
    """Classify the colour of detected objects as GenEval does.

    Args:
        weights: a CLIP checkpoint in any format ``rewardkit`` reads (open_clip hub folder, HF folder, file);
            ``None`` = :data:`DEFAULT_COLOR_WEIGHTS`.
        device: where CLIP runs.
        dtype: ``None`` (float32) or ``"bf16"`` / ``"fp16"`` autocast.
        config: architecture override for checkpoints of another size (``rk.load`` convention).
    """

    def __init__(self, weights: Any = None, device: Any = None, dtype: Any = None, config: Any = None) -> None:
        from rewardkit.precision import parse_dtype
        from rewardkit.rewards.clip_common import load_clip_checkpoint, spec_for

        checkpoint = load_clip_checkpoint(weights or DEFAULT_COLOR_WEIGHTS, name="geneval colours",
                                          default_config={"open_clip": COLOR_ARCHITECTURE}, config=config)
        self.towers = checkpoint.towers.eval().requires_grad_(False)
        self.spec = spec_for(checkpoint)
        self.device = torch.device(device or "cpu")
        self.towers.to(self.device)
        self.dtype = parse_dtype(dtype)
        self._classifiers: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # locks do not pickle
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def classifier(self, classname: str) -> torch.Tensor:
        """``(D, 10)`` colour embeddings for ``classname`` (cached per class, as upstream's COLOR_CLASSIFIERS)."""
        with self._lock:
            cached = self._classifiers.get(classname)
        if cached is not None:
            return cached
        columns = []
        with torch.inference_mode():
            for colour in COLORS:
                texts = [template.format(c=colour) for template in color_templates(classname)]
                embeds = torch.nn.functional.normalize(self.towers.encode_text(texts).float(), dim=-1).mean(dim=0)
                columns.append(embeds / embeds.norm())
        made = torch.stack(columns, dim=1)
        with self._lock:
            self._classifiers[classname] = made
        return made

    def crops(self, image: Any, objects: Sequence[Detection]) -> list[Any]:
        """``ImageCrops``: each object composited over grey through its mask (if any), cropped to its box."""
        from PIL import Image

        rgb = image.convert("RGB")
        blank = Image.new("RGB", rgb.size, color=CROP_BACKGROUND)
        out = []
        for obj in objects:
            masked = rgb if obj.mask is None else Image.composite(rgb, blank, Image.fromarray(obj.mask))
            out.append(masked.crop(obj.box))
        return out

    def __call__(self, image: Any, classname: str, objects: Sequence[Detection]) -> list[str]:
        """The colour name of each object of ``classname`` in the PIL ``image``."""
        from rewardkit.precision import autocast_for
        from rewardkit.preprocess import preprocess_pil

        if not objects:
            return []
        pixels = preprocess_pil(self.crops(image, objects), self.spec).to(self.device)
        with torch.inference_mode(), autocast_for(self.device, self.dtype):
            features = self.towers.encode_image(pixels)
        features = torch.nn.functional.normalize(features.float(), dim=-1)
        return [COLORS[i] for i in (features @ self.classifier(classname)).argmax(dim=1).tolist()]
