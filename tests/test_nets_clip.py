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
    try:
        cached = reward.text_embeds(["an owl", "a cat", "an owl"])
        torch.testing.assert_close(cached, fresh[[0, 1, 0]].detach(), rtol=1e-6, atol=1e-7)
    finally:
        # The reward is the session's: leave no embedding encoded in this batch shape behind (a later exact
        # comparison would read it, 1.9e-6 away from one encoded in another batch size).
        reward.prompt_cache.clear()


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


def test_replaced_weights_at_the_same_path_are_loaded_again(tmp_path) -> None:
    """Issue 13.3: the shared tower cache must not serve the old weights after the folder's files changed."""
    import shutil

    import rewardkit as rk
    from rewardkit.testing.clip import tiny_pickscore

    images = rkt.random_images(3, 32, 32, seed=7)
    first_kwargs = tiny_pickscore(tmp_path / "a", seed=1)
    first = rk.load("pickscore", **first_kwargs)
    old = first(images, "an owl")
    # Replace the folder's content (another seed) at the same path while the first reward is still alive.
    other = tiny_pickscore(tmp_path / "b", seed=11)["weights"]
    shutil.rmtree(first_kwargs["weights"])
    shutil.copytree(other, first_kwargs["weights"])
    second = rk.load("pickscore", **first_kwargs)
    assert second.towers is not first.towers
    new = second(images, "an owl")
    fresh = rk.load("pickscore", weights=other)(images, "an owl")
    assert not torch.allclose(old, new)
    torch.testing.assert_close(new, fresh, rtol=0, atol=0)
    # Unchanged files still share one tower.
    assert rk.load("pickscore", **first_kwargs).towers is second.towers


def test_content_key_changes_when_a_file_is_rewritten_or_replaced(tmp_path) -> None:
    import os

    from rewardkit.rewards.clip_common import content_key

    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"0" * 64)
    before = content_key(path)
    assert content_key(path) == before  # stable while nothing changes
    replacement = tmp_path / "new.safetensors"
    replacement.write_bytes(b"1" * 64)  # same size
    os.replace(replacement, path)  # a new inode at the same path
    replaced = content_key(path)
    assert replaced != before
    stat = path.stat()
    path.write_bytes(b"2" * 64)  # rewritten in place, same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert content_key(path) != replaced
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    folder_key = content_key(folder)
    (folder / "model.safetensors").write_bytes(b"3")
    assert content_key(folder) != folder_key
