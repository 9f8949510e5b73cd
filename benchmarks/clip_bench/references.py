"""Reference computations: the upstream libraries, called the way the upstream projects call them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clip_bench.checkpoints import CONTEXT_LENGTH, UpstreamAestheticMLP
from rewardkit.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

CLIPSCORE_W = 2.5  # Hessel et al. 2021, eq. 1


def pooled_features(output: Any) -> torch.Tensor:
    """transformers 4.x returns a tensor from get_*_features, 5.x a ModelOutput whose pooler_output is it."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class Reference:
    """``preprocess(pil) -> pixels``, ``image_features``, ``text_features``, ``score``; ``__call__`` chains them."""

    def preprocess(self, images: list[Image.Image]) -> Any:
        raise NotImplementedError

    def image_features(self, pixels: Any) -> torch.Tensor:
        raise NotImplementedError

    def text_features(self, prompts: list[str]) -> torch.Tensor | None:
        return None

    def score(self, image_features: torch.Tensor, text_features: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        return self.score(self.image_features(self.preprocess(images)), self.text_features(prompts))


class HFClipReference(Reference):
    """PickScore README ``calc_probs`` flow (pickscore) / CLIPScore on HF CLIP (clip-score), pairwise."""

    def __init__(self, folder: Path, kind: str) -> None:
        from transformers import CLIPModel, CLIPProcessor

        # backend="pil": the PIL CLIPImageProcessor (transformers 4.x default) that PickScore was evaluated
        # with; transformers 5.x defaults to a torchvision backend about one gray level away from it.
        self.processor = CLIPProcessor.from_pretrained(str(folder), backend="pil")
        self.model = CLIPModel.from_pretrained(str(folder)).eval()
        self.kind = kind

    def preprocess(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        return self.processor(images=images, padding=True, truncation=True, max_length=CONTEXT_LENGTH,
                              return_tensors="pt")

    def image_features(self, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        embeds = pooled_features(self.model.get_image_features(**pixels))
        return embeds / embeds.norm(dim=-1, keepdim=True)

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.processor(text=prompts, padding=True, truncation=True, max_length=CONTEXT_LENGTH,
                                return_tensors="pt")
        embeds = pooled_features(self.model.get_text_features(**tokens))
        return embeds / embeds.norm(dim=-1, keepdim=True)

    def score(self, image_features: torch.Tensor, text_features: torch.Tensor | None) -> torch.Tensor:
        cosine = torch.diagonal(text_features @ image_features.T)
        if self.kind == "pickscore":
            return self.model.logit_scale.exp() * cosine
        return CLIPSCORE_W * torch.clamp(cosine, min=0.0)


class HPSResizeMaxSize(torch.nn.Module):
    """HPSv2 ``ResizeMaxSize`` (hpsv2/src/open_clip/transform.py) on a CHW float tensor."""

    def __init__(self, max_size: int, fill: float = 0) -> None:
        super().__init__()
        self.max_size = max_size
        self.fill = fill

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        height, width = img.shape[1:]
        scale = self.max_size / float(max(height, width))
        if scale != 1.0:
            new_size = tuple(round(dim * scale) for dim in (height, width))
            img = TF.resize(img, new_size, InterpolationMode.BICUBIC)
            pad_h, pad_w = self.max_size - new_size[0], self.max_size - new_size[1]
            img = TF.pad(img, padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2],
                         fill=self.fill)
        return img


def _convert_to_rgb_or_rgba(image: Image.Image) -> Image.Image:  # HPSv2 transform.py
    return image if image.mode == "RGBA" else image.convert("RGB")


class HPSReference(Reference):
    """``hpsv2.score`` computation (img_score.py), batched: open_clip model, letterbox, raw cosine."""

    def __init__(self, checkpoint: Path, config_file: Path) -> None:
        import open_clip
        from torchvision.transforms import Compose, Normalize, ToTensor

        open_clip.add_model_config(config_file)
        model_name = config_file.stem
        logging.getLogger().setLevel(logging.ERROR)  # "no pretrained weights loaded": loaded just below
        self.model = open_clip.create_model(model_name, pretrained=None, output_dict=True)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["state_dict"])
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        size = self.model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        self.transform = Compose([_convert_to_rgb_or_rgba, ToTensor(), HPSResizeMaxSize(int(size)),
                                  Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self.transform(image) for image in images])

    def __call__(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        # As upstream: one model(image, text) call, features normalised inside open_clip.
        outputs = self.model(self.preprocess(images), self.tokenizer(prompts))
        return torch.diagonal(outputs["image_features"] @ outputs["text_features"].T)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels, normalize=True)

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(prompts), normalize=True)

    def score(self, image_features: torch.Tensor, text_features: torch.Tensor | None) -> torch.Tensor:
        return torch.diagonal(image_features @ text_features.T)


class AestheticReference(Reference):
    """improved-aesthetic-predictor ``simple_inference.py`` on HF CLIP: clip.load transform, numpy norm, MLP."""

    def __init__(self, folder: Path, head: Path) -> None:
        from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
        from transformers import CLIPModel

        self.model = CLIPModel.from_pretrained(str(folder)).eval()
        size = self.model.config.vision_config.image_size
        self.mlp = UpstreamAestheticMLP(self.model.config.projection_dim)
        self.mlp.load_state_dict(torch.load(head, map_location="cpu", weights_only=True))
        self.mlp.eval()
        # openai/CLIP clip.py _transform(n_px)
        self.transform = Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size),
                                  lambda image: image.convert("RGB"), ToTensor(),
                                  Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self.transform(image) for image in images])

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return pooled_features(self.model.get_image_features(pixel_values=pixels))

    def score(self, image_features: torch.Tensor, text_features: torch.Tensor | None) -> torch.Tensor:
        array = image_features.cpu().numpy()
        norm = np.atleast_1d(np.linalg.norm(array, 2, -1))  # simple_inference.py normalized()
        norm[norm == 0] = 1
        embeds = array / np.expand_dims(norm, -1)
        return self.mlp(torch.from_numpy(embeds).float()).squeeze(-1)


class BioCLIPReference(Reference):
    """open_clip hub-folder loading (``create_model_and_transforms``), pybioclip-style logits, pairwise."""

    def __init__(self, folder: Path) -> None:
        import open_clip

        model_id = f"local-dir:{folder}"
        self.model, _, self.transform = open_clip.create_model_and_transforms(model_id)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_id)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self.transform(image) for image in images])

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(pixels), dim=-1)

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        return F.normalize(self.model.encode_text(self.tokenizer(prompts)), dim=-1)

    def score(self, image_features: torch.Tensor, text_features: torch.Tensor | None) -> torch.Tensor:
        return self.model.logit_scale.exp() * torch.diagonal(image_features @ text_features.T)


def build_reference(name: str, files: dict[str, Path]) -> Reference:
    if name in ("pickscore", "clip-score"):
        return HFClipReference(files["folder"], name)
    if name == "hpsv2":
        return HPSReference(files["checkpoint"], files["config_file"])
    if name == "aesthetic":
        return AestheticReference(files["folder"], files["head"])
    return BioCLIPReference(files["folder"])
