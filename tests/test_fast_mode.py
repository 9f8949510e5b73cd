"""The fast mode (``dtype="bf16"``) of ImageReward: matmul weights held in bf16 once, scores close to exact.

Holding the weights in bf16 must change no numerics against plain autocast over fp32 weights (autocast casts
``Linear`` / ``Conv`` weights and biases to bf16 at every call; rewardkit does it once at load), so the fast scores
are compared bit for bit with that path, built from the same file. The fast-vs-exact tolerance is stated from a
measured gap: on these tiny random weights (12 images) bf16 moved the scores by 0.0083 for a score spread of 0.907
(0.9 %); the test allows 3 % of the spread and a Spearman rank correlation >= 0.95.
"""

from __future__ import annotations

import pytest
import torch

import rewardkit.testing as rkt
from rewardkit.rewards import imagereward as ir
from rewardkit.testing.imagereward import tiny_imagereward

pytestmark = [pytest.mark.usefixtures("one_thread_per_module"),
              pytest.mark.filterwarnings("ignore:bf16 autocast on this CPU:RuntimeWarning")]  # slow-CPU notice only

PROMPTS = ["a cat", "a dog on a sofa", "a red car", "blue sky with clouds", "a bowl of fruit", "two birds"] * 2
# Measured fast-vs-exact gap on the tiny model: 0.9 % of the score spread (module docstring); 3x headroom.
MAX_GAP_FRACTION_OF_SPREAD = 0.03
MIN_SPEARMAN = 0.95


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = (t.argsort().argsort().double() for t in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float(ra @ rb / (ra.norm() * rb.norm()))


@pytest.fixture(scope="module")
def kwargs(tmp_path_factory) -> dict:
    return tiny_imagereward(tmp_path_factory.mktemp("imagereward"))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return rkt.random_images(len(PROMPTS), 64, 48, seed=7)


def _matmul_modules(net: torch.nn.Module) -> list[torch.nn.Module]:
    towers = (net.visual_encoder, net.text_encoder)
    return [m for tower in towers for m in tower.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def test_fast_imagereward_holds_tower_matmul_weights_in_bf16_and_the_rest_in_fp32(kwargs) -> None:
    fast = ir.load(**kwargs, dtype="bf16")
    matmuls = _matmul_modules(fast.net)
    assert len(matmuls) > 10
    assert all(m.weight.dtype == torch.bfloat16 and m.bias.dtype == torch.bfloat16 for m in matmuls)
    held = {id(p) for m in matmuls for p in m.parameters()}
    rest = {name: p.dtype for name, p in fast.net.named_parameters() if id(p) not in held}
    # LayerNorms, embeddings, cls/pos tokens and the MLP head: float32, as upstream needs them.
    assert rest and set(rest.values()) == {torch.float32}, rest
    assert any(name.startswith("mlp.") for name in rest) and "visual_encoder.pos_embed" in rest
    assert "text_encoder.embeddings.word_embeddings.weight" in rest
    assert not any(p.requires_grad for p in fast.net.parameters())


def test_exact_imagereward_stays_float32(kwargs) -> None:
    ir.load(**kwargs, dtype="bf16")  # a fast load beside it must not touch an exact model's weights
    exact = ir.load(**kwargs)
    assert {p.dtype for p in exact.net.parameters()} == {torch.float32}
    assert exact.autocast_dtype is None


def test_fast_scores_equal_autocast_over_fp32_weights_and_stay_close_to_exact(kwargs, images) -> None:
    exact = ir.load(**kwargs)
    fast = ir.load(**kwargs, dtype="bf16")
    # The former fast path: the same file's fp32 weights under bf16 autocast (re-cast at every call).
    autocast_only = ir.ImageRewardReward(ir.load_net(kwargs["weights"], kwargs["config"]), fast.tokenizer,
                                         dtype="bf16")
    with torch.inference_mode():
        exact_scores, fast_scores = exact(images, PROMPTS), fast(images, PROMPTS)
        reference = autocast_only(images, PROMPTS)
    assert fast_scores.dtype == torch.float32
    torch.testing.assert_close(fast_scores, reference, rtol=0, atol=0)
    spread = (exact_scores.max() - exact_scores.min()).item()
    gap = (fast_scores - exact_scores).abs().max().item()
    assert 0 < gap < MAX_GAP_FRACTION_OF_SPREAD * spread, (gap, spread)  # > 0: bf16 really ran
    assert _spearman(fast_scores, exact_scores) >= MIN_SPEARMAN


def test_fast_path_backpropagates_to_pixels_only(kwargs, images) -> None:
    fast = ir.load(**kwargs, dtype="bf16")
    pixels = images[:4].clone().requires_grad_(True)
    scores = fast(pixels, PROMPTS[:4])
    assert scores.dtype == torch.float32
    scores.sum().backward()
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
    assert all(p.grad is None for p in fast.net.parameters())  # frozen weights accumulate nothing


def test_fast_open_clip_towers_route_attention_through_sdpa_and_stay_close(tmp_path, images) -> None:
    """hpsv2's fast copy runs open_clip's ``nn.MultiheadAttention`` as ``precision.SdpaSelfAttention`` (the exact
    towers keep torch's module); scores stay close to exact: measured max |Δ| 4.7e-3 for a spread of 0.51 (0.9 %;
    4.4e-3 before the routing, bf16 weights alone) on 12 images; allowed 3 % of the spread."""
    import rewardkit as rk
    from rewardkit.precision import SdpaSelfAttention
    from rewardkit.testing.clip import tiny_hpsv2

    files = tiny_hpsv2(tmp_path)
    exact, fast = rk.load("hpsv2", **files), rk.load("hpsv2", **files, dtype="bf16")

    def attention_types(towers: torch.nn.Module) -> set[type]:
        return {type(m) for m in towers.modules() if isinstance(m, torch.nn.MultiheadAttention)}

    assert attention_types(fast.towers) == {SdpaSelfAttention}
    assert attention_types(exact.towers) == {torch.nn.MultiheadAttention}
    with torch.inference_mode():
        exact_scores, fast_scores = exact(images, PROMPTS), fast(images, PROMPTS)
    spread = (exact_scores.max() - exact_scores.min()).item()
    gap = (fast_scores - exact_scores).abs().max().item()
    assert 0 < gap < MAX_GAP_FRACTION_OF_SPREAD * spread, (gap, spread)
    assert _spearman(fast_scores, exact_scores) >= MIN_SPEARMAN
