"""JPEG (in)compressibility rewards against ddpo-pytorch's computation on Pillow's encoder directly.

Reference (written from kvablack/ddpo-pytorch 1958463 ``rewards.py``): ``(x * 255).round().clamp(0, 255)``
to uint8, NCHW -> NHWC, ``Image.fromarray(...).save(buffer, "JPEG", quality=95)``, ``buffer.tell() / 1000``.
Sizes must be equal exactly (same encoder, same bytes).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import rewardkit.testing as rkt
from rewardkit.rewards import jpeg


def _ddpo_sizes(images: torch.Tensor, quality: int = 95) -> list[float]:
    arrays = (images * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy().transpose(0, 2, 3, 1)
    sizes = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return sizes


def _images() -> torch.Tensor:
    smooth = rkt.random_images(3, 64, 48, seed=0)
    noise = torch.rand(3, 3, 64, 48, generator=torch.Generator().manual_seed(1))
    return torch.cat([smooth, noise])


@pytest.fixture(scope="module")
def registered():
    """The two registry entries (the lead registers them in registry.py; added here if absent)."""
    from rewardkit import registry

    common = dict(differentiable=False, requires_prompt=False, upstream="kvablack/ddpo-pytorch rewards.py")
    entries = [registry.Entry("jpeg-compressibility", "reward", "rewardkit.rewards.jpeg:load_compressibility",
                              "-JPEG kB", score_range=(None, 0.0), **common),
               registry.Entry("jpeg-incompressibility", "reward", "rewardkit.rewards.jpeg:load_incompressibility",
                              "JPEG kB", score_range=(0.0, None), **common)]
    with pytest.MonkeyPatch.context() as patch:
        for entry in entries:
            if entry.name not in registry.names():
                patch.setitem(registry._REGISTRY, entry.name, entry)
        yield


def test_sizes_equal_ddpo_pytorch_on_pillow(registered) -> None:
    import rewardkit as rk

    images = _images()
    expected = torch.tensor(_ddpo_sizes(images), dtype=torch.float32)
    incompressibility = rk.load("jpeg-incompressibility")
    out = incompressibility.evaluate(images)
    assert torch.equal(out.scores, expected) and torch.equal(out.details["size_kb"], expected)
    assert torch.equal(rk.load("jpeg-compressibility")(images, ["any prompt"] * 6), -expected)
    assert expected[3:].min() > expected[:3].max(), "noise must be less compressible than smooth images"
    assert out.scores.dtype == torch.float32 and out.scores.shape == (6,)


def test_rounding_to_uint8_is_ddpo_pytorchs() -> None:
    # Values exactly between two levels: torch rounds half to even, as ddpo-pytorch does.
    halves = torch.arange(0.5, 255.0, 1.0)
    image = (halves[None, :, None].expand(3, -1, 8) / 255).reshape(1, 3, 255, 8).contiguous()
    reward = jpeg.load_incompressibility()
    assert torch.equal(reward(image), torch.tensor(_ddpo_sizes(image), dtype=torch.float32))
    floor = image - 0.25 / 255
    assert torch.equal(reward(floor), torch.tensor(_ddpo_sizes(floor), dtype=torch.float32))


def test_quality_and_scale_options() -> None:
    images = _images()
    low = jpeg.load_incompressibility(quality=50)(images)
    assert torch.equal(low, torch.tensor(_ddpo_sizes(images, quality=50), dtype=torch.float32))
    assert (low < jpeg.load_incompressibility()(images)).all()
    scaled = jpeg.load_compressibility(scale=1 / 500)(images)  # flow_grpo's -kB / 500
    torch.testing.assert_close(scaled, -torch.tensor(_ddpo_sizes(images)) / 500)


def test_not_differentiable_and_declared_so() -> None:
    reward = jpeg.load_compressibility(dtype="bf16")
    pixels = _images().requires_grad_(True)
    scores = reward(pixels)
    assert reward.differentiable is False and not scores.requires_grad
    assert reward.name == "jpeg-compressibility" and reward.requires_prompt is False
    assert list(reward.parameters()) == []


def test_bad_inputs_raise_with_a_fix() -> None:
    reward = jpeg.load_incompressibility()
    images = _images()
    with pytest.raises(ValueError, match=r"jpeg-incompressibility.*\[0, 255\]"):
        reward(images * 255)
    with pytest.raises(ValueError, match="jpeg-incompressibility.*uint8"):
        reward((images * 255).to(torch.uint8))
    with pytest.raises(TypeError, match="to_tensor"):
        reward(np.zeros((1, 3, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="no weights"):
        jpeg.load_incompressibility(weights="x.pt")
    with pytest.raises(TypeError, match="unknown options.*resize"):
        jpeg.load_compressibility(resize=True)
    with pytest.raises(ValueError, match="quality=0"):
        jpeg.load_compressibility(quality=0)
    with pytest.raises(ValueError, match="unknown dtype"):
        jpeg.load_compressibility(dtype="int4")
