"""CMMD and FD-DINOv2 feature extractors against their references, reproduced from the upstream source.

Neither reference installs offline: google-research ``cmmd`` is a folder of the google-research monorepo
(JAX + scenic + TensorFlow, no package) and layer6ai-labs ``dgm-eval`` is not on PyPI and loads DINOv2
through ``torch.hub`` (a download). So each reference is rebuilt here from its source, independently of
rewardkit's code, on the upstream model classes:

* CMMD (``cmmd/io_util.py`` + ``cmmd/embedding.py``): PIL floor-offset square crop, ``resize((S, S),
  BICUBIC)``, ``np.float32 / 255``, ``(x - mean) / std`` in numpy, then transformers
  ``CLIPModel``/``CLIPVisionModelWithProjection`` image embeddings, L2-normalised.
* FD-DINOv2 (``dgm_eval/models/dinov2.py``): torchvision ``Compose([Resize((S, S), BICUBIC), ToTensor(),
  Normalize(ImageNet)])`` on PIL, then ``Dinov2Model(...).pooler_output`` (grid that needs no resize),
  and, for the torch.hub layout and the 518 -> 224 position-grid resize, a plain-torch transcription of
  facebookresearch/dinov2 ``DinoVisionTransformer.forward`` reading the hub keys directly.

Tolerances: model outputs 1e-6 absolute (same class, same input; 1e-5 for the transcription, whose
attention is computed in another order); preprocessing bit-exact on the exact path; tensor path within
``GAP_LEVELS`` uint8 levels of the exact path (Pillow rounds each pass to 8 bits, the tensor path does not).
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rewardkit.metrics.cmmd_features import CMMDPrep, load_cmmd_extractor
from rewardkit.metrics.dinov2_features import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DinoV2Prep,
    load_dinov2_extractor,
)
from rewardkit.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from rewardkit.testing import random_images
from rewardkit.testing.dino import (
    tiny_cmmd,
    tiny_dinov2_config,
    tiny_fd_dinov2,
    write_hf_clip_vision_folder,
    write_hf_dinov2_folder,
)
from rewardkit.weights import CheckpointMismatchError, file_sha256

SIZES = [(50, 70), (73, 41), (42, 42), (300, 200), (224, 224), (336, 500)]  # (height, width)
MODEL_ATOL = 1e-6
HUB_TRANSCRIPTION_ATOL = 1e-5
GAP_LEVELS = 1.5  # max |tensor - exact| in uint8 levels; measured <= 1.12 (Pillow's 8-bit rounding per pass)
FEATURE_GAP = 0.01  # max |tensor - exact| of tiny-model features; measured <= 3.2e-3


def _uint8_images(seed: int = 0) -> list[np.ndarray]:
    """Smooth and white-noise HWC uint8 images of every size in SIZES."""
    rng = np.random.default_rng(seed)
    out = []
    for index, (height, width) in enumerate(SIZES):
        if index % 2:
            out.append(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        else:
            smooth = random_images(1, height, width, seed=seed + index)[0].permute(1, 2, 0).numpy()
            out.append(np.round(smooth * 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def pil_images() -> list[Image.Image]:
    return [Image.fromarray(array) for array in _uint8_images()]


@pytest.fixture(scope="module")
def cmmd_kwargs(tiny_root):
    return tiny_cmmd(tiny_root / "cmmd")


@pytest.fixture(scope="module")
def dinov2_kwargs(tiny_root):
    return tiny_fd_dinov2(tiny_root / "fd-dinov2")


# ----------------------------------------------------------------------------------------- references
def _cmmd_reference_pixels(image: Image.Image, size: int) -> torch.Tensor:
    width, height = image.size
    side = min(width, height)
    top, left = (height - side) // 2, (width - side) // 2
    cropped = image.crop((left, top, left + side, top + side)).resize((size, size), resample=Image.BICUBIC)
    array = np.asarray(cropped).astype(np.float32) / 255.0
    array = (array - np.asarray(OPENAI_CLIP_MEAN, np.float32)) / np.asarray(OPENAI_CLIP_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _dgm_eval_transform(size: int):
    import torchvision.transforms as TF

    return TF.Compose([TF.Resize((size, size), TF.InterpolationMode.BICUBIC), TF.ToTensor(),
                       TF.Normalize(np.array(IMAGENET_MEAN), np.array(IMAGENET_STD))])


def _hub_positions(pos_embed: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    count = pos_embed.shape[1] - 1
    if count == (height // patch) * (width // patch) and height == width:
        return pos_embed
    grid, dim = int(math.sqrt(count)), pos_embed.shape[-1]
    h0, w0 = height // patch + 0.1, width // patch + 0.1
    grid_embed = F.interpolate(pos_embed[:, 1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2),
                               scale_factor=(float(h0 / grid), float(w0 / grid)), mode="bicubic")
    return torch.cat((pos_embed[:, :1], grid_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)


def _hub_dinov2_forward(sd: dict, x: torch.Tensor, heads: int, eps: float = 1e-6) -> torch.Tensor:
    """facebookresearch/dinov2 DinoVisionTransformer.forward (eval, no xformers) on hub keys -> CLS."""
    patch = sd["patch_embed.proj.weight"].shape[-1]
    tokens = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    tokens = torch.cat((sd["cls_token"].expand(x.shape[0], -1, -1), tokens.flatten(2).transpose(1, 2)), dim=1)
    tokens = tokens + _hub_positions(sd["pos_embed"], x.shape[2], x.shape[3], patch)
    batch, count, dim = tokens.shape
    depth = 1 + max(int(key.split(".")[1]) for key in sd if key.startswith("blocks."))
    for index in range(depth):
        p = f"blocks.{index}."
        h = F.layer_norm(tokens, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
        qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(batch, count, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attn = ((q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(batch, count, dim)
        tokens = tokens + sd[p + "ls1.gamma"] * F.linear(out, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(tokens, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
        h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        tokens = tokens + sd[p + "ls2.gamma"] * h
    return F.layer_norm(tokens, (dim,), sd["norm.weight"], sd["norm.bias"], eps)[:, 0]


# ----------------------------------------------------------------------------------------------- CMMD
def test_cmmd_exact_path_equals_reference(cmmd_kwargs, pil_images, tiny_root):
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    extractor = load_cmmd_extractor(**cmmd_kwargs)
    size = extractor.prep.size[0]
    reference_pixels = torch.stack([_cmmd_reference_pixels(image, size) for image in pil_images])
    pixels = torch.stack([extractor.prep.pil(image) for image in pil_images])
    assert pixels.dtype == torch.float32 and torch.equal(pixels, reference_pixels)
    with torch.no_grad():
        clip = CLIPModel.from_pretrained(cmmd_kwargs["weights"]).eval()
        reference = F.normalize(clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output), dim=-1)
        features = extractor(pixels)
    assert features.shape == (len(pil_images), extractor.feature_dim) and features.dtype == torch.float32
    assert (features - reference).abs().max() <= MODEL_ATOL
    assert features.std(dim=0).min() > 1e-3  # non-degenerate: every image embeds differently
    vision_folder = write_hf_clip_vision_folder(tiny_root / "cmmd-vision" / "clip-vision")
    vision = load_cmmd_extractor(weights=vision_folder)
    with torch.no_grad():
        vision_reference = CLIPVisionModelWithProjection.from_pretrained(str(vision_folder)).eval()
        expected = F.normalize(vision_reference(pixel_values=pixels).image_embeds, dim=-1)
        assert (vision(pixels) - expected).abs().max() <= MODEL_ATOL
        assert (vision(pixels) - features).abs().max() <= MODEL_ATOL  # the same weights, two layouts


def test_cmmd_grayscale_is_tiled_and_other_modes_refused(pil_images):
    prep = CMMDPrep(size=(42, 42))
    gray = pil_images[0].convert("L")
    tiled = Image.fromarray(np.repeat(np.asarray(gray)[..., None], 3, axis=2))
    assert torch.equal(prep.pil(gray), prep.pil(tiled))
    with pytest.raises(ValueError, match="convert"):
        prep.pil(pil_images[0].convert("RGBA"))
    with pytest.raises(TypeError, match="PIL image"):
        prep.pil(np.zeros((4, 4, 3), np.uint8))


# ------------------------------------------------------------------------------------------ FD-DINOv2
def test_dinov2_exact_path_equals_dgm_eval_and_pooler_output(pil_images, tiny_root):
    from transformers import Dinov2Model

    folder = write_hf_dinov2_folder(tiny_root / "fd-dinov2-224" / "dinov2", image_size=224)  # no grid resize
    extractor = load_dinov2_extractor(weights=folder)
    transform = _dgm_eval_transform(224)
    reference_pixels = torch.stack([transform(image) for image in pil_images])
    pixels = torch.stack([extractor.prep.pil(image) for image in pil_images])
    assert pixels.dtype == torch.float32 and torch.equal(pixels, reference_pixels)
    with torch.no_grad():
        model = Dinov2Model.from_pretrained(str(folder)).eval()
        output = model(pixel_values=pixels)
        features = extractor(pixels)
    assert torch.equal(output.pooler_output, output.last_hidden_state[:, 0])  # pooler = final-LN CLS token
    assert features.shape == (len(pil_images), extractor.feature_dim) and features.dtype == torch.float32
    assert (features - output.pooler_output).abs().max() <= MODEL_ATOL
    assert features.std(dim=0).min() > 1e-3


def test_dinov2_torch_hub_layout_and_grid_resize_match_hub_forward(dinov2_kwargs, tiny_root, pil_images):
    hub_kwargs = tiny_fd_dinov2(tiny_root / "fd-dinov2", layout="torch-hub")
    hub_state = torch.load(hub_kwargs["weights"], weights_only=True)
    assert "blocks.0.attn.qkv.weight" in hub_state and "pos_embed" in hub_state
    from_hub = load_dinov2_extractor(**hub_kwargs)
    from_hf = load_dinov2_extractor(**dinov2_kwargs)
    pixels = torch.stack([from_hub.prep.pil(image) for image in pil_images])
    with torch.no_grad():
        reference = _hub_dinov2_forward(hub_state, pixels, heads=tiny_dinov2_config()["num_attention_heads"])
        features = from_hub(pixels)
        assert torch.equal(features, from_hf(pixels))  # the same weights through either layout
    assert (features - reference).abs().max() <= HUB_TRANSCRIPTION_ATOL
    assert hub_state["pos_embed"].shape[1] - 1 != (224 // 14) ** 2  # the grid was resized


def test_dinov2_missing_hub_key_is_listed(tiny_root, tmp_path):
    kwargs = tiny_fd_dinov2(tiny_root / "fd-dinov2", layout="torch-hub")
    state = torch.load(kwargs["weights"], weights_only=True)
    del state["blocks.1.ls2.gamma"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointMismatchError, match="layer_scale2"):
        load_dinov2_extractor(weights=tmp_path / "broken.pth", config=kwargs["config"])
    wider = {**kwargs["config"], "hidden_size": 2 * kwargs["config"]["hidden_size"]}
    with pytest.raises(CheckpointMismatchError, match="config="):  # shape conflicts point to config=
        load_dinov2_extractor(weights=kwargs["weights"], config=wider)


def _vitl14_hub_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of torch.hub dinov2_vitl14 (facebookresearch/dinov2 vision_transformer.py, vit_large,
    img_size 518, patch 14, init_values 1.0, ffn "mlp", block_chunks 0, no register tokens)."""
    dim, grid, hidden = 1024, 518 // 14, 4 * 1024
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + grid * grid, dim), "mask_token": (1, dim),
              "patch_embed.proj.weight": (dim, 3, 14, 14), "patch_embed.proj.bias": (dim,),
              "norm.weight": (dim,), "norm.bias": (dim,)}
    for index in range(24):
        p = f"blocks.{index}."
        shapes.update({p + "attn.qkv.weight": (3 * dim, dim), p + "attn.qkv.bias": (3 * dim,),
                       p + "attn.proj.weight": (dim, dim), p + "mlp.fc1.weight": (hidden, dim),
                       p + "mlp.fc1.bias": (hidden,), p + "mlp.fc2.weight": (dim, hidden)})
        for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.proj.bias",
                     "mlp.fc2.bias", "ls1.gamma", "ls2.gamma"):
            shapes[p + name] = (dim,)
    return shapes


def test_default_vitl14_architecture_accepts_the_hub_checkpoint_structure():
    from transformers import Dinov2Config, Dinov2Model

    from rewardkit.metrics.dinov2_features import DINOV2_VITL14_CONFIG, hub_to_hf_layout, to_model_layout

    with torch.device("meta"):  # structure only: no 300M-parameter allocation
        model = Dinov2Model(Dinov2Config(**DINOV2_VITL14_CONFIG))
        hub_state = {key: torch.empty(shape) for key, shape in _vitl14_hub_shapes().items()}
    mapped = to_model_layout(hub_to_hf_layout(hub_state), model)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert {key: tuple(value.shape) for key, value in mapped.items()} == expected


# ------------------------------------------------------------------------------ tensor path vs exact
@pytest.mark.parametrize("prep", [CMMDPrep(), DinoV2Prep()], ids=["cmmd-336", "dgm-eval-224"])
def test_tensor_path_within_stated_gap_of_exact_path(prep):
    std = torch.tensor(OPENAI_CLIP_STD if isinstance(prep, CMMDPrep) else IMAGENET_STD).view(3, 1, 1)
    for array in _uint8_images(seed=1):
        exact = prep.pil(Image.fromarray(array))
        batch = torch.from_numpy(array).permute(2, 0, 1)[None].float()
        fast = prep.tensor(batch)[0]
        assert fast.shape == exact.shape and fast.dtype == torch.float32
        levels = ((fast - exact).abs() * std * 255).max().item()
        assert levels <= GAP_LEVELS, f"{tuple(array.shape)}: {levels:.3f} uint8 levels"


def test_tensor_path_features_and_gradient(cmmd_kwargs, dinov2_kwargs, pil_images):
    for extractor in (load_cmmd_extractor(**cmmd_kwargs), load_dinov2_extractor(**dinov2_kwargs)):
        for array in _uint8_images(seed=2)[:3]:
            exact = extractor(extractor.prep.pil(Image.fromarray(array))[None])
            images = torch.from_numpy(array).permute(2, 0, 1)[None].float().requires_grad_(True)
            fast = extractor(extractor.prep.tensor(images))  # under the caller's grad mode
            assert (fast - exact).abs().max() <= FEATURE_GAP
            fast.sum().backward()
            assert images.grad is not None and images.grad.abs().sum() > 0


# --------------------------------------------------------------------------------- contract details
@pytest.mark.filterwarnings("ignore:bf16 autocast on this CPU:RuntimeWarning")  # slow-CPU notice only
def test_identity_eval_mode_sha_and_batch_independence(cmmd_kwargs, dinov2_kwargs, pil_images):
    cases = [(load_cmmd_extractor(**cmmd_kwargs), "clip-vit-l-14-336", "cmmd", "42x42"),
             (load_dinov2_extractor(**dinov2_kwargs), "dinov2-vit-l-14", "dgm-eval", "224x224")]
    for extractor, name, preset, resolution, in cases:
        weights_file = f"{cmmd_kwargs['weights'] if preset == 'cmmd' else dinov2_kwargs['weights']}/model.safetensors"
        assert extractor.identity() == {"extractor": name, "preset": preset, "resolution": resolution,
                                        "weights_sha256": file_sha256(weights_file)}
        extractor.train()
        assert not any(module.training for module in extractor.modules())
        assert not any(param.requires_grad for param in extractor.parameters())
        assert pickle.loads(pickle.dumps(extractor.prep)) == extractor.prep
        pixels = torch.stack([extractor.prep.pil(image) for image in pil_images[:3]])
        with torch.no_grad():
            together = extractor(pixels)
            alone = torch.cat([extractor(pixels[i : i + 1]) for i in range(3)])
            fast = type(extractor)(extractor.model, extractor.prep, dtype="bf16")(pixels)
        assert (together - alone).abs().max() <= MODEL_ATOL * 10
        assert fast.dtype == torch.float32 and F.cosine_similarity(fast, together).min() > 0.99


def test_wrong_checkpoints_raise_with_fix(tmp_path, cmmd_kwargs, dinov2_kwargs):
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                         intermediate_size=16)).save_pretrained(str(bert))
    with pytest.raises(ValueError, match="'bert' model, not CLIP"):
        load_cmmd_extractor(weights=bert)
    with pytest.raises(ValueError, match="'bert' model, not DINOv2"):
        load_dinov2_extractor(weights=bert)
    with pytest.raises(ValueError, match="not DINOv2"):
        load_dinov2_extractor(**cmmd_kwargs)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cmmd_extractor(weights=tmp_path / "missing")
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text('{"model_type": "clip"}')
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_cmmd_extractor(weights=tmp_path / "config-only")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_cmmd_extractor(weights=tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_cmmd_extractor(weights=f"{dinov2_kwargs['weights']}/model.safetensors")
