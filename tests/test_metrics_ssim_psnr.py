"""SSIM / MS-SSIM / PSNR: parity with scikit-image, torchmetrics and pytorch-msssim; gradients; bad input.

Tolerances: rewardkit returns float32, so against a float64 reference the floor is float32 rounding of a
value near 1 (half an ulp is 3e-8); exact mode (float64 compute) was measured at <= 3e-8 for every SSIM
and MS-SSIM preset and <= 1e-6 dB for PSNR (20 dB values, ulp 1.9e-6). Tests assert 1e-7 (SSIM) and
2e-6 dB (PSNR). Where a reference computes in float32 its own rounding dominates (stated per test).
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from rewardkit.metrics.psnr import PSNR, load_psnr
from rewardkit.metrics.ssim import MS_SSIM_PRESETS, MSSSIM, SSIM, load_ms_ssim, load_ssim

import pytorch_msssim  # noqa: E402  (reference packages: dev extras, a missing one must fail, not skip)
import torchmetrics.functional.image as tm_image  # noqa: E402

# Default (centred float32 compute) vs references run in float64: measured <= 1.2e-7 on textured images,
# <= 1.9e-6 on large flat bright areas. compute_dtype=float64 vs the same: measured <= 3e-8 (the output cast).
SSIM_ATOL = 2e-6
SSIM_FLOAT64_ATOL = 1e-7
PSNR_ATOL_DB = 2e-6  # float32 output near 20 dB (measured <= 1e-6)


def _smooth(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Smooth random images in [0, 1]: low-res noise upsampled bicubically, plus a little fine noise."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, height // 8 + 2, width // 8 + 2, generator=gen, dtype=torch.float64)
    image = F.interpolate(low, size=(height, width), mode="bicubic", align_corners=False)
    return (image + 0.05 * torch.randn(batch, 3, height, width, generator=gen, dtype=torch.float64)).clamp(0, 1)


def _pair(batch: int, height: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, reference) as float32 (the canonical input), related but not equal."""
    x = _smooth(batch, height, width, seed)
    y = (0.7 * x + 0.3 * _smooth(batch, height, width, seed + 100)).clamp(0, 1)
    return x.float(), y.float()


def _skimage_wang(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    return torch.tensor([
        structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                              data_range=data_range, channel_axis=0)
        for a, b in zip(x.double().numpy(), y.double().numpy())
    ])


@pytest.mark.parametrize("size", [(64, 80), (128, 160)])
def test_ssim_wang_matches_skimage(size: tuple[int, int]) -> None:
    x, y = _pair(3, *size, seed=1)
    ours = load_ssim()(x, reference=y)
    assert ours.dtype == torch.float32 and ours.shape == (3,)
    torch.testing.assert_close(ours.double(), _skimage_wang(x, y), atol=SSIM_ATOL, rtol=0)


def test_ssim_data_range_is_passed_through() -> None:
    x, y = _pair(2, 40, 48, seed=2)
    ours = load_ssim(data_range=2.0)(x, reference=y)
    torch.testing.assert_close(ours.double(), _skimage_wang(x, y, data_range=2.0), atol=SSIM_ATOL, rtol=0)


@pytest.mark.parametrize("size", [(64, 80), (128, 160)])
def test_ssim_torchmetrics_preset(size: tuple[int, int]) -> None:
    x, y = _pair(2, *size, seed=3)
    ours = load_ssim(preset="torchmetrics")(x, reference=y).double()
    reference = tm_image.structural_similarity_index_measure(x.double(), y.double(), reduction="none", data_range=1.0)
    torch.testing.assert_close(ours, reference, atol=SSIM_ATOL, rtol=0)
    # torchmetrics run on float32 carries its own float32 rounding (measured 5.4e-7 here).
    reference32 = tm_image.structural_similarity_index_measure(x, y, reduction="none", data_range=1.0)
    torch.testing.assert_close(ours, reference32.double(), atol=2e-6, rtol=0)
    # The border convention matters: the two presets differ well beyond rounding.
    assert (ours - _skimage_wang(x, y)).abs().max() > 1e-5


def test_ssim_pytorch_msssim_preset() -> None:
    x, y = _pair(3, 64, 80, seed=4)
    ours = load_ssim(preset="pytorch-msssim")(x, reference=y).double()
    reference = pytorch_msssim.ssim(x.double(), y.double(), data_range=1.0, size_average=False)
    torch.testing.assert_close(ours, reference, atol=SSIM_ATOL, rtol=0)


@pytest.mark.parametrize("size", [(176, 176), (177, 179)])
def test_ms_ssim_torchmetrics_preset(size: tuple[int, int]) -> None:
    x, y = _pair(1, *size, seed=5)  # torchmetrics' float64 2-D convolution is slow on CPU
    ours = load_ms_ssim(preset="torchmetrics")(x, reference=y).double()
    reference = tm_image.multiscale_structural_similarity_index_measure(
        x.double(), y.double(), reduction="none", data_range=1.0)
    torch.testing.assert_close(ours, reference, atol=SSIM_ATOL, rtol=0)


@pytest.mark.parametrize("size", [(161, 170), (181, 203)])
def test_ms_ssim_pytorch_msssim_preset(size: tuple[int, int]) -> None:
    x, y = _pair(2, *size, seed=6)
    ours = load_ms_ssim()(x, reference=y).double()
    reference = pytorch_msssim.ms_ssim(x.double(), y.double(), data_range=1.0, size_average=False)
    torch.testing.assert_close(ours, reference, atol=SSIM_ATOL, rtol=0)
    # Fast mode runs upstream's float32 arithmetic (measured bit-identical; 1e-6 allows other kernels).
    fast = load_ms_ssim(dtype="bf16")(x, reference=y)
    torch.testing.assert_close(fast, pytorch_msssim.ms_ssim(x, y, data_range=1.0, size_average=False), atol=1e-6, rtol=0)


def test_ms_ssim_minimum_sizes_match_the_references() -> None:
    assert MS_SSIM_PRESETS["pytorch-msssim"].min_size == 161
    assert MS_SSIM_PRESETS["torchmetrics"].min_size == 176
    assert load_ms_ssim(preset="torchmetrics").min_size == 176 and load_ssim().min_size == 11
    x, y = _pair(1, 176, 176, seed=7)
    tm_image.multiscale_structural_similarity_index_measure(x, y, data_range=1.0)
    with pytest.raises(ValueError):
        tm_image.multiscale_structural_similarity_index_measure(x[..., :175], y[..., :175], data_range=1.0)
    pytorch_msssim.ms_ssim(x[..., :161, :161], y[..., :161, :161], data_range=1.0)
    with pytest.raises(AssertionError):
        pytorch_msssim.ms_ssim(x[..., :160], y[..., :160], data_range=1.0)
    with pytest.raises(ValueError, match="at least 176x176 px"):
        load_ms_ssim(preset="torchmetrics")(x[..., :175], reference=y[..., :175])
    with pytest.raises(ValueError, match="at least 161x161 px"):
        load_ms_ssim()(x[..., :160], reference=y[..., :160])


@pytest.mark.parametrize("preset", ["wang", "torchmetrics"])
def test_ssim_float32_default_is_close_to_float64(preset: str) -> None:
    x, y = _pair(2, 96, 96, seed=8)
    default = load_ssim(preset=preset, dtype="bf16")
    assert default.cfg.compute_dtype == torch.float32
    wide = load_ssim(preset=preset, compute_dtype=torch.float64)
    torch.testing.assert_close(default(x, reference=y), wide(x, reference=y), atol=5e-7, rtol=0)


def test_ssim_float64_compute_matches_skimage_to_output_precision() -> None:
    x, y = _pair(2, 64, 80, seed=3)
    ours = load_ssim(compute_dtype=torch.float64)(x, reference=y)
    torch.testing.assert_close(ours.double(), _skimage_wang(x, y), atol=SSIM_FLOAT64_ATOL, rtol=0)


def test_psnr_matches_skimage_and_torchmetrics() -> None:
    x, y = _pair(4, 48, 64, seed=9)
    ours = load_psnr()(x, reference=y)
    assert ours.dtype == torch.float32 and ours.shape == (4,)
    expected = torch.tensor([peak_signal_noise_ratio(a, b, data_range=1.0)
                             for a, b in zip(y.double().numpy(), x.double().numpy())])
    torch.testing.assert_close(ours.double(), expected, atol=PSNR_ATOL_DB, rtol=0)
    reference = tm_image.peak_signal_noise_ratio(x.double(), y.double(), data_range=1.0, dim=(1, 2, 3),
                                                 reduction="none")
    torch.testing.assert_close(ours.double(), reference, atol=PSNR_ATOL_DB, rtol=0)
    # torchmetrics' default pools one MSE over the batch: not a per-image score.
    pooled = tm_image.peak_signal_noise_ratio(x.double(), y.double(), data_range=1.0)
    assert (ours.double() - pooled).abs().max() > 1e-3


def test_psnr_mse_detail_and_data_range() -> None:
    x, y = _pair(2, 32, 32, seed=10)
    out = load_psnr(data_range=2.0).evaluate(x, reference=y)
    mse = ((x.double() - y.double()) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.details["mse"].double(), mse, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.scores.double(), 10 * torch.log10(4.0 / mse), atol=PSNR_ATOL_DB, rtol=0)


def _metrics() -> list:
    return [load_ssim(), load_ssim(preset="torchmetrics"), load_ssim(dtype="bf16"), load_ms_ssim(),
            load_ms_ssim(preset="torchmetrics"), load_psnr()]


@pytest.mark.parametrize("index", range(6))
def test_gradients_reach_images(index: int) -> None:
    metric = _metrics()[index]
    x, y = _pair(2, 176, 180, seed=11)
    x.requires_grad_(True)
    metric(x, reference=y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert metric.differentiable and metric.higher_is_better and not metric.requires_prompt


@pytest.mark.parametrize("index", range(4))
def test_gradient_matches_finite_differences(index: int) -> None:
    # Directional derivative check: the detached centring shift and the NaN-safe where() must not bend
    # the gradient. Central differences on the float32 output with eps 1e-3: rounding error ~3e-5.
    metric = [load_ssim(), load_ssim(preset="torchmetrics"), load_ms_ssim(sigma=0.5, betas=(0.6, 0.4)),
              load_psnr()][index]
    x, y = _pair(1, 24, 28, seed=18)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(19)) * (x.clamp(0.01, 0.99) - x == 0)
    images = x.clone().requires_grad_(True)
    metric(images, reference=y).sum().backward()
    eps = 1e-3
    numeric = (metric(x + eps * direction, reference=y) - metric(x - eps * direction, reference=y)) / (2 * eps)
    analytic = (images.grad * direction).sum()
    torch.testing.assert_close(numeric.double().sum(), analytic.double(), rtol=1e-3, atol=1e-4)


def test_identical_images() -> None:
    x, y = _pair(2, 176, 176, seed=12)
    for metric in (load_ssim(), load_ssim(preset="torchmetrics"), load_ms_ssim(), load_ms_ssim(preset="torchmetrics")):
        torch.testing.assert_close(metric(x, reference=x), torch.ones(2), atol=SSIM_ATOL, rtol=0)
    images = x.clone().requires_grad_(True)
    psnr = load_psnr()(images, reference=torch.stack([x[0], y[1]]))
    assert psnr[0] == float("inf") and torch.isfinite(psnr[1])
    psnr[1].backward()  # the +inf row gets a zero gradient, not NaN
    assert torch.isfinite(images.grad).all() and images.grad[0].abs().sum() == 0


def test_ms_ssim_negative_scale_gives_zero_with_finite_gradient() -> None:
    x, _ = _pair(1, 176, 176, seed=13)
    images = x.clone().requires_grad_(True)
    score = load_ms_ssim()(images, reference=1.0 - x)  # anti-correlated: cs < 0, relu -> 0
    reference = pytorch_msssim.ms_ssim(x.double(), 1.0 - x.double(), data_range=1.0, size_average=False)
    torch.testing.assert_close(score.double(), reference, atol=SSIM_ATOL, rtol=0)
    score.sum().backward()
    assert torch.isfinite(images.grad).all()


@pytest.mark.parametrize("index", range(6))
def test_batch_size_independence(index: int) -> None:
    metric = _metrics()[index]
    x, y = _pair(2, 176, 184, seed=14)
    together = metric(x, reference=y)
    alone = torch.cat([metric(x[i:i + 1], reference=y[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(together, alone, atol=1e-7, rtol=0)


def test_autocast_has_no_effect() -> None:
    x, y = _pair(2, 64, 64, seed=15)
    metric = load_ssim(dtype="bf16")
    plain = metric(x, reference=y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = metric(x, reference=y)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, plain, atol=0, rtol=0)


def test_classes_attributes_and_pickling() -> None:
    assert isinstance(load_ssim(), SSIM) and isinstance(load_ms_ssim(), MSSSIM) and isinstance(load_psnr(), PSNR)
    assert [m.name for m in (load_ssim(), load_ms_ssim(), load_psnr())] == ["ssim", "ms-ssim", "psnr"]
    assert not load_ssim().training
    x, y = _pair(1, 176, 176, seed=17)
    for metric in (load_ssim(preset="torchmetrics", dtype="fp16"), load_ms_ssim(), load_psnr(data_range=2.0)):
        clone = pickle.loads(pickle.dumps(metric))
        torch.testing.assert_close(clone(x, reference=y), metric(x, reference=y), atol=0, rtol=0)


def test_bad_inputs() -> None:
    x, y = _pair(2, 32, 32, seed=16)
    for metric in (load_ssim(), load_ms_ssim(), load_psnr()):
        with pytest.raises(ValueError, match="needs reference images"):
            metric(x)
        with pytest.raises(ValueError, match="same shape"):
            metric(x, reference=y[:1])
        with pytest.raises(ValueError, match="NaN"):
            metric(x, reference=torch.full_like(y, float("nan")))
        with pytest.raises(ValueError, match="uint8"):
            metric(x, reference=(y * 255).to(torch.uint8))
        with pytest.raises(TypeError, match="unexpected keyword"):
            metric(x, reference=y, source=y)
    with pytest.raises(ValueError, match=r"at least 11x11 px .* got 10x32"):
        load_ssim()(x[..., :10, :], reference=y[..., :10, :])
    with pytest.raises(ValueError, match="at least 161x161 px .* use 'ssim'"):
        load_ms_ssim()(x, reference=y)


def test_bad_factory_arguments() -> None:
    for factory in (load_ssim, load_ms_ssim, load_psnr):
        with pytest.raises(ValueError, match="has no weights"):
            factory(weights="hf:owner/repo")
        with pytest.raises(ValueError, match="data_range must be a finite number > 0"):
            factory(data_range=0.0)
        with pytest.raises(ValueError, match="unknown dtype"):
            factory(dtype="int8")
    with pytest.raises(ValueError, match="unknown preset 'skimage'"):
        load_ssim(preset="skimage")
    with pytest.raises(TypeError, match=r"unknown options \['window'\]"):
        load_ms_ssim(window=7)
    assert load_ms_ssim(sigma=1.0).cfg.window_size == 2 * int(3.5 * 1.0 + 0.5) + 1
    assert np.isclose(load_ms_ssim(betas=(0.5, 0.5)).ms_cfg.betas[0], 0.5)
