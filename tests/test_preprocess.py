"""Tests for rewardkit.preprocess: the exact path against the real upstream pipelines, the tensor path against
the exact path, and the tensor helpers against torchvision / transformers semantics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from rewardkit.preprocess import (
    HF_CLIP,
    HPSV2,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    TORCHVISION_CLIP,
    PreprocessSpec,
    center_crop,
    normalize,
    pad_to_square,
    preprocess,
    preprocess_pil,
    resize,
    resized_shape,
)

EXACT_ATOL = 1e-6
# Tensor-vs-PIL bound (shortest-crop with a resize). Measured by benchmarks/measure_preprocessing_gap.py
# (docs/preprocessing_gap.md), 512..1216 px inputs: smooth images max |delta| 0.0154 normalised (0.0040 in
# [0, 1], about 1 uint8 level), mean 0.0041 (0.0011); noise images max 0.0151, mean 0.0041 thanks to the
# emulated Pillow intermediate clipping (a single unclipped pass reaches 0.0171 in [0, 1] = 0.065 normalised).
# Bounds give about 1.5x margin.
GAP_MAX_NORMALISED = 0.025
GAP_MEAN_NORMALISED = 0.006
# (H, W): non-square SDXL-style sizes, a size that hits the crop-rounding case, tiny and already-S inputs.
SIZES = [(832, 1216), (1216, 832), (512, 768), (229, 227), (333, 1000), (224, 300), (300, 224), (224, 224)]


def noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def smooth_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """Gradients + a sine + bicubic-upsampled low-frequency noise: a crude stand-in for a natural image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx + 3 * yy)], axis=-1)
    low = (rng.random((height // 32 + 2, width // 32 + 2, 3)) * 255).astype(np.uint8)
    low = np.asarray(Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC)) / 255.0
    return Image.fromarray(np.clip((0.6 * base + 0.4 * low) * 255, 0, 255).round().astype(np.uint8))


def torchvision_clip_reference(size: int, interpolation=InterpolationMode.BICUBIC) -> T.Compose:
    # OpenAI clip.load `_transform` / ImageReward: Resize(int) -> CenterCrop -> ToTensor -> Normalize.
    return T.Compose(
        [T.Resize(size, interpolation=interpolation), T.CenterCrop(size), T.ToTensor(),
         T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)]
    )


def hpsv2_reference(image: Image.Image, size: int) -> torch.Tensor:
    """HPSv2 eval transform, written from hpsv2 1.2.0 (tgxs002/HPSv2) hpsv2/src/open_clip/transform.py:
    image_transform(is_train=False, resize_longest_max=True) = _convert_to_rgb_or_rgba -> ToTensor ->
    ResizeMaxSize(size, BICUBIC, fill=0) -> MaskAwareNormalize(OpenAI mean/std), for an RGB image."""
    tensor = TF.to_tensor(image)
    height, width = tensor.shape[1:]
    scale = size / float(max(height, width))
    if scale != 1.0:
        new_h, new_w = round(height * scale), round(width * scale)
        tensor = TF.resize(tensor, [new_h, new_w], InterpolationMode.BICUBIC)  # torchvision default antialias
        pad_h, pad_w = size - new_h, size - new_w
        tensor = TF.pad(tensor, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return TF.normalize(tensor, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------- resized_shape


@pytest.mark.parametrize("hw", SIZES + [(1080, 1920), (1000, 999), (7, 5000)])
def test_resized_shape_matches_torchvision_and_hf(hw):
    from torchvision.transforms.functional import _compute_resized_output_size
    from transformers.image_transforms import get_resize_output_image_size

    height, width = hw
    for size in (224, 336):
        spec = PreprocessSpec(size=size)
        assert list(resized_shape(height, width, spec)) == _compute_resized_output_size((height, width), [size])
        dummy = np.zeros((3, height, width), dtype=np.uint8)
        hf = get_resize_output_image_size(dummy, size=size, default_to_square=False, input_data_format="channels_first")
        assert tuple(resized_shape(height, width, spec)) == tuple(hf)


@pytest.mark.parametrize("hw", [(832, 1216), (1216, 832), (1000, 333), (224, 100), (100, 224), (225, 223)])
def test_resized_shape_longest_pad(hw):
    height, width = hw
    scale = 224 / float(max(height, width))
    expected = (height, width) if scale == 1.0 else (round(height * scale), round(width * scale))
    assert resized_shape(height, width, HPSV2) == expected


# ---------------------------------------------------------------- exact path vs upstream


def test_exact_torchvision_backend_matches_torchvision_and_open_clip():
    import open_clip

    images = [noise_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    ours = preprocess_pil(images, TORCHVISION_CLIP)
    assert ours.shape == (len(images), 3, 224, 224) and ours.dtype == torch.float32
    reference = torch.stack([torchvision_clip_reference(224)(im) for im in images])
    open_clip_eval = open_clip.image_transform(224, is_train=False, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    assert max_abs(ours, reference) <= EXACT_ATOL
    assert max_abs(ours, torch.stack([open_clip_eval(im) for im in images])) <= EXACT_ATOL


@pytest.mark.parametrize("size,interpolation", [(336, "bicubic"), (224, "bilinear")])
def test_exact_torchvision_backend_other_size_and_kernel(size, interpolation):
    spec = PreprocessSpec(size=size, interpolation=interpolation)
    mode = InterpolationMode.BICUBIC if interpolation == "bicubic" else InterpolationMode.BILINEAR
    images = [noise_image(832, 1216, seed=3), smooth_image(700, 500)]
    reference = torch.stack([torchvision_clip_reference(size, mode)(im) for im in images])
    assert max_abs(preprocess_pil(images, spec), reference) <= EXACT_ATOL


@pytest.mark.parametrize("size,interpolation", [(224, "bicubic"), (336, "bicubic"), (224, "bilinear")])
def test_exact_hf_backend_matches_clip_image_processor_pil(size, interpolation):
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        resample=3 if interpolation == "bicubic" else 2,
    )
    assert processor.backend == "pil"
    images = [noise_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    reference = processor(images=images, return_tensors="pt")["pixel_values"]
    spec = PreprocessSpec(size=size, crop_rounding="floor", pil_backend="hf", interpolation=interpolation)
    assert max_abs(preprocess_pil(images, spec), reference) <= EXACT_ATOL
    assert HF_CLIP == PreprocessSpec(crop_rounding="floor", pil_backend="hf")


@pytest.mark.parametrize("hw", [(832, 1216), (1216, 832), (1000, 333), (223, 225), (224, 100), (100, 224), (64, 48)])
def test_longest_pad_exact_and_tensor_paths_match_hpsv2(hw):
    image = noise_image(*hw)
    reference = hpsv2_reference(image, 224)[None]
    assert max_abs(preprocess_pil([image], HPSV2), reference) <= EXACT_ATOL
    assert max_abs(preprocess(TF.to_tensor(image)[None], HPSV2), reference) <= EXACT_ATOL
    if max(hw) == 224:
        assert reference.shape[-2:] == hw  # upstream leaves it unpadded and non-square


def test_spec_rejects_unknown_choices():
    with pytest.raises(ValueError, match="crop_rounding"):
        PreprocessSpec(crop_rounding="ceil")
    with pytest.raises(ValueError, match="mode"):
        PreprocessSpec(mode="squash")
    with pytest.raises(ValueError, match="size"):
        PreprocessSpec(size=0)


def test_preprocess_pil_errors():
    with pytest.raises(ValueError, match="RGB"):
        preprocess_pil([noise_image(50, 60).convert("RGBA")], TORCHVISION_CLIP)
    with pytest.raises(ValueError, match="one at a time"):
        preprocess_pil([noise_image(224, 100), noise_image(100, 224)], HPSV2)
    with pytest.raises(ValueError, match="empty"):
        preprocess_pil([], TORCHVISION_CLIP)


# ---------------------------------------------------------------- tensor path vs exact path


@pytest.mark.parametrize("spec", [TORCHVISION_CLIP, HF_CLIP], ids=["torchvision-round", "hf-floor"])
@pytest.mark.parametrize("hw", [(224, 224), (224, 331), (331, 224)])
def test_tensor_path_equals_exact_path_without_resize(spec, hw):
    image = noise_image(*hw)
    assert max_abs(preprocess(TF.to_tensor(image)[None], spec), preprocess_pil([image], spec)) <= EXACT_ATOL


@pytest.mark.parametrize("spec", [TORCHVISION_CLIP, HF_CLIP], ids=["torchvision-round", "hf-floor"])
@pytest.mark.parametrize("hw", [(832, 1216), (1216, 832), (512, 768), (1024, 1024)])
def test_tensor_path_gap_on_smooth_images_is_bounded(spec, hw):
    image = smooth_image(*hw, seed=1)
    delta = (preprocess(TF.to_tensor(image)[None], spec) - preprocess_pil([image], spec)).abs()
    assert delta.max().item() <= GAP_MAX_NORMALISED
    assert delta.mean().item() <= GAP_MEAN_NORMALISED


@pytest.mark.parametrize("hw", [(768, 512), (512, 768), (640, 1152)])
def test_tensor_path_gap_on_noise_is_bounded_by_emulated_clipping(hw):
    image = noise_image(*hw, seed=2)
    delta = (preprocess(TF.to_tensor(image)[None], TORCHVISION_CLIP) - preprocess_pil([image], TORCHVISION_CLIP)).abs()
    assert delta.max().item() <= GAP_MAX_NORMALISED
    assert delta.mean().item() <= GAP_MEAN_NORMALISED


def test_crop_rounding_differs_exactly_when_excess_is_3_mod_4():
    for excess in range(0, 400):
        x = torch.arange(224 + excess, dtype=torch.float32).view(1, 1, 1, -1).expand(1, 1, 224, -1)
        differs = not torch.equal(center_crop(x, 224, rounding="floor"), center_crop(x, 224, rounding="round"))
        assert differs == (excess % 4 == 3), excess
    # 832x1216 resizes to 224x327 (excess 103 = 3 mod 4): the two upstream crops see different pixels.
    assert resized_shape(832, 1216, TORCHVISION_CLIP) == (224, 327)
    floor_spec, round_spec = PreprocessSpec(crop_rounding="floor"), PreprocessSpec(crop_rounding="round")
    image = noise_image(832, 1216)
    assert max_abs(preprocess_pil([image], floor_spec), preprocess_pil([image], round_spec)) > 1.0
    for hw in [(832, 1216), (1216, 832), (640, 1152)]:  # excess 103, 103, 179
        tensor = TF.to_tensor(noise_image(*hw))[None]
        assert max_abs(preprocess(tensor, floor_spec), preprocess(tensor, round_spec)) > 1.0
    for hw in [(1024, 1024), (768, 1344), (576, 1024), (512, 768)]:  # excess 0, 168, 174, 112
        image = noise_image(*hw)
        assert torch.equal(preprocess_pil([image], floor_spec), preprocess_pil([image], round_spec))
        tensor = TF.to_tensor(image)[None]
        assert torch.equal(preprocess(tensor, floor_spec), preprocess(tensor, round_spec))


# ---------------------------------------------------------------- tensor helpers


@pytest.mark.parametrize("hw", [(100, 150), (150, 100), (5, 9), (224, 180), (180, 300), (223, 221)])
def test_center_crop_round_matches_torchvision_including_padding(hw):
    x = torch.rand(2, 3, *hw) + 0.5  # nonzero so the zero padding is visible
    assert torch.equal(center_crop(x, 224, rounding="round"), TF.center_crop(x, [224, 224]))


@pytest.mark.parametrize("hw", [(100, 150), (150, 100), (5, 9), (224, 180), (180, 300), (223, 221)])
def test_center_crop_floor_matches_transformers_including_padding(hw):
    from transformers.image_transforms import center_crop as hf_center_crop

    x = torch.rand(3, *hw) + 0.5
    reference = hf_center_crop(x.numpy(), (224, 224), input_data_format="channels_first")
    assert torch.equal(center_crop(x, 224, rounding="floor"), torch.from_numpy(reference))


def test_pad_to_square_and_normalize():
    x = torch.rand(1, 3, 150, 223)
    padded = pad_to_square(x, 224)
    assert padded.shape == (1, 3, 224, 224)
    assert torch.equal(padded[..., 37:187, 0:223], x)  # pad_h = 74 -> 37 top; pad_w = 1 -> 0 left, 1 right
    assert padded[..., :37, :].abs().sum() == 0 and padded[..., :, 223:].abs().sum() == 0
    assert torch.equal(padded, TF.pad(x, [0, 37, 1, 37], fill=0))
    with pytest.raises(ValueError, match="larger"):
        pad_to_square(torch.rand(1, 3, 225, 10), 224)
    expected = TF.normalize(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    assert torch.equal(normalize(x, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), expected)


def test_resize_matches_torchvision_tensor_resize_and_is_noop_at_size():
    x = torch.rand(2, 3, 97, 131)
    expected = TF.resize(x, [40, 57], InterpolationMode.BICUBIC, antialias=True)
    assert torch.equal(resize(x, (40, 57)), expected)
    assert resize(x, (97, 131)) is x


# ---------------------------------------------------------------- shapes, autograd, dtypes


@pytest.mark.parametrize(
    "spec,hw,expected",
    [(TORCHVISION_CLIP, (96, 160), (224, 224)), (HF_CLIP, (300, 200), (224, 224)),
     (PreprocessSpec(size=64), (80, 120), (64, 64)), (HPSV2, (96, 160), (224, 224)),
     (HPSV2, (224, 100), (224, 100)), (HPSV2, (300, 300), (224, 224))],
)
def test_output_shapes(spec, hw, expected):
    out = preprocess(torch.rand(3, 3, *hw), spec)
    assert out.shape == (3, 3, *expected) and out.dtype == torch.float32


@pytest.mark.parametrize(
    "spec", [TORCHVISION_CLIP, HF_CLIP, HPSV2], ids=["shortest-round", "shortest-floor", "longest-pad"]
)
def test_gradients_flow(spec):
    images = torch.rand(2, 3, 96, 144, requires_grad=True)
    preprocess(images, spec).square().sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert (images.grad[0] != 0).any() and (images.grad[1] != 0).any()


@pytest.mark.parametrize("spec", [TORCHVISION_CLIP, HPSV2], ids=["shortest-crop", "longest-pad"])
def test_bf16_follows_input_dtype(spec):
    images = torch.rand(2, 3, 120, 90)
    out = preprocess(images.to(torch.bfloat16), spec)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 224, 224)
    reference = preprocess(images.to(torch.bfloat16).float(), spec)
    assert max_abs(out, reference) <= 2.0 ** -7 * reference.abs().max().item()  # one bf16 rounding
    grad_in = images.to(torch.bfloat16).requires_grad_()
    preprocess(grad_in, spec).float().sum().backward()
    assert grad_in.grad is not None and grad_in.grad.dtype == torch.bfloat16


# ---------------------------------------------------------------- extreme aspect ratios (HPS letterbox)


@pytest.mark.parametrize("hw", [(3, 2000), (2000, 3), (1, 4000)])
def test_longest_pad_keeps_at_least_one_pixel(hw):
    """Upstream rounds 3 * 224 / 2000 = 0.34 px to 0 and torchvision's resize raises; Pillow's thumbnail
    keeps 1 px, and so does rewardkit: one row (or column) of the image in the middle, zero padding around."""
    height, width = hw
    assert resized_shape(height, width, HPSV2) == tuple(1 if side < max(hw) else 224 for side in hw)
    thumb = Image.new("RGB", (width, height))
    thumb.thumbnail((224, 224))
    assert (thumb.height, thumb.width) == resized_shape(height, width, HPSV2)
    with pytest.raises(RuntimeError, match="greater than 0"):  # what upstream's ResizeMaxSize does here
        TF.resize(torch.rand(3, height, width), [round(s * 224 / max(hw)) for s in hw])
    images = torch.rand(2, 3, height, width)
    out = preprocess(images, HPSV2)
    assert out.shape == (2, 3, 224, 224) and torch.isfinite(out).all()
    line = out[:, :, 111, :] if height < width else out[:, :, :, 111]  # pad 223 = 111 before + 112 after
    expected = normalize(resize(images, resized_shape(height, width, HPSV2)), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    torch.testing.assert_close(line, expected.reshape(line.shape))
    background = normalize(torch.zeros(1, 3, 1, 1), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    rest = torch.cat([out[:, :, :111], out[:, :, 112:]], 2) if height < width else torch.cat([out[..., :111], out[..., 112:]], 3)
    torch.testing.assert_close(rest, background.expand_as(rest))
    pil = [Image.fromarray((np.random.default_rng(i).random((height, width, 3)) * 255).astype(np.uint8)) for i in range(2)]
    exact = preprocess_pil(pil, HPSV2)
    torch.testing.assert_close(exact, preprocess(torch.stack([TF.to_tensor(p) for p in pil]), HPSV2))
