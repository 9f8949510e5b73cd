"""DiffSynth-compatible ``HPSv3Metric``: from_pretrained defaults, call shapes, pairing, options (tiny, offline).

The scores themselves are checked against the upstream formula in tests/test_hpsv3.py; here the metric must return
exactly what the core reward's exact path returns for the same pairs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rewardkit.testing as rkt
from rewardkit.compat.diffsynth import ModelConfig
from rewardkit.compat.diffsynth_hpsv3 import HPSv3Metric
from rewardkit.rewards import hpsv3

from image_samples import random_pil_images

REPO = "DiffSynth-Studio/ImageMetrics"
PROMPTS = ["a photo of a cat", "a red car on a road"]
pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict]:
    """A ``DIFFSYNTH_MODEL_BASE_PATH`` tree holding a tiny ``ImageMetrics/HPSv3/`` (weights + processor)."""
    root = tmp_path_factory.mktemp("diffsynth-models")
    return root, rkt.tiny_hpsv3(root / REPO, layout="diffsynth")


@pytest.fixture(scope="module")
def base(tiny) -> Path:
    return tiny[0]


@pytest.fixture(scope="module")
def config(tiny) -> dict:
    return tiny[1]["config"]  # a checkpoint file carries no architecture: the tiny one is passed as config=


@pytest.fixture(scope="module")
def metric(base, config) -> HPSv3Metric:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base))
        return HPSv3Metric.from_pretrained(torch_dtype=None, device="cpu", config=config)


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    """``n`` images 48 px high, 40, 48, 56, ... px wide."""
    return random_pil_images([(40 + 8 * i, 48) for i in range(n)], seed=seed)


def test_default_configs_resolve_the_local_tree_and_compute_is_the_exact_path(base, metric) -> None:
    folder = base / REPO / "HPSv3"
    reward = hpsv3.load(weights=str(folder / "model.safetensors"), config=metric.reward.net.config)
    images = _images(2)
    scores = metric.compute(PROMPTS, images)
    assert isinstance(scores, list) and all(isinstance(s, float) for s in scores) and len(scores) == 2
    assert scores == reward.score_pil(images, PROMPTS).tolist()
    assert metric.forward(PROMPTS, images) == metric.score(PROMPTS, images) == scores
    assert metric.reward.position_mode == "sequential" and metric.reward.max_pixels == 256 * 28 * 28


def test_pairing_follows_diffsynth(metric, tmp_path: Path) -> None:
    images = _images(2, seed=5)
    one_prompt = metric.compute("a cat", images)
    assert one_prompt == metric.compute(["a cat", "a cat"], images)
    one_image = metric.compute(PROMPTS, images[0])
    assert one_image == metric.compute(PROMPTS, [images[0], images[0]])
    images[1].save(tmp_path / "b.png")
    assert metric.compute("a cat", [images[0], str(tmp_path / "b.png")]) == pytest.approx(one_prompt, abs=1e-6)
    with pytest.raises(ValueError, match="2 prompts and 3 images"):
        metric.compute(PROMPTS, _images(3))


def test_score_index_and_evaluate(base, config, metric) -> None:
    images = _images(2, seed=9)
    rows = metric.evaluate(PROMPTS, images)
    assert [r["score"] for r in rows] == metric.compute(PROMPTS, images) == [r["mu"] for r in rows]
    assert all(r["sigma"] == pytest.approx(float(np.exp(r["log_sigma"])), rel=1e-6) for r in rows)
    weights = ModelConfig(path=str(base / REPO / "HPSv3" / "model.safetensors"))
    log_sigma = HPSv3Metric.from_pretrained(weights, torch_dtype=None, device="cpu", config=config, score_index=1)
    assert log_sigma.compute(PROMPTS, images) == pytest.approx([r["log_sigma"] for r in rows], abs=1e-6)
    with pytest.raises(ValueError, match="score_index"):
        HPSv3Metric(metric.reward, score_index=2)


def test_options_dtype_positions_and_refusals(base, config) -> None:
    weights = ModelConfig(path=str(base / REPO / "HPSv3" / "model.safetensors"))
    processor = ModelConfig(path=str(base / REPO / "HPSv3"))
    fast = HPSv3Metric.from_pretrained(weights, processor, device="cpu", config=config)  # DiffSynth default: bf16
    assert fast.reward.net.model.visual.patch_embed.proj.weight.dtype == torch.bfloat16
    with pytest.warns(UserWarning, match="vram_limit"):
        mrope = HPSv3Metric.from_pretrained(weights, processor, torch_dtype=torch.float32, device="cpu", config=config,
                                            position_mode="mrope", vram_limit=4.0)
    assert mrope.reward.position_mode == "mrope"
    with pytest.raises(ValueError, match="use_special_tokens=False"):
        HPSv3Metric.from_pretrained(weights, processor, device="cpu", config=config, use_special_tokens=False)


def test_lazy_export() -> None:
    import rewardkit.compat.diffsynth_hpsv3 as module

    assert module.HPSv3Metric is HPSv3Metric and HPSv3Metric.registry_name == "hpsv3"
