"""JPEG (in)compressibility rewards against ddpo-pytorch's computation on Pillow's encoder directly.

Reference (written from kvablack/ddpo-pytorch 1958463 ``rewards.py``): ``(x * 255).round().clamp(0, 255)``
to uint8, NCHW -> NHWC, ``Image.fromarray(...).save(buffer, "JPEG", quality=95)``, ``buffer.tell() / 1000``.
Sizes must be equal exactly (same encoder, same bytes).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import rewardkit.testing as rkt
from rewardkit.cli import main
from rewardkit.rewards import jpeg


def _ddpo_sizes(images: torch.Tensor, quality: int = 95) -> list[float]:
    arrays = (images * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy().transpose(0, 2, 3, 1)
    sizes = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return sizes


def _pil_sizes(images: list[Image.Image], quality: int = 95) -> list[float]:
    """ddpo-pytorch's encoder step on uint8 images that are already PIL (its arrays after ``Image.fromarray``)."""
    sizes = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(image)).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return sizes


def _mixed_pils() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    smooth = [(rkt.random_images(1, h, w, seed=i)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
              for i, (h, w) in enumerate([(48, 40), (64, 64)])]
    noise = [rng.integers(0, 256, size=(30, 50, 3), dtype=np.uint8)]
    return [Image.fromarray(a) for a in smooth + noise]


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


def test_flow_grpo_convention_is_kb_over_500_for_compressibility_only() -> None:
    images = _images()
    sizes = np.array(_ddpo_sizes(images))
    # yifan123/flow_grpo flow_grpo/rewards.py: jpeg_compressibility returns -rew/500 (float64 numpy), and
    # train_sd3.py reads it with torch.as_tensor(...).float(); its jpeg_incompressibility stays in kB.
    expected = torch.as_tensor(-sizes / 500).float()
    flow = jpeg.load_compressibility(convention="flow_grpo")
    assert torch.equal(flow(images), expected)
    assert torch.equal(flow.evaluate(images).details["size_kb"], torch.as_tensor(sizes).float())
    assert torch.equal(jpeg.load_incompressibility(convention="flow_grpo")(images), torch.as_tensor(sizes).float())
    assert torch.equal(jpeg.load_compressibility(convention="ddpo")(images), torch.as_tensor(-sizes).float())
    with pytest.raises(ValueError, match="not both"):
        jpeg.load_compressibility(convention="flow_grpo", scale=0.5)
    with pytest.raises(ValueError, match="convention='kb'.*ddpo"):
        jpeg.load_compressibility(convention="kb")


def test_exact_path_scores_pil_images_of_any_size_as_ddpo_pytorch() -> None:
    pils = _mixed_pils()
    reward = jpeg.load_incompressibility()
    out = reward.evaluate_pil(pils)
    expected = torch.tensor(_pil_sizes(pils), dtype=torch.float32)
    assert torch.equal(out.scores, expected) and torch.equal(out.details["size_kb"], expected)
    assert out.scores.shape == (3,) and out.scores.dtype == torch.float32
    assert torch.equal(jpeg.load_compressibility().score_pil(pils, "ignored"), -expected)
    # Same-size images: the exact path and the tensor path see the same uint8 pixels, so equal sizes.
    same = _mixed_pils()[:1] * 2
    from rewardkit.image_io import to_tensor

    assert torch.equal(reward.score_pil(same), reward(to_tensor(same)))
    with pytest.raises(ValueError, match="at least one image"):
        reward.evaluate_pil([])


def test_exact_path_reads_files_and_converts_modes(tmp_path) -> None:
    rgba = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 28, 4), dtype=np.uint8), "RGBA")
    path = tmp_path / "a.png"
    rgba.save(path)
    reward = jpeg.load_incompressibility(quality=80)
    # Alpha is dropped as PIL's convert("RGB") does (rewardkit.image_io.load_image's default policy).
    expected = torch.tensor(_pil_sizes([rgba.convert("RGB")], quality=80), dtype=torch.float32)
    assert torch.equal(reward.score_pil([path]), expected) and torch.equal(reward.score_pil(str(path)), expected)


def test_cli_scores_a_folder_of_mixed_sizes(tmp_path, capsys, registered) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    pils = _mixed_pils()
    for index, image in enumerate(pils):
        image.save(folder / f"img{index}.png")
    out = tmp_path / "scores.jsonl"
    assert main(["score", "jpeg-compressibility", "--images", str(folder), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["jpeg-compressibility"] for row in rows] == pytest.approx([-s for s in _pil_sizes(pils)], rel=1e-6)
