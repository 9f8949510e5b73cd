"""Parity of the CLIP-family rewards with their reference implementations, on identical tiny random weights.

Each reference is the upstream computation run through the upstream library on the same files that
rewardkit loads (transformers ``CLIPModel`` + processor as PickScore's README does it, torchmetrics
``clip_score``, open_clip + HPSv2's letterbox transform, open_clip ``local-dir:`` models, the LAION MLP
on HF ViT features). Tolerances:

* exact (PIL) path vs reference on images of several sizes: ``1e-5`` absolute on scores whose
  magnitude is <= ~15 (float32 rounding of two identical computations in different op order);
* tensor path vs reference when no resize happens (input already at the model's resolution): same;
* tensor path vs exact path with resizing is an approximation (antialiased torch bicubic vs PIL
  bicubic): bounded in ``tests/test_preprocess.py`` and measured in ``docs/preprocessing_gap.md``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import rewardkit as rk
import rewardkit.testing as rkt
from rewardkit.image_io import pil_to_tensor

ATOL = 1e-5
PROMPTS = ["a photo of a cat", "a red car on a road", "a bowl of fruit", "mountains at dawn", "a cat", "an owl"]
# (width, height); the tiny models see 32x32. (44, 40) and (32, 35) leave a crop excess of 3 px, where
# HF's floor crop and torchvision's round crop differ by one pixel (reference/clip_family.md E12).
SIZES = [(64, 48), (50, 70), (33, 97), (32, 32), (44, 40), (32, 35)]


def _pil_images(sizes=SIZES, seed: int = 0) -> list[Image.Image]:
    images = []
    for i, (w, h) in enumerate(sizes):
        tensor = rkt.random_images(1, h, w, seed=seed + i)[0]
        array = (tensor.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        images.append(Image.fromarray(array, "RGB"))
    return images


def _features(output) -> torch.Tensor:
    # transformers 5.x returns BaseModelOutputWithPooling (projected features in pooler_output), 4.x a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# ------------------------------------------------------------------------------------------- PickScore
def _pickscore_reference(folder: str, images, prompts) -> torch.Tensor:
    """yuvalkirstain/PickScore README ``calc_probs`` scores, with the PIL CLIP processor (pairwise)."""
    from transformers import AutoProcessor, CLIPModel

    processor = AutoProcessor.from_pretrained(folder, backend="pil")
    model = CLIPModel.from_pretrained(folder).eval()
    with torch.no_grad():
        image_inputs = processor(images=images, padding=True, truncation=True, max_length=77, return_tensors="pt")
        text_inputs = processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_embs = _features(model.get_image_features(**image_inputs))
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = _features(model.get_text_features(**text_inputs))
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        scores = model.logit_scale.exp() * (text_embs @ image_embs.T)  # (prompts, images)
    return scores.diagonal()


def test_pickscore_exact_path_equals_upstream(tiny_root) -> None:
    kwargs = rkt.tiny_pickscore(tiny_root / "parity")
    reward = rk.load("pickscore", **kwargs)
    images = _pil_images()
    expected = _pickscore_reference(kwargs["weights"], images, PROMPTS)
    torch.testing.assert_close(reward.score_pil(images, PROMPTS), expected, rtol=0, atol=ATOL)


def test_pickscore_tensor_path_equals_upstream_without_resize(tiny_root) -> None:
    kwargs = rkt.tiny_pickscore(tiny_root / "parity")
    reward = rk.load("pickscore", **kwargs)
    images = _pil_images([(32, 32)] * 6, seed=10)
    expected = _pickscore_reference(kwargs["weights"], images, PROMPTS)
    pixels = torch.stack([pil_to_tensor(im) for im in images])
    torch.testing.assert_close(reward(pixels, PROMPTS), expected, rtol=0, atol=ATOL)


def test_pickscore_probabilities_are_softmax_over_images(tiny_reward) -> None:
    reward = tiny_reward("pickscore")
    images = rkt.random_images(3, 32, 32)
    probs = reward.probabilities(images, "a cat")
    torch.testing.assert_close(probs, torch.softmax(reward(images, "a cat"), 0))
    assert abs(probs.sum().item() - 1) < 1e-6


# ------------------------------------------------------------------------------------------ CLIP score
def test_clip_score_equals_torchmetrics(tiny_root) -> None:
    """torchmetrics ``clip_score`` (100 * max(cos, 0) per image) on the same HF model and processor.

    torchmetrics 1.9 calls ``get_image_features(...).norm`` and so breaks on transformers 5.x, whose
    ``get_*_features`` return a ModelOutput; the shim below returns the projected tensor as
    transformers 4.x did, so torchmetrics' own processing and formula run unchanged.
    """
    from torchmetrics.functional.multimodal import clip_score
    from transformers import CLIPModel, CLIPProcessor

    class FeatureTensorCLIP(CLIPModel):
        def get_image_features(self, *args, **kwargs):
            return _features(super().get_image_features(*args, **kwargs))

        def get_text_features(self, *args, **kwargs):
            return _features(super().get_text_features(*args, **kwargs))

    folder = rkt.tiny_clip_score(tiny_root / "parity")["weights"]
    model, processor = FeatureTensorCLIP.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    reward = rk.load("clip-score", weights=folder, scale=100)
    images = _pil_images([(32, 32)] * 6, seed=20)  # the model's resolution: both processors are exact here
    uint8 = [torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]
    with torch.no_grad():
        expected = torch.stack([clip_score(x, p, model_name_or_path=lambda: (model, processor)) for x, p in zip(uint8, PROMPTS)])
    ours = reward(torch.stack(uint8).float() / 255, PROMPTS)
    assert (expected == 0).any() and (expected > 0).any(), "the test must cover both sides of the clamp"
    torch.testing.assert_close(ours, expected.float(), rtol=0, atol=100 * ATOL)
    torch.testing.assert_close(reward.score_pil(images, PROMPTS), expected.float(), rtol=0, atol=100 * ATOL)


def test_clip_score_default_scale_is_hessel_w(tiny_root, tiny_reward) -> None:
    images = rkt.random_images(6, 32, 32)
    default = tiny_reward("clip-score")(images, PROMPTS)
    hundred = rk.load("clip-score", weights=rkt.tiny_clip_score(tiny_root / "parity")["weights"], scale=100)
    torch.testing.assert_close(default * 100 / 2.5, hundred(images, PROMPTS), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ HPS
def _hps_letterbox(image: Image.Image, size: int) -> torch.Tensor:
    """HPSv2 ``light_augmentation`` eval transform, written from tgxs002/HPSv2 866735e
    ``hpsv2/src/open_clip/transform.py`` (ToTensor -> ResizeMaxSize(bicubic tensor resize of the longest
    side, zero pad, left/top = pad // 2) -> Normalize(OpenAI mean/std))."""
    import torchvision.transforms.functional as TF

    from rewardkit.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    tensor = TF.to_tensor(image)
    height, width = tensor.shape[1:]
    scale = size / float(max(height, width))
    if scale != 1.0:
        new_size = tuple(round(dim * scale) for dim in (height, width))
        tensor = TF.resize(tensor, list(new_size), interpolation=TF.InterpolationMode.BICUBIC)
        pad_h, pad_w = size - new_size[0], size - new_size[1]
        tensor = TF.pad(tensor, padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return TF.normalize(tensor, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def _hps_reference(checkpoint_path: str, model_cfg: dict, images, prompts) -> torch.Tensor:
    """``hpsv2.score``: open_clip model, ``checkpoint['state_dict']``, letterbox, ``diag(img @ txt.T)``."""
    import open_clip

    model = open_clip.CLIP(**model_cfg).eval()
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["state_dict"])
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])
    size = model_cfg["vision_cfg"]["image_size"]
    with torch.no_grad():
        rows = []
        for image, prompt in zip(images, prompts):  # upstream scores one image at a time
            image_features = model.encode_image(_hps_letterbox(image, size)[None], normalize=True)
            text_features = model.encode_text(tokenizer([prompt]), normalize=True)
            rows.append(torch.diagonal(image_features @ text_features.T)[0])
    return torch.stack(rows)


def test_hpsv2_exact_and_tensor_paths_equal_upstream(tiny_root) -> None:
    kwargs = rkt.tiny_hpsv2(tiny_root / "parity")
    reward = rk.load("hpsv2", **kwargs)
    images = _pil_images()
    expected = _hps_reference(kwargs["weights"], kwargs["config"], images, PROMPTS)
    torch.testing.assert_close(reward.score_pil(images, PROMPTS), expected, rtol=0, atol=ATOL)
    # Upstream's letterbox already works on tensors, so the tensor path is the same computation.
    for image, prompt, value in zip(images, PROMPTS, expected):
        torch.testing.assert_close(reward(pil_to_tensor(image)[None], prompt)[0], value, rtol=0, atol=ATOL)


# ------------------------------------------------------------------------------------------ Aesthetic
def _aesthetic_reference(head_path: str, clip_folder: str, images) -> torch.Tensor:
    """improved-aesthetic-predictor ``simple_inference.py``: CLIP image features (clip.load preprocessing),
    numpy L2 normalisation, the MLP (``layers`` Sequential, no activations)."""
    import torchvision.transforms as T
    from transformers import CLIPModel

    from rewardkit.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    model = CLIPModel.from_pretrained(clip_folder).eval()
    size = model.config.vision_config.image_size
    transform = T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
        T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    ])
    state = torch.load(head_path, map_location="cpu", weights_only=True)
    dims = [state[f"layers.{i}.weight"].shape for i in (0, 2, 4, 6, 7)]
    mlp = torch.nn.Module()
    mlp.layers = torch.nn.Sequential(
        torch.nn.Linear(dims[0][1], dims[0][0]), torch.nn.Dropout(0.2), torch.nn.Linear(dims[1][1], dims[1][0]),
        torch.nn.Dropout(0.2), torch.nn.Linear(dims[2][1], dims[2][0]), torch.nn.Dropout(0.1),
        torch.nn.Linear(dims[3][1], dims[3][0]), torch.nn.Linear(dims[4][1], dims[4][0]),
    )
    mlp.load_state_dict(state)
    mlp.eval()
    with torch.no_grad():
        features = _features(model.get_image_features(pixel_values=torch.stack([transform(im) for im in images])))
        array = features.numpy()
        norms = np.linalg.norm(array, 2, axis=-1, keepdims=True)
        norms[norms == 0] = 1
        return mlp.layers(torch.from_numpy(array / norms).float()).squeeze(-1)


def test_aesthetic_exact_path_equals_upstream(tiny_root) -> None:
    kwargs = rkt.tiny_aesthetic(tiny_root / "parity")
    reward = rk.load("aesthetic", **kwargs)
    images = _pil_images()
    expected = _aesthetic_reference(kwargs["weights"], kwargs["clip_weights"], images)
    assert expected.std() > 0
    torch.testing.assert_close(reward.score_pil(images), expected, rtol=1e-4, atol=ATOL)


# -------------------------------------------------------------------------------------------- BioCLIP
def test_bioclip_equals_open_clip_local_dir(tiny_root) -> None:
    """open_clip ``create_model_and_transforms('local-dir:...')`` + ``get_tokenizer``, the hub-folder flow."""
    import open_clip

    folder = rkt.tiny_bioclip(tiny_root / "parity")["weights"]
    model, _, preprocess_val = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    images = _pil_images()
    with torch.no_grad():
        image_features = F.normalize(model.encode_image(torch.stack([preprocess_val(im) for im in images])), dim=-1)
        text_features = F.normalize(model.encode_text(tokenizer(PROMPTS)), dim=-1)
        expected = model.logit_scale.exp() * (image_features * text_features).sum(-1)
    reward = rk.load("bioclip", weights=folder)
    torch.testing.assert_close(reward.score_pil(images, PROMPTS), expected, rtol=0, atol=ATOL)


# --------------------------------------------------------------------------------- shared image tower
def test_aesthetic_shares_the_image_tower_with_clip_score(tiny_root) -> None:
    kwargs = rkt.tiny_aesthetic(tiny_root / "shared")
    clip_score = rk.load("clip-score", weights=kwargs["clip_weights"])
    aesthetic = rk.load("aesthetic", **kwargs)
    assert aesthetic.towers is clip_score.towers


def test_aesthetic_and_bioclip_tensor_paths_equal_upstream_without_resize(tiny_root) -> None:
    images = _pil_images([(32, 32)] * 6, seed=30)
    pixels = torch.stack([pil_to_tensor(im) for im in images])
    kwargs = rkt.tiny_aesthetic(tiny_root / "parity")
    expected = _aesthetic_reference(kwargs["weights"], kwargs["clip_weights"], images)
    torch.testing.assert_close(rk.load("aesthetic", **kwargs)(pixels), expected, rtol=1e-4, atol=ATOL)
    bioclip = rk.load("bioclip", **rkt.tiny_bioclip(tiny_root / "parity"))
    torch.testing.assert_close(bioclip(pixels, PROMPTS), bioclip.score_pil(images, PROMPTS), rtol=0, atol=ATOL)


def test_clip_score_accepts_open_clip_checkpoints(tiny_root) -> None:
    """Any open_clip model: clip-score on an open_clip hub folder = 100 * max(open_clip cosine, 0)."""
    folder = rkt.tiny_bioclip(tiny_root / "parity")["weights"]
    bioclip = rk.load("bioclip", weights=folder)
    clip_score = rk.load("clip-score", weights=folder, scale=100)
    images = _pil_images()
    cosine = bioclip.evaluate_pil(images, PROMPTS).details["cosine"]
    torch.testing.assert_close(clip_score.score_pil(images, PROMPTS), 100 * cosine.clamp_min(0), rtol=0, atol=100 * ATOL)
