"""CMMD's image embedding: L2-normalised CLIP ViT-L/14@336 image embeddings (Jayasumana et al., CVPR 2024).

Upstream: google-research/google-research ``cmmd/`` (not pip-installable; read at commit 19638399 of
``io_util.py`` and 5b09c22d of ``embedding.py``):

* ``io_util._center_crop_and_resize``: ``l = min(w, h)``, ``top = (h - l) // 2``, ``left = (w - l) // 2``
  (floor offsets), ``im.crop((left, top, left + l, top + l))``, then ``im.resize((336, 336), BICUBIC)``
  on the 8-bit image (Pillow, antialiased). ``_read_image`` -> ``np.float32``; ``/ 255.0`` in float32.
* ``embedding._clip_preprocess``: ``jax.image.resize(..., 'bicubic')`` to the same 336 size, which jax
  skips for dimensions whose size does not change (an identity here), then scenic
  ``clip.normalize_image`` = ``(x - OpenAI mean) / OpenAI std``.
* ``embedding.ClipEmbeddingModel.embed``: scenic CLIP ``vit_l14_336px``, whose ``encode_image`` returns
  L2-normalised image embeddings (768-d). Here: transformers ``CLIPVisionModelWithProjection``
  (``image_embeds``) on ``openai/clip-vit-large-patch14-336``, then ``F.normalize`` (the route of the
  sayakpaul/cmmd-pytorch port).

Two preprocessing paths (:class:`CMMDPrep`): ``pil`` reproduces the pipeline above exactly; ``tensor``
is the batched, differentiable equivalent (same crop, antialiased bicubic ``F.interpolate`` in Pillow's
pass order, float arithmetic without the 8-bit rounding Pillow applies after each pass). The gap is
measured in ``tests/test_cmmd_dinov2_features.py`` (at most about one uint8 level per pixel).

Unverified here (no network): that the ``openai/clip-vit-large-patch14-336`` repo ships
``model.safetensors`` (if not, download ``pytorch_model.bin`` next to ``config.json`` and pass the folder).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from rewardkit.metrics.extractor import FeatureExtractor
from rewardkit.precision import autocast_for, parse_dtype
from rewardkit.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, center_crop, normalize, pillow_reorders_passes
from rewardkit.preprocess import resize_like_pil as _resize_like_pil
from rewardkit.weights import drop_keys, file_sha256, load_state_dict_strict, read_state_dict, resolve_weights

__all__ = [
    "CMMD_PRESET", "CMMD_EXTRACTOR_NAME", "CMMD_IMAGE_SIZE", "CMMD_DEFAULT_WEIGHTS", "HF_MODEL_PATTERNS",
    "UINT8_MAX", "pillow_reorders_passes", "resize_like_pil", "check_uint8_scale_batch", "pil_to_rgb",
    "read_hf_folder", "CMMDPrep", "CMMDExtractor", "load_cmmd_extractor",
]

CMMD_PRESET = "cmmd"
CMMD_EXTRACTOR_NAME = "clip-vit-l-14-336"
CMMD_IMAGE_SIZE = 336  # scenic clip.IMAGE_RESOLUTION["vit_l14_336px"]; the HF config's vision image_size
CMMD_DEFAULT_WEIGHTS = "hf:openai/clip-vit-large-patch14-336"
UINT8_MAX = 255.0  # cmmd io_util: `image_batch / 255.0`
# An HF model folder: its config and safetensors weights only (repos also hold .bin/.h5/.msgpack copies).
HF_MODEL_PATTERNS = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_SHARD_INDEX = "model.safetensors.index.json"
# Buffers older transformers saved and newer ones recompute; text-side keys of a full CLIPModel checkpoint.
_POSITION_IDS = ("vision_model.embeddings.position_ids", "text_model.embeddings.position_ids")
_TEXT_PREFIXES = ("text_model.", "text_projection.", "logit_scale")
_CLIP_MODEL_TYPES = ("clip", "clip_vision_model")


def resize_like_pil(images: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Antialiased bicubic resize of 0-255 images ``(B, C, H, W)`` in Pillow's pass order (see preprocess)."""
    return _resize_like_pil(images, size_hw, "bicubic", high=UINT8_MAX)


def check_uint8_scale_batch(images: Any, who: str) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``images`` is a float ``(B, 3, H, W)`` tensor."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        got = f"{images.dtype} tensor" if isinstance(images, torch.Tensor) else type(images).__name__
        raise TypeError(f"{who}.tensor: expected a float (B, 3, H, W) tensor on the 0-255 scale, got {got}; "
                        "convert with images.float() (uint8 values stay on the 0-255 scale)")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{who}.tensor: expected shape (B, 3, H, W), got {tuple(images.shape)}; "
                         "add a batch dimension with images[None] or convert to RGB")


def pil_to_rgb(image: Any, who: str, convert_all: bool) -> Any:
    """An RGB PIL image; grayscale ("L") is converted as upstream does (channel tiling = ``convert("RGB")``)."""
    mode = getattr(image, "mode", None)
    if mode is None:
        raise TypeError(f"{who}.pil: expected a PIL image, got {type(image).__name__}; open it with PIL.Image.open")
    if mode == "RGB":
        return image
    if convert_all or mode == "L":
        return image.convert("RGB")
    raise ValueError(f"{who}.pil: expected an RGB or grayscale PIL image, got mode {mode!r}; the reference does "
                     "not support it either: convert explicitly with image.convert('RGB')")


@dataclass(frozen=True)
class CMMDPrep:
    """CMMD's preprocessing: centre square crop (floor offsets), bicubic resize to ``size``, /255, CLIP normalise.

    Attributes:
        size: ``(height, width)`` of the network input; ``(336, 336)`` for the real model (taken from the
            checkpoint's vision ``image_size`` by :func:`load_cmmd_extractor`).
    """

    size: tuple[int, int] = (CMMD_IMAGE_SIZE, CMMD_IMAGE_SIZE)
    preset: ClassVar[str] = CMMD_PRESET

    def pil(self, image: Any) -> torch.Tensor:
        """Exact path: one RGB (or grayscale) PIL image of any size -> float32 ``(3, *size)``, as cmmd does."""
        import numpy as np
        from PIL import Image

        image = pil_to_rgb(image, "CMMDPrep", convert_all=False)
        width, height = image.size
        side = min(width, height)
        top, left = (height - side) // 2, (width - side) // 2  # cmmd io_util._center_crop_and_resize
        image = image.crop((left, top, left + side, top + side))
        image = image.resize((self.size[1], self.size[0]), resample=Image.Resampling.BICUBIC)
        array = np.asarray(image).astype(np.float32).transpose(2, 0, 1)
        pixels = torch.from_numpy(np.ascontiguousarray(array)) / UINT8_MAX  # float32, as numpy float32 / 255.0
        return normalize(pixels, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Tensor path: float ``(B, 3, H, W)`` on the 0-255 scale -> float32 ``(B, 3, *size)``; differentiable."""
        check_uint8_scale_batch(images, "CMMDPrep")
        side = min(int(images.shape[-2]), int(images.shape[-1]))
        square = center_crop(images.float(), side, rounding="floor")  # the same floor offsets as `pil`
        pixels = resize_like_pil(square, self.size) / UINT8_MAX
        return normalize(pixels, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def read_hf_folder(folder: Path, what: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """Read an HF model folder: ``(config.json dict, state dict, sha256 of the weights)``.

    The sha256 is that of ``model.safetensors`` (or ``pytorch_model.bin``); for a sharded checkpoint it
    is the sha256 of the shards' names and sha256s, one ``"name sha256"`` line each, in sorted order.

    Raises:
        FileNotFoundError: not a folder, no ``config.json`` or no weight file, with the fix.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: {folder} is not a folder; pass a Hugging Face model folder "
                                "(config.json + model.safetensors) or an hf:owner/repo spec")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{what}: {folder} has no config.json; pass a Hugging Face model folder "
                                "(config.json + model.safetensors), e.g. the one save_pretrained writes")
    config = json.loads((folder / "config.json").read_text())
    index = folder / _SHARD_INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        lines = []
        for shard in shards:
            state.update(read_state_dict(folder / shard))
            lines.append(f"{shard} {file_sha256(folder / shard)}")
        return config, state, hashlib.sha256("\n".join(lines).encode()).hexdigest()
    weight_file = next((folder / name for name in _HF_WEIGHT_FILES if (folder / name).is_file()), None)
    if weight_file is None:
        raise FileNotFoundError(f"{what}: {folder} has config.json but none of {_HF_WEIGHT_FILES} or "
                                f"{_SHARD_INDEX}; download the weights into it (`hf download <repo> "
                                "model.safetensors config.json`)")
    return config, read_state_dict(weight_file), file_sha256(weight_file)


class CMMDExtractor(FeatureExtractor):
    """CLIP image tower + projection -> L2-normalised float32 ``(B, projection_dim)`` embeddings.

    Args:
        model: a ``transformers.CLIPVisionModelWithProjection`` (frozen here).
        prep: the matching :class:`CMMDPrep`.
        weights_sha256: sha256 of the weight file (stored with statistics).
        dtype: ``None``/``"fp32"`` (exact) or ``"bf16"``/``"fp16"`` (autocast; outputs stay float32).
    """

    name = CMMD_EXTRACTOR_NAME

    def __init__(self, model: torch.nn.Module, prep: CMMDPrep, weights_sha256: str = "", dtype: Any = None) -> None:
        super().__init__()
        self.model = model
        self.prep = prep
        self.feature_dim = int(model.config.projection_dim)
        self.weights_sha256 = weights_sha256
        self.autocast_dtype = parse_dtype(dtype)
        self.freeze()

    def forward(self, prepared: torch.Tensor) -> torch.Tensor:
        """Prepared ``(B, 3, *prep.size)`` (CLIP-normalised) -> unit-norm float32 ``(B, feature_dim)``."""
        device = self.model.visual_projection.weight.device
        prepared = prepared.to(device=device, dtype=torch.float32)
        with autocast_for(device, self.autocast_dtype):
            embeds = self.model(pixel_values=prepared).image_embeds
        return F.normalize(embeds.float(), dim=-1)


def _build_vision_model(config: dict[str, Any], folder: Path, what: str) -> torch.nn.Module:
    from transformers import CLIPConfig, CLIPVisionConfig, CLIPVisionModelWithProjection

    model_type = config.get("model_type")
    if model_type not in _CLIP_MODEL_TYPES:
        raise ValueError(f"{what}: {folder} holds a {model_type!r} model, not CLIP (config.json model_type must be "
                         f"one of {_CLIP_MODEL_TYPES}); pass a CLIP checkpoint such as {CMMD_DEFAULT_WEIGHTS}")
    if model_type == "clip":
        full = CLIPConfig.from_pretrained(str(folder))
        vision = full.vision_config
        vision.projection_dim = full.projection_dim
    else:
        vision = CLIPVisionConfig.from_pretrained(str(folder))
    return CLIPVisionModelWithProjection(vision)


def load_cmmd_extractor(weights: Any = None, device: Any = None, dtype: Any = None) -> CMMDExtractor:
    """Load CMMD's CLIP ViT-L/14@336 embedding from a Hugging Face folder.

    Args:
        weights: ``None`` (``hf:openai/clip-vit-large-patch14-336``), an ``hf:``/``ms:`` repo spec or a local
            folder holding ``config.json`` and safetensors weights of a full ``CLIPModel`` (its text side is
            ignored) or of a ``CLIPVisionModelWithProjection``.
        device: where the model lives (default CPU).
        dtype: ``None``/``"fp32"`` (exact) or ``"bf16"``/``"fp16"`` (autocast).

    Returns:
        A frozen :class:`CMMDExtractor` whose ``prep.size`` is the checkpoint's vision ``image_size``.

    Raises:
        FileNotFoundError: the weights cannot be found or the folder lacks files.
        ValueError: the folder is not a CLIP checkpoint.
        rewardkit.weights.CheckpointMismatchError: keys or shapes do not match the config.
    """
    what = "CMMD CLIP weights"
    folder = resolve_weights(weights or CMMD_DEFAULT_WEIGHTS, allow_patterns=HF_MODEL_PATTERNS, what=what)
    config, state, sha256 = read_hf_folder(folder, what)
    model = _build_vision_model(config, folder, what)
    state = drop_keys(state, lambda key: key in _POSITION_IDS or key.startswith(_TEXT_PREFIXES))
    load_state_dict_strict(model, state, name=what, hint=f"pass a CLIP checkpoint such as {CMMD_DEFAULT_WEIGHTS}")
    size = int(model.config.image_size)
    extractor = CMMDExtractor(model.eval(), CMMDPrep(size=(size, size)), weights_sha256=sha256, dtype=dtype)
    return extractor.to(torch.device("cpu") if device is None else torch.device(device))
