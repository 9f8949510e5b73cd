"""Reward-backprop loss: value, gradients, precision, gradient checkpointing (measured), refusals, NaN policy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rewardkit.testing as rkt
from rewardkit.compose import compose
from rewardkit.training.backprop import (
    find_checkpoint_blocks,
    gradient_checkpointing,
    reward_loss,
    saved_activations,
)
from rewardkit.protocols import Reward, RewardOutput

PROMPTS = ["a red fox in the snow", "an astronaut on a horse", "a bowl of ramen"]
BF16_TOLERANCE = 0.05  # |loss_bf16 - loss_fp32| / max(1, |loss_fp32|); bf16 keeps ~3 significant digits
# Measured on the tiny CLIP towers (2 blocks, 32 px, 17 tokens, batch 3): saved activations drop to
# 0.55x (pickscore, HF: 267 kB -> 147 kB) and 0.35x (hpsv2, open_clip: 184 kB -> 64 kB) of the
# unchecked run; deeper towers save more (benchmarks/results/compose.md). Asserted with margin.
MAX_CHECKPOINT_RATIO = 0.75


def images(batch: int = 3, side: int = 40, seed: int = 0) -> torch.Tensor:
    return rkt.random_images(batch, side, side, seed=seed).requires_grad_(True)


class Brightness(Reward):
    """Differentiable toy reward: mean pixel value; optionally lower-is-better."""

    requires_prompt = False
    name = "brightness"

    def __init__(self, higher_is_better: bool = True) -> None:
        super().__init__()
        self.higher_is_better = higher_is_better

    def score(self, images, prompts, **context):
        return RewardOutput(images.mean(dim=(1, 2, 3)))


class SqrtBelowHalf(Reward):
    """``sqrt(0.5 - mean)``: NaN (with a NaN gradient) for rows brighter than 0.5."""

    requires_prompt = False
    name = "sqrt-below-half"

    def score(self, images, prompts, **context):
        return RewardOutput(torch.sqrt(0.5 - images.mean(dim=(1, 2, 3))))


class Frozen(Brightness):
    name = "frozen"
    differentiable = False


class Detaching(Brightness):
    name = "detaching"

    def score(self, images, prompts, **context):
        return RewardOutput(images.detach().mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("name", ["pickscore", "hpsv2"])
def test_loss_is_minus_mean_reward_exactly(tiny_reward, name: str) -> None:
    reward = tiny_reward(name)
    x = images()
    scores = reward(x, PROMPTS)
    assert torch.equal(reward_loss(reward, x, PROMPTS), -scores.mean())
    assert torch.equal(reward_loss(reward, x, PROMPTS, reduction="sum", scale=0.01), -0.01 * scores.sum())
    per_row = reward_loss(reward, x, PROMPTS, reduction="none")
    assert per_row.shape == (3,) and torch.equal(per_row, -scores)


def test_gradients_reach_every_pixel_row(tiny_reward) -> None:
    reward = tiny_reward("pickscore")
    x = images()
    reward_loss(reward, x, PROMPTS).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert (x.grad.flatten(1).abs().sum(1) > 0).all()  # every image gets a gradient
    assert not any(p.requires_grad for p in reward.parameters())  # the reward stays frozen


def test_lower_is_better_reward_gives_plus_score() -> None:
    x = images()
    assert torch.equal(reward_loss(Brightness(higher_is_better=False), x), x.mean(dim=(1, 2, 3)).mean())


def test_refl_margin_from_per_row_losses() -> None:
    reward, x = Brightness(), images()
    loss = F.relu(reward_loss(reward, x, reduction="none") + 2).mean()  # ReFL: relu(2 - r).mean()
    torch.testing.assert_close(loss, F.relu(2 - x.mean(dim=(1, 2, 3))).mean())


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_returns_float32_and_is_close(tiny_reward, dtype: str) -> None:
    reward = tiny_reward("pickscore")
    x = images()
    exact = reward_loss(reward, x, PROMPTS)
    fast = reward_loss(reward, x, PROMPTS, dtype=dtype)
    assert fast.dtype == torch.float32
    assert abs(fast.item() - exact.item()) <= BF16_TOLERANCE * max(1.0, abs(exact.item()))
    (grad,) = torch.autograd.grad(fast, x)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert reward.autocast_dtype is None  # the reward's own precision is restored
    # checkpoint recomputation replays the autocast state: same low-precision gradients
    (ckpt_grad,) = torch.autograd.grad(reward_loss(reward, x, PROMPTS, dtype=dtype, checkpoint=True), x)
    assert torch.equal(ckpt_grad, grad)


def test_fp32_override_of_a_fast_reward_is_refused(tiny_root) -> None:
    # The fast mode holds its matmul weights in bf16 (precision.cast_matmul_weights): an fp32 loss from it
    # would not be the exact model's, so it is refused with the fix instead of silently differing.
    fast = rkt.load_tiny("pickscore", tiny_root / "upstream", dtype="bf16")
    with pytest.raises(ValueError, match="holds torch.bfloat16 weights.*dtype=None"):
        reward_loss(fast, images(), PROMPTS, dtype="fp32")
    assert fast.autocast_dtype == torch.bfloat16


def test_fp32_override_inside_a_bf16_step_equals_the_exact_loss(tiny_root) -> None:
    exact = rkt.load_tiny("pickscore", tiny_root / "upstream")
    x = images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = reward_loss(exact, x, PROMPTS, dtype="fp32")
    assert torch.equal(inside, reward_loss(exact, x, PROMPTS))


@pytest.mark.parametrize("name", ["pickscore", "hpsv2"])
def test_checkpointing_same_gradients_fewer_saved_activations(tiny_reward, name: str) -> None:
    reward = tiny_reward(name)
    assert not reward.training  # rewards stay in eval mode, where HF's own checkpointing is inactive
    x = images()
    with saved_activations(exclude=reward) as plain_stats:
        plain = reward_loss(reward, x, PROMPTS)
    (plain_grad,) = torch.autograd.grad(plain, x)
    with saved_activations(exclude=reward) as ckpt_stats:
        ckpt = reward_loss(reward, x, PROMPTS, checkpoint=True)
    (ckpt_grad,) = torch.autograd.grad(ckpt, x)
    assert torch.equal(plain, ckpt) and torch.equal(plain_grad, ckpt_grad)
    assert 0 < ckpt_stats.bytes <= MAX_CHECKPOINT_RATIO * plain_stats.bytes, (ckpt_stats, plain_stats)
    assert ckpt_stats.count < plain_stats.count
    assert all("forward" not in block.__dict__ for block in find_checkpoint_blocks(reward))  # restored


def test_checkpointing_imagereward_blip_towers(tmp_path) -> None:
    """ReFL's reward: BLIP ViT blocks and the image-grounded text encoder layers are both checkpointed."""
    from rewardkit.rewards.imagereward import load
    from rewardkit.testing.imagereward import tiny_imagereward

    reward = load(**tiny_imagereward(tmp_path))
    blocks = find_checkpoint_blocks(reward)
    assert len(blocks) == len(reward.net.visual_encoder.blocks) + len(reward.net.text_encoder.encoder.layer)
    x = images(2)
    with saved_activations(exclude=reward) as plain_stats:
        plain = torch.autograd.grad(reward_loss(reward, x, PROMPTS[:2]), x)[0]
    with saved_activations(exclude=reward) as ckpt_stats:
        ckpt = torch.autograd.grad(reward_loss(reward, x, PROMPTS[:2], checkpoint=True), x)[0]
    assert torch.equal(plain, ckpt) and ckpt_stats.bytes < plain_stats.bytes


def test_checkpointed_blocks_are_recomputed_in_backward(tiny_reward) -> None:
    reward = tiny_reward("hpsv2")
    block = find_checkpoint_blocks(reward)[0]
    calls = []  # hooks of the block itself stay outside the checkpoint: watch its first sub-layer
    handle = next(block.children()).register_forward_hook(lambda *args: calls.append(torch.is_grad_enabled()))
    try:
        loss = reward_loss(reward, images(), PROMPTS, checkpoint=True)
        assert len(calls) == 1
        loss.backward()
        assert len(calls) == 2  # the recomputation in the backward pass
    finally:
        handle.remove()


def test_checkpoint_finds_each_shared_tower_once(tiny_reward) -> None:
    pick, hps = tiny_reward("pickscore"), tiny_reward("hpsv2")
    both = compose({pick: 1.0, hps: 1.0})
    assert len(find_checkpoint_blocks(both)) == len(find_checkpoint_blocks(pick)) + len(find_checkpoint_blocks(hps))
    x = images()
    plain = torch.autograd.grad(reward_loss(both, x, PROMPTS), x)[0]
    ckpt = torch.autograd.grad(reward_loss(both, x, PROMPTS, checkpoint=True), x)[0]
    assert torch.equal(plain, ckpt)


def test_gradient_checkpointing_nests_and_needs_blocks(tiny_reward) -> None:
    reward = tiny_reward("pickscore")
    blocks = find_checkpoint_blocks(reward)
    with gradient_checkpointing(reward):
        inner = blocks[0].__dict__["forward"]
        with gradient_checkpointing(reward):
            assert blocks[0].__dict__["forward"] is inner  # not wrapped twice
        assert blocks[0].__dict__["forward"] is inner
    assert "forward" not in blocks[0].__dict__
    with pytest.raises(ValueError, match="no image-tower blocks"):
        reward_loss(Brightness(), images(), checkpoint=True)


def test_non_differentiable_reward_is_refused() -> None:
    with pytest.raises(TypeError, match="not differentiable"):
        reward_loss(Frozen(), images())
    with pytest.raises(TypeError, match="no 'differentiable' attribute"):
        reward_loss(lambda images, prompts=None: images.mean(dim=(1, 2, 3)), images())


def test_reward_that_cuts_the_graph_is_reported() -> None:
    with pytest.raises(RuntimeError, match="carry no gradient"):
        reward_loss(Detaching(), images())


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="reduction"):
        reward_loss(Brightness(), images(), reduction="max")
    with pytest.raises(ValueError, match="nan_policy"):
        reward_loss(Brightness(), images(), nan_policy="skip")
    with pytest.raises(ValueError, match="scale"):
        reward_loss(Brightness(), images(), scale=float("inf"))


def nan_batch() -> torch.Tensor:
    x = torch.full((3, 3, 8, 8), 0.25)
    x[1] = 0.75  # row 1 scores sqrt(-0.25) = NaN
    return x.requires_grad_(True)


def test_nan_rows_raise_by_default() -> None:
    with pytest.raises(ValueError, match=r"rows \[1\].*nan_policy='mask'"):
        reward_loss(SqrtBelowHalf(), nan_batch())


def test_nan_rows_masked_out_of_loss_and_gradient() -> None:
    x = nan_batch()
    loss = reward_loss(SqrtBelowHalf(), x, nan_policy="mask")
    torch.testing.assert_close(loss, torch.tensor(-0.5))  # mean of the two finite rows, sqrt(0.25)
    loss.backward()
    assert torch.isfinite(x.grad).all()  # the reward's own backward gives NaN for row 1
    assert torch.equal(x.grad[1], torch.zeros_like(x.grad[1]))
    assert (x.grad[[0, 2]] != 0).all()
    per_row = reward_loss(SqrtBelowHalf(), x, nan_policy="mask", reduction="none")
    assert torch.isnan(per_row[1]) and torch.equal(per_row[[0, 2]], torch.tensor([-0.5, -0.5]))


def test_all_nan_rows_raise_under_mask() -> None:
    x = torch.full((2, 3, 8, 8), 0.75, requires_grad=True)
    with pytest.raises(ValueError, match="every row"):
        reward_loss(SqrtBelowHalf(), x, nan_policy="mask")
