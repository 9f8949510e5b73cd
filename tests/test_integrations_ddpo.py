"""The DDPO contract, called the way ddpo-pytorch / flow_grpo and trl 0.23's DDPOTrainer call it.

trl 0.23's reward calls are reproduced here from ``trl/trainer/ddpo_trainer.py`` (0.23.1) ``compute_rewards``:
sync ``reward, meta = fn(images, prompts, metadata)`` then ``torch.as_tensor``; async
``executor.map(lambda x: fn(*x), batches)`` then ``.result()`` on both values. The real DDPOTrainer runs
these paths in tests/legacy_trl023 (its own environment: trl 0.24 removed DDPO).
"""

from __future__ import annotations

import pickle
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import rewardkit.testing as rkt
from rewardkit.compose import compose
from rewardkit.integrations.ddpo import as_ddpo_reward
from rewardkit.protocols import Reward, RewardOutput

PROMPTS = ("a photo of a cat", "a red car on a road", "a bowl of fruit", "an owl")
METADATA = ({}, {}, {}, {})


def test_ddpo_pytorch_style_submit_and_result(tiny_reward) -> None:
    reward = tiny_reward("hpsv2")
    images = rkt.random_images(4, 32, 32)
    fn = as_ddpo_reward(reward)
    with ThreadPoolExecutor(max_workers=1) as executor:  # ddpo-pytorch scripts/train.py
        rewards, info = executor.submit(fn, images, PROMPTS, METADATA).result()
    torch.testing.assert_close(rewards, reward(images, list(PROMPTS)))
    assert isinstance(info, dict) and fn.__name__ == "hpsv2"
    assert not rewards.requires_grad


def test_trl_ddpo_sync_contract(tiny_reward) -> None:
    fn = as_ddpo_reward(compose({tiny_reward("pickscore"): 1.0, tiny_reward("aesthetic"): 0.5}))
    images = rkt.random_images(4, 32, 32)
    reward, reward_metadata = fn(images, PROMPTS, METADATA)  # compute_rewards, sync path
    rewards = torch.as_tensor(reward, device="cpu")
    assert rewards.shape == (4,) and set(reward_metadata) >= {"pickscore", "aesthetic"}


def test_trl_ddpo_async_contract_returns_futures(tiny_reward) -> None:
    reward = tiny_reward("pickscore")
    batches = [(rkt.random_images(4, 32, 32, seed=s), PROMPTS, METADATA) for s in range(3)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        fn = as_ddpo_reward(reward, executor=pool)
        results = list(pool.map(lambda x: fn(*x), batches))  # DDPOTrainer, async_reward_computation=True
        rewards = [r.result() for r, _ in results]
        metadata = [m.result() for _, m in results]
    for (images, prompts, _), value in zip(batches, rewards):
        torch.testing.assert_close(value, reward(images, list(prompts)))
    assert all(isinstance(m, dict) for m in metadata)


def test_async_errors_reach_both_futures(tiny_reward) -> None:
    with ThreadPoolExecutor(max_workers=1) as pool:
        rewards, info = as_ddpo_reward(tiny_reward("pickscore"), executor=pool)(rkt.random_images(2, 32, 32), PROMPTS, METADATA)
        with pytest.raises(ValueError, match="one prompt or 2 prompts"):
            rewards.result()
        with pytest.raises(ValueError):
            info.result()


def test_wrapper_pickles_and_rejects_non_callables(tiny_reward) -> None:
    with ThreadPoolExecutor(max_workers=1) as pool:
        fn = as_ddpo_reward(tiny_reward("hpsv2"), executor=pool)
        clone = pickle.loads(pickle.dumps(fn))
    assert clone.executor is None and clone.__name__ == "hpsv2"
    with pytest.raises(TypeError, match="RewardFn"):
        as_ddpo_reward(3)


class _DarkRowsUnscorable(Reward):
    """Mean brightness, NaN (with a reason) for images darker than 0.5: a reward with unscorable rows."""

    name = "dark-rows-unscorable"
    differentiable = False
    requires_prompt = False

    def score(self, images, prompts, **context):
        brightness = images.mean(dim=(1, 2, 3))
        dark = brightness < 0.5
        failure = ["too dark to score" if d else None for d in dark.tolist()]
        return RewardOutput(torch.where(dark, torch.full_like(brightness, float("nan")), brightness),
                            {"failure": failure})


def _half_dark() -> torch.Tensor:
    images = torch.full((3, 3, 8, 8), 0.8)
    images[1] = 0.1
    return images


def test_nan_rows_raise_with_their_reason_by_default() -> None:
    fn = as_ddpo_reward(_DarkRowsUnscorable())
    with pytest.raises(ValueError, match=r"rows \[1\].*too dark to score.*nan_value"):
        fn(_half_dark(), PROMPTS[:3], METADATA[:3])
    with ThreadPoolExecutor(max_workers=1) as pool:  # the futures variant raises on .result()
        rewards, info = as_ddpo_reward(_DarkRowsUnscorable(), executor=pool)(_half_dark(), PROMPTS[:3], METADATA[:3])
        with pytest.raises(ValueError, match="too dark"):
            rewards.result()


def test_nan_value_replaces_unscorable_rows_and_lists_them() -> None:
    rewards, info = as_ddpo_reward(_DarkRowsUnscorable(), nan_value=-1.0)(_half_dark(), PROMPTS[:3], METADATA[:3])
    assert rewards.tolist() == pytest.approx([0.8, -1.0, 0.8])
    assert info["failures"] == {1: "too dark to score"}
    # trl 0.23 / ddpo-pytorch z-score the batch: finite now.
    assert torch.isfinite((rewards - rewards.mean()) / (rewards.std() + 1e-8)).all()
    with pytest.raises(ValueError, match="finite"):
        as_ddpo_reward(_DarkRowsUnscorable(), nan_value=float("inf"))


def test_calls_from_many_threads_equal_sequential_calls(tiny_reward) -> None:
    fn = as_ddpo_reward(tiny_reward("pickscore"))
    batches = [rkt.random_images(4, 32, 32, seed=s) for s in range(6)]
    with ThreadPoolExecutor(max_workers=8) as pool:  # flow_grpo's pool size; ddpo-pytorch uses 2
        futures = [pool.submit(fn, images, PROMPTS, METADATA) for images in batches]
        threaded = [f.result()[0] for f in futures]
    for images, value in zip(batches, threaded):
        assert torch.equal(value, fn(images, PROMPTS, METADATA)[0])
    clone = pickle.loads(pickle.dumps(fn))
    assert clone._lock is not None and clone.nan_value is None
