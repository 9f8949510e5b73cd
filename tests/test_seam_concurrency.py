"""The trainer adapters keep the concurrency rule: a z-score composition called through ``as_ddpo_reward``
(with trl 0.23's executor) or ``as_flow_grpo_reward`` (from flow_grpo's 8-worker pool) gives the sequential
run's numbers bit for bit. The toy parts sleep a random time, so calls finish in a random order
(tests/distributed/compose_concurrency_worker.py). Nothing is timed.
"""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from rewardkit.integrations.ddpo import as_ddpo_reward
from rewardkit.integrations.flow_grpo import as_flow_grpo_reward

_spec = importlib.util.spec_from_file_location(
    "compose_concurrency_worker", Path(__file__).parent / "distributed" / "compose_concurrency_worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

pytestmark = pytest.mark.filterwarnings("ignore:.*no applicable:UserWarning")
REPEATS = 3  # each repeat draws new random delays
NAN_VALUE = -1.0  # toy rows where both parts are NaN


def _sequential_totals(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    reward = worker.make_reward(seed=0)
    return [torch.nan_to_num(reward(x), nan=NAN_VALUE) for x in batches]


@pytest.mark.parametrize("repeat", range(REPEATS))
def test_ddpo_executor_follows_submission_order(repeat: int) -> None:
    batches = worker.make_batches(rank=repeat, fail_index=None)
    expected = _sequential_totals(batches)
    with ThreadPoolExecutor(worker.WORKERS) as pool:  # trl 0.23 async_reward_computation: all batches in flight
        reward_fn = as_ddpo_reward(worker.make_reward(seed=0), executor=pool, nan_value=NAN_VALUE)
        futures = [reward_fn(x, [""] * x.shape[0], [{}] * x.shape[0]) for x in batches]
        got = [rewards.result() for rewards, _info in futures]
    assert all(worker.bits(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("repeat", range(REPEATS))
def test_flow_grpo_pool_gives_the_sequential_numbers(repeat: int) -> None:
    batches = worker.make_batches(rank=repeat, fail_index=None)
    expected = _sequential_totals(batches)
    composed = worker.make_reward(seed=0)
    reward_fn = as_flow_grpo_reward(composed, nan_value=NAN_VALUE)
    first = composed.parts["red"]
    futures = []
    with ThreadPoolExecutor(worker.WORKERS) as pool:  # flow_grpo train_sd3.py: executor.submit(reward_fn, ...)
        for x in batches:
            futures.append(pool.submit(reward_fn, x, [""] * x.shape[0], [{}] * x.shape[0], only_strict=True))
            assert first.started.acquire(timeout=worker.WAIT_S)  # the next batch is sampled meanwhile
        got = [torch.tensor(f.result()[0]["avg"], dtype=torch.float64) for f in futures]
    assert all(torch.equal(a, b.double()) for a, b in zip(got, expected))
