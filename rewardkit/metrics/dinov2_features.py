"""FD-DINOv2's image features: the final-LayerNorm CLS token of DINOv2 ViT-L/14 (Stein et al., NeurIPS 2023).

Upstream: layer6ai-labs/dgm-eval ``dgm_eval/models/dinov2.py`` (commit d57a6d2d; not pip-installable):

* the encoder is ``torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14')`` and ``model(x)`` returns
  ``head(x_norm_clstoken)`` with an identity head: the CLS token after the final LayerNorm (1024-d);
* ``transform``: ``Compose([Resize((224, 224), BICUBIC), ToTensor()])`` on the PIL image (``convert('RGB')``
  in ``dataloaders.ImagePathDataset``), i.e. Pillow's antialiased 8-bit bicubic, no crop (the aspect ratio
  is squashed), then ``Normalize`` with the ImageNet mean/std.

The weights load into transformers ``Dinov2Model`` (``facebook/dinov2-large`` layout, or the torch.hub file
``dinov2_vitl14_pretrain.pth`` through :func:`hub_to_hf_layout`). The forward pass is the hub model's: the
released model has a 37 x 37 position grid (518 px) and runs at 224 px, and facebookresearch/dinov2
``DinoVisionTransformer.interpolate_pos_encoding`` (hub defaults ``interpolate_offset=0.1``,
``interpolate_antialias=False``) resizes the grid with ``scale_factor=(16 + 0.1) / 37``, whereas
transformers 5.x ``Dinov2Embeddings`` passes ``size=(16, 16)``: a different bicubic sampling grid.
:func:`hub_position_embeddings` reproduces the hub's; on a grid that needs no resize the output equals
``Dinov2Model(...).pooler_output``.

Two preprocessing paths (:class:`DinoV2Prep`): ``pil`` is dgm-eval's transform (bit-exact); ``tensor`` is
the batched, differentiable equivalent (antialiased bicubic ``F.interpolate`` in Pillow's pass order on
the 0-255 scale, without Pillow's 8-bit rounding), about one uint8 level from ``pil`` (measured in
``tests/test_cmmd_dinov2_features.py``). dgm-eval's ``--clean_resize`` option is not implemented.
Only the MLP feed-forward (ViT-S/B/L) is supported; ViT-g/14's SwiGLU checkpoints are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F

from rewardkit.metrics.cmmd_features import (
    HF_MODEL_PATTERNS,
    UINT8_MAX,
    check_uint8_scale_batch,
    pil_to_rgb,
    read_hf_folder,
    resize_like_pil,
)
from rewardkit.metrics.extractor import FeatureExtractor
from rewardkit.precision import autocast_for, parse_dtype
from rewardkit.preprocess import normalize
from rewardkit.weights import file_sha256, load_state_dict_strict, read_state_dict, resolve_weights

__all__ = [
    "DGM_EVAL_PRESET", "DINOV2_EXTRACTOR_NAME", "DGM_EVAL_IMAGE_SIZE", "IMAGENET_MEAN", "IMAGENET_STD",
    "DINOV2_DEFAULT_WEIGHTS", "DINOV2_HUB_URL", "DINOV2_VITL14_CONFIG", "HUB_INTERPOLATE_OFFSET",
    "DinoV2Prep", "DinoV2Extractor", "hub_position_embeddings", "hub_to_hf_layout", "to_model_layout",
    "load_dinov2_extractor",
]

DGM_EVAL_PRESET = "dgm-eval"
DINOV2_EXTRACTOR_NAME = "dinov2-vit-l-14"
DGM_EVAL_IMAGE_SIZE = 224  # dgm_eval/models/dinov2.py: TF.Resize((224, 224), BICUBIC)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # dgm_eval/models/dinov2.py `imagenet_mean`
IMAGENET_STD = (0.229, 0.224, 0.225)  # dgm_eval/models/dinov2.py `imagenet_std`
DINOV2_DEFAULT_WEIGHTS = "hf:facebook/dinov2-large"
# The file torch.hub's dinov2_vitl14 loads (facebookresearch/dinov2 hub/backbones.py, _DINOV2_BASE_URL).
DINOV2_HUB_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
HUB_INTERPOLATE_OFFSET = 0.1  # facebookresearch/dinov2 hub/backbones.py `interpolate_offset` default
# dinov2_vitl14 (hub/backbones.py + models/vision_transformer.py vit_large), as Dinov2Config kwargs; used for
# single-file checkpoints, which carry no config.
DINOV2_VITL14_CONFIG: Mapping[str, Any] = {
    "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "mlp_ratio": 4, "image_size": 518,
    "patch_size": 14, "layerscale_value": 1.0, "layer_norm_eps": 1e-6, "hidden_act": "gelu", "qkv_bias": True,
    "use_swiglu_ffn": False,
}
# transformers' checkpoint layout (what save_pretrained writes) -> transformers 5.x module names.
_FILE_TO_V5 = (
    ("attention.attention.query.", "attention.q_proj."), ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."), ("attention.output.dense.", "attention.o_proj."),
)
# torch.hub layout -> transformers' checkpoint layout (transformers convert_dinov2_to_hf.py create_rename_keys).
_HUB_TOP = (
    ("cls_token", "embeddings.cls_token"), ("mask_token", "embeddings.mask_token"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("patch_embed.proj.", "embeddings.patch_embeddings.projection."), ("norm.", "layernorm."),
)
_HUB_BLOCK = (
    ("norm1.", "norm1."), ("norm2.", "norm2."), ("attn.proj.", "attention.output.dense."),
    ("ls1.gamma", "layer_scale1.lambda1"), ("ls2.gamma", "layer_scale2.lambda1"),
    ("mlp.fc1.", "mlp.fc1."), ("mlp.fc2.", "mlp.fc2."),
)
_QKV_NAMES = ("query", "key", "value")


@dataclass(frozen=True)
class DinoV2Prep:
    """dgm-eval's DINOv2 transform: bicubic resize to ``size`` (no crop), ``ToTensor``, ImageNet normalise.

    Attributes:
        size: ``(height, width)`` of the network input, ``(224, 224)`` in dgm-eval.
    """

    size: tuple[int, int] = (DGM_EVAL_IMAGE_SIZE, DGM_EVAL_IMAGE_SIZE)
    preset: ClassVar[str] = DGM_EVAL_PRESET

    def pil(self, image: Any) -> torch.Tensor:
        """Exact path: one PIL image of any size and mode (converted to RGB) -> float32 ``(3, *size)``."""
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        image = pil_to_rgb(image, "DinoV2Prep", convert_all=True)
        image = TF.resize(image, list(self.size), interpolation=InterpolationMode.BICUBIC)
        return TF.normalize(TF.to_tensor(image), list(IMAGENET_MEAN), list(IMAGENET_STD))

    def tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Tensor path: float ``(B, 3, H, W)`` on the 0-255 scale -> float32 ``(B, 3, *size)``; differentiable."""
        check_uint8_scale_batch(images, "DinoV2Prep")
        pixels = resize_like_pil(images.float(), self.size) / UINT8_MAX
        return normalize(pixels, IMAGENET_MEAN, IMAGENET_STD)


def hub_position_embeddings(position_embeddings: torch.Tensor, height: int, width: int,
                            patch_size: int) -> torch.Tensor:
    """Position embeddings for a ``height x width`` input, as the torch.hub DINOv2 computes them.

    Args:
        position_embeddings: ``(1, 1 + M*M, D)``, CLS position first, then an ``M x M`` grid.
        height, width: input size in pixels.
        patch_size: patch side in pixels.

    Returns:
        ``(1, 1 + (height // patch_size) * (width // patch_size), D)`` in the input dtype (resized in float32).
    """
    num_positions = position_embeddings.shape[1] - 1
    rows, cols = height // patch_size, width // patch_size
    if rows * cols == num_positions and height == width:
        return position_embeddings
    grid = math.isqrt(num_positions)
    if grid * grid != num_positions:
        raise ValueError(f"position embeddings hold {num_positions} patch positions, not a square grid")
    dim = position_embeddings.shape[-1]
    as_float = position_embeddings.float()
    patch_grid = as_float[:, 1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    scale = ((rows + HUB_INTERPOLATE_OFFSET) / grid, (cols + HUB_INTERPOLATE_OFFSET) / grid)
    patch_grid = F.interpolate(patch_grid, scale_factor=scale, mode="bicubic", antialias=False)
    patch_grid = patch_grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
    return torch.cat((as_float[:, :1], patch_grid), dim=1).to(position_embeddings.dtype)


class DinoV2Extractor(FeatureExtractor):
    """DINOv2 -> final-LayerNorm CLS token, float32 ``(B, hidden_size)``.

    Args:
        model: a ``transformers.Dinov2Model`` (frozen here).
        prep: the matching :class:`DinoV2Prep`.
        weights_sha256: sha256 of the weight file (stored with statistics).
        dtype: ``None``/``"fp32"`` (exact) or ``"bf16"``/``"fp16"`` (autocast; outputs stay float32).
    """

    name = DINOV2_EXTRACTOR_NAME

    def __init__(self, model: torch.nn.Module, prep: DinoV2Prep, weights_sha256: str = "", dtype: Any = None) -> None:
        super().__init__()
        self.model = model
        self.prep = prep
        self.feature_dim = int(model.config.hidden_size)
        self.weights_sha256 = weights_sha256
        self.autocast_dtype = parse_dtype(dtype)
        self.freeze()

    def forward(self, prepared: torch.Tensor) -> torch.Tensor:
        """Prepared ``(B, 3, *prep.size)`` (ImageNet-normalised) -> float32 ``(B, feature_dim)``.

        Tokens as DINOv2's ``prepare_tokens_with_masks`` (patch embedding, CLS token, hub-interpolated
        positions), then transformers' encoder and final LayerNorm; the CLS row is returned.
        """
        embeddings = self.model.embeddings
        device = embeddings.cls_token.device
        prepared = prepared.to(device=device, dtype=torch.float32)
        height, width = int(prepared.shape[-2]), int(prepared.shape[-1])
        with autocast_for(device, self.autocast_dtype):
            patches = embeddings.patch_embeddings(prepared)
            cls = embeddings.cls_token.expand(patches.shape[0], -1, -1).to(patches.dtype)
            tokens = torch.cat((cls, patches), dim=1)
            positions = hub_position_embeddings(embeddings.position_embeddings, height, width,
                                                int(self.model.config.patch_size))
            tokens = tokens + positions.to(tokens.dtype)
            hidden = self.model.encoder(tokens)[0]
            cls_out = self.model.layernorm(hidden[:, 0])
        return cls_out.float()


def _replace_infix(key: str, pairs: tuple[tuple[str, str], ...]) -> str:
    return next((key.replace(old, new, 1) for old, new in pairs if old in key), key)


def hub_to_hf_layout(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torch.hub DINOv2 keys (``blocks.N.attn.qkv.weight``, ...) -> transformers' checkpoint keys.

    The fused ``qkv`` projection is split into query/key/value thirds (transformers
    ``convert_dinov2_to_hf.py``). Keys with no counterpart (register tokens, SwiGLU ``mlp.w12``) are kept
    as they are, so that a strict load lists them.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("blocks.") and ".attn.qkv." in key:
            block, _, kind = key.split(".", 1)[1].partition(".attn.qkv.")
            for name, part in zip(_QKV_NAMES, value.chunk(3, dim=0)):
                out[f"encoder.layer.{block}.attention.attention.{name}.{kind}"] = part
        elif key.startswith("blocks."):
            block, _, rest = key.split(".", 1)[1].partition(".")
            out[f"encoder.layer.{block}.{_replace_infix(rest, _HUB_BLOCK)}"] = value
        else:
            out[next((new + key[len(old):] for old, new in _HUB_TOP if key.startswith(old)), key)] = value
    return out


def to_model_layout(state: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rename attention keys between transformers' checkpoint layout and the installed ``Dinov2Model``'s.

    transformers 5.x modules use ``attention.q_proj`` / ``o_proj`` while checkpoints (and 4.x modules) use
    ``attention.attention.query`` / ``attention.output.dense``; either side may be either.
    """
    uses_v5 = any(".attention.q_proj." in key for key in model.state_dict())
    pairs = _FILE_TO_V5 if uses_v5 else tuple((new, old) for old, new in _FILE_TO_V5)
    return {_replace_infix(key, pairs): value for key, value in state.items()}


def _is_hub_layout(state: Mapping[str, torch.Tensor]) -> bool:
    return "pos_embed" in state or any(key.startswith("blocks.") for key in state)


def _read_weights(path: Any, config: Any, what: str) -> tuple[Any, dict[str, torch.Tensor], str]:
    """``(architecture, state dict in transformers' checkpoint layout, sha256)`` from a folder or one file."""
    if path.is_dir():
        raw, state, sha256 = read_hf_folder(path, what)
        if raw.get("model_type") != "dinov2":
            raise ValueError(f"{what}: {path} holds a {raw.get('model_type')!r} model, not DINOv2 (config.json "
                             f"model_type must be 'dinov2'); pass a checkpoint such as {DINOV2_DEFAULT_WEIGHTS}")
        architecture = config if config is not None else raw
    else:
        state, sha256 = read_state_dict(path), file_sha256(path)
        architecture = config if config is not None else dict(DINOV2_VITL14_CONFIG)
    return architecture, (hub_to_hf_layout(state) if _is_hub_layout(state) else state), sha256


def _build_model(architecture: Any, what: str) -> torch.nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    config = architecture if isinstance(architecture, Dinov2Config) else Dinov2Config.from_dict(dict(architecture))
    if config.use_swiglu_ffn:
        raise ValueError(f"{what}: SwiGLU DINOv2 (ViT-g/14) is not supported; FD-DINOv2 uses ViT-L/14 "
                         f"({DINOV2_DEFAULT_WEIGHTS})")
    return Dinov2Model(config)


def load_dinov2_extractor(weights: Any = None, device: Any = None, dtype: Any = None,
                          config: Any = None) -> DinoV2Extractor:
    """Load FD-DINOv2's ViT-L/14 feature extractor.

    Args:
        weights: ``None`` (``hf:facebook/dinov2-large``), an ``hf:``/``ms:`` repo spec or local folder with
            ``config.json`` + safetensors (``Dinov2Model``), or one torch.hub checkpoint file (local path or
            URL, e.g. :data:`DINOV2_HUB_URL`; keys mapped by :func:`hub_to_hf_layout`).
        device: where the model lives (default CPU).
        dtype: ``None``/``"fp32"`` (exact) or ``"bf16"``/``"fp16"`` (autocast).
        config: ``Dinov2Config`` (or its kwargs) overriding the architecture; single files default to
            :data:`DINOV2_VITL14_CONFIG`.

    Returns:
        A frozen :class:`DinoV2Extractor` with ``prep = DinoV2Prep()`` (224 x 224).

    Raises:
        FileNotFoundError: the weights cannot be found or the folder lacks files.
        ValueError: not a DINOv2 checkpoint, or an unsupported (SwiGLU) one.
        rewardkit.weights.CheckpointMismatchError: keys or shapes do not match the architecture.
    """
    what = "FD-DINOv2 weights"
    path = resolve_weights(weights or DINOV2_DEFAULT_WEIGHTS, allow_patterns=HF_MODEL_PATTERNS, what=what)
    architecture, state, sha256 = _read_weights(path, config, what)
    model = _build_model(architecture, what)
    load_state_dict_strict(model, state, name=what, key_map=lambda found: to_model_layout(found, model),
                           hint=f"pass a DINOv2 checkpoint such as {DINOV2_DEFAULT_WEIGHTS} or {DINOV2_HUB_URL}")
    extractor = DinoV2Extractor(model.eval(), DinoV2Prep(), weights_sha256=sha256, dtype=dtype)
    return extractor.to(torch.device("cpu") if device is None else torch.device(device))
