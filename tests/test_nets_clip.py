"""CLIP adapters and the prompt-embedding cache."""

from __future__ import annotations

import torch

import rewardkit.testing as rkt
from rewardkit.nets.clip import PromptEmbeddingCache


def test_grpo_batch_encodes_each_distinct_prompt_once(tiny_root) -> None:
    reward = rkt.load_tiny("pickscore", tiny_root / "cache-count")
    calls: list[list[str]] = []
    original = reward.towers.encode_text

    def counting(texts):
        calls.append(list(texts))
        return original(texts)

    reward.towers.encode_text = counting
    prompts = [f"prompt {i}" for i in range(8) for _ in range(4)]  # 8 prompts x group of 4
    images = rkt.random_images(32, 32, 32)
    first = reward(images, prompts)
    assert calls == [[f"prompt {i}" for i in range(8)]]
    second = reward(images, prompts)  # the next epoch re-uses the cache
    assert len(calls) == 1
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_cached_embeddings_equal_fresh_ones(tiny_reward) -> None:
    reward = tiny_reward("bioclip")
    fresh = torch.nn.functional.normalize(reward.towers.encode_text(["an owl", "a cat"]).float(), dim=-1)
    cached = reward.text_embeds(["an owl", "a cat", "an owl"])
    torch.testing.assert_close(cached, fresh[[0, 1, 0]].detach(), rtol=1e-6, atol=1e-7)


def test_cache_is_bounded_and_cleared_on_move() -> None:
    cache = PromptEmbeddingCache(max_size=3)
    cache.lookup(["a", "b", "c", "d"], "fp32", lambda texts: torch.randn(len(texts), 2))
    assert len(cache) == 3
    cache.clear()
    assert len(cache) == 0


def test_moving_a_reward_clears_its_cache(tiny_root) -> None:
    reward = rkt.load_tiny("hpsv2", tiny_root / "cache-move")
    reward(rkt.random_images(2, 32, 32), "an owl")
    assert len(reward.prompt_cache) == 1
    reward.to(torch.float32)
    assert len(reward.prompt_cache) == 0
