"""The DDPO contract, called the way ddpo-pytorch / flow_grpo and trl 0.23's DDPOTrainer call it.

trl 0.23 (the last release with DDPOTrainer) needs a diffusers SD pipeline and peft to construct; its
reward calls are reproduced exactly from ``trl/trainer/ddpo_trainer.py`` (0.23.1) ``compute_rewards``:
sync ``reward, meta = fn(images, prompts, metadata)`` then ``torch.as_tensor``; async
``executor.map(lambda x: fn(*x), batches)`` then ``.result()`` on both values.
"""

from __future__ import annotations

import pickle
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import rewardkit.testing as rkt
from rewardkit.compose import compose
from rewardkit.integrations.ddpo import as_ddpo_reward

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
