"""The CLIP family's prompt-embedding cache under worker threads (trainers score from thread pools)."""

from __future__ import annotations

import pickle
import threading

import torch

from rewardkit.nets.clip import PromptEmbeddingCache


def _encode(prompts: list[str]) -> torch.Tensor:
    # A deterministic embedding per prompt, so that every lookup can be checked.
    return torch.tensor([[float(int(p[1:])), 1.0] for p in prompts])


def test_lookups_from_many_threads_while_evicting_return_the_right_rows():
    cache = PromptEmbeddingCache(max_size=3)  # tiny: almost every lookup evicts
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for step in range(300):
                prompts = [f"p{(worker * 7 + step) % 11}", f"p{step % 5}"]
                rows = cache.lookup(prompts, "fp32", _encode)
                assert torch.equal(rows, _encode(prompts))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(cache) <= 3


def test_pickled_cache_is_empty_and_usable():
    cache = PromptEmbeddingCache(max_size=5)
    cache.lookup(["p1"], "fp32", _encode)
    copy = pickle.loads(pickle.dumps(cache))
    assert len(copy) == 0 and copy.max_size == 5
    assert torch.equal(copy.lookup(["p2"], "fp32", _encode), _encode(["p2"]))
