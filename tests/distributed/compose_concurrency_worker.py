"""Toy rewards and scenarios for the concurrency rule of ``rk.compose`` (tests/test_compose_concurrency.py).

Run directly under ``torch.distributed.run`` with 2 CPU ranks (gloo), each rank scores its own batches
sequentially, through an 8-worker ``ThreadPoolExecutor`` (reserved tickets, and flow_grpo's pattern of
one submission per sampled batch) and through ``AsyncRewardScorer``, with rank-dependent random delays
inside a part, and writes every outcome to ``<out>.<rank>``.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

import rewardkit as rk
from rewardkit.integrations.async_scoring import AsyncRewardScorer
from rewardkit.protocols import Reward, RewardOutput

BATCHES, ROWS, SIDE = 6, 4, 8
FAIL_ROWS = 5  # a batch of this many rows makes Jittery raise (a deterministic, content-chosen failure)
MAX_DELAY_S = 0.01  # random sleep inside a part, so calls finish in a random order
WORKERS = 8  # flow_grpo: futures.ThreadPoolExecutor(max_workers=8)
WAIT_S = 60.0  # bound for events that fire at once; hitting it fails the run instead of hanging it
WEIGHTS = {"red": 1.0, "contrast": -0.5}


class Jittery(Reward):
    """Channel mean x ``scale``, NaN where the top-left pixel of the channel is above 0.9; sleeps a random
    time first. Thread-safe (its RNG is locked), so a composition runs concurrent calls in parallel."""

    requires_prompt, differentiable, thread_safe = False, False, True

    def __init__(self, name: str, channel: int, scale: float, seed: int) -> None:
        super().__init__()
        self.name, self.channel, self.scale = name, channel, scale
        self._rng, self._rng_lock = random.Random(seed), threading.Lock()
        self.started = threading.Semaphore(0)  # released when a call starts scoring (it has its ticket)

    def score(self, images, prompts, **context):
        self.started.release()
        if images.shape[0] == FAIL_ROWS:
            raise ValueError(f"{self.name}: this toy reward refuses batches of {FAIL_ROWS} rows")
        with self._rng_lock:
            delay = self._rng.uniform(0.0, MAX_DELAY_S)
        time.sleep(delay)
        channel = images[:, self.channel]
        values = channel.mean(dim=(1, 2)) * self.scale
        return RewardOutput(torch.where(channel[:, 0, 0] > 0.9, torch.nan, values).float())


def make_reward(seed: int) -> rk.ComposedReward:
    parts = {Jittery("red", 0, 3.0, seed): WEIGHTS["red"], Jittery("contrast", 2, 7.0, seed + 1): WEIGHTS["contrast"]}
    return rk.compose(parts, normalize="zscore")


def make_batches(rank: int, fail_index: int | None) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + rank)
    return [torch.rand(FAIL_ROWS if k == fail_index else ROWS, 3, SIDE, SIDE, generator=generator)
            for k in range(BATCHES)]


def outcome(call) -> rk.RewardOutput | str:
    try:
        return call()
    except ValueError as error:
        return f"error: {error}"


def sequential(reward, batches) -> list:
    return [outcome(lambda x=x: reward.evaluate(x)) for x in batches]


def pool_reserved(reward, batches) -> list:
    """Every batch in flight at once; each reserves its place in the submitting thread."""
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = [pool.submit(reward.evaluate, x, ticket=reward.reserve()) for x in batches]
        return [outcome(f.result) for f in futures]


def pool_flow_grpo(reward, batches) -> list:
    """flow_grpo's pattern: ``executor.submit(reward_fn, images)`` once per sampled batch, no ticket, results
    later. Sampling the next batch takes time; here the next submission waits until the previous call
    has started scoring (so calls enter in submission order), and delays make them finish in any order."""
    first = reward.parts["red"]
    futures: list[Future] = []
    with ThreadPoolExecutor(WORKERS) as pool:
        for x in batches:
            futures.append(pool.submit(reward.evaluate, x))
            assert first.started.acquire(timeout=WAIT_S), "a submitted call never started"
        return [outcome(f.result) for f in futures]


def async_scorer(reward, batches) -> list:
    with AsyncRewardScorer(reward, max_workers=WORKERS) as scorer:
        futures = [scorer.submit_evaluate(x) for x in batches]
        return [outcome(f.result) for f in futures]


SCENARIOS = {"pool_reserved": pool_reserved, "pool_flow_grpo": pool_flow_grpo, "async_scorer": async_scorer}


def bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (``torch.equal`` on the bytes, so NaN rows compare too)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


def same(a, b) -> bool:
    """Bit-for-bit equal outcomes (totals, every detail) or the same error."""
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return bits(a.scores, b.scores) and a.details.keys() == b.details.keys() and all(
        bits(a.details[k], b.details[k]) for k in a.details)


def as_json(results: list) -> list:
    return [r if isinstance(r, str) else {"total": r.scores.tolist(), **{k: v.tolist() for k, v in r.details.items()}}
            for r in results]


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    batches = make_batches(rank, fail_index=3 if rank == 0 else None)  # only rank 0's 4th call fails
    reference = make_reward(seed=rank)
    expected = sequential(reference, batches)
    report = {"sequential": as_json(expected), "state": {k: v.item() for k, v in reference.state_dict().items()}}
    for label, scenario in SCENARIOS.items():
        reward = make_reward(seed=100 * rank + len(label))  # rank-dependent delays
        got = scenario(reward, batches)
        same_state = all(bits(v, reward.state_dict()[k]) for k, v in reference.state_dict().items())
        report[label] = {"equal": [same(a, b) for a, b in zip(got, expected)], "same_state": same_state}
    with open(f"{out_path}.{rank}", "w") as handle:
        json.dump(report, handle)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
