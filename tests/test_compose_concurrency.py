"""The concurrency rule of ``rk.compose``: a z-score composition gives the sequential run's results bit for
bit however many threads call it and in whatever order they finish, on one process and on two (gloo).

Toy parts sleep a random time (tests/distributed/compose_concurrency_worker.py), so calls finish in a
random order; flow_grpo's ``ThreadPoolExecutor(max_workers=8)`` pattern and ``AsyncRewardScorer`` are
both exercised. Nothing is timed.
"""

from __future__ import annotations

import importlib.util
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import rewardkit as rk
from rewardkit.compose import ZSCORE_EPS
from rewardkit.protocols import Reward, RewardOutput

_spec = importlib.util.spec_from_file_location(
    "compose_concurrency_worker", Path(__file__).parent / "distributed" / "compose_concurrency_worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

pytestmark = pytest.mark.filterwarnings("ignore:.*no applicable:UserWarning")  # toy rows where both parts are NaN

REPEATS = 4  # each repeat draws new random delays
PORT = 29531


@pytest.mark.parametrize("scenario", sorted(worker.SCENARIOS))
def test_threads_give_the_sequential_result_bit_for_bit(scenario: str) -> None:
    batches = worker.make_batches(rank=0, fail_index=3)  # the 4th call raises: it must still pass its turn
    expected = worker.sequential(worker.make_reward(seed=0), batches)
    assert isinstance(expected[3], str) and all(not isinstance(r, str) for i, r in enumerate(expected) if i != 3)
    for repeat in range(REPEATS):
        reward = worker.make_reward(seed=repeat + 1)
        got = worker.SCENARIOS[scenario](reward, batches)
        assert [worker.same(a, b) for a, b in zip(got, expected)] == [True] * worker.BATCHES, repeat
        assert reward.stats["red"].count.item() == sum(torch.isfinite(r.details["red"]).sum().item()
                                                       for r in expected if not isinstance(r, str))


def test_two_processes_match_their_sequential_runs_and_the_float64_formula(run_two_processes) -> None:
    ranks = run_two_processes("compose_concurrency_worker.py", PORT)
    for rank, report in enumerate(ranks):
        for label in worker.SCENARIOS:
            assert report[label] == {"equal": [True] * worker.BATCHES, "same_state": True}, (rank, label)
    # The sequential runs themselves, derived independently: call k of both ranks is one all-reduce, so the
    # statistics after call k hold every finite raw score of calls 0..k on both ranks (a failed call adds none).
    seen: dict[str, list[float]] = {name: [] for name in worker.WEIGHTS}
    for k in range(worker.BATCHES):
        rows = [report["sequential"][k] for report in ranks]
        for row in rows:
            if not isinstance(row, str):
                for name in worker.WEIGHTS:
                    seen[name] += [v for v in row[name] if math.isfinite(v)]
        for rank, row in enumerate(rows):
            if isinstance(row, str):
                assert rank == 0 and k == 3 and "refuses" in row
                continue
            np.testing.assert_allclose(row["total"], _expected_total(row, seen), rtol=1e-5, atol=1e-5)


def _expected_total(row: dict, seen: dict[str, list[float]]) -> list[float]:
    """nan_policy='skip': the weighted sum of the applicable parts, rescaled to the full weight mass."""
    full = sum(abs(w) for w in worker.WEIGHTS.values())
    totals = []
    for i in range(len(row["total"])):
        total, mass = 0.0, 0.0
        for name, weight in worker.WEIGHTS.items():
            values = np.asarray(seen[name], dtype=np.float64)
            if math.isfinite(row[name][i]):
                total += weight * (row[name][i] - values.mean()) / (values.std() + ZSCORE_EPS)
                mass += abs(weight)
        totals.append(total * full / mass if mass else math.nan)
    return totals


class Gate(Reward):
    """Scores 1.0 per row once ``release`` is set; records that it started."""

    name, requires_prompt, differentiable, thread_safe = "gate", False, False, True

    def __init__(self) -> None:
        super().__init__()
        self.started, self.release = threading.Semaphore(0), threading.Event()

    def score(self, images, prompts, **context):
        self.started.release()
        assert self.release.wait(worker.WAIT_S), "never released"
        return RewardOutput(images.mean(dim=(1, 2, 3)).float())


def test_later_calls_wait_for_earlier_tickets_and_released_tickets_pass_the_turn() -> None:
    gate = Gate()
    reward = rk.compose({gate: 1.0}, normalize="zscore")
    first, skipped, images = reward.reserve(), reward.reserve(), torch.rand(2, 3, 4, 4)
    with ThreadPoolExecutor(2) as pool:
        later = pool.submit(reward.evaluate, images)  # ticket 2: scores, then waits for tickets 0 and 1
        assert gate.started.acquire(timeout=worker.WAIT_S)
        gate.release.set()
        skipped.release()  # ticket 1 is given up (a cancelled job)
        assert not later.done() and reward.stats["gate"].count.item() == 0  # still waiting for ticket 0
        earlier = pool.submit(reward.evaluate, images, ticket=first)
        assert earlier.result(timeout=worker.WAIT_S).details["gate"].shape == (2,)
        later.result(timeout=worker.WAIT_S)
    assert reward.stats["gate"].count.item() == 4
    with pytest.raises(ValueError, match="already used"):
        reward(images, ticket=first)
    with pytest.raises(TypeError, match="reserve"):
        reward(images, ticket=3)


def test_frozen_statistics_with_explicit_updates_do_not_depend_on_order() -> None:
    batches = worker.make_batches(rank=0, fail_index=None)

    def run(order: list[int]) -> tuple[list[torch.Tensor], dict]:
        reward = worker.make_reward(seed=order[0])
        reward.update_statistics(reward.evaluate(batches[0]).details)  # warm-up statistics
        reward.update_stats = False
        with ThreadPoolExecutor(worker.WORKERS) as pool:
            futures = {k: pool.submit(reward.evaluate, batches[k]) for k in order}
            outputs = [futures[k].result() for k in range(len(batches))]
        for out in outputs:  # the explicit step, in an order the caller chose
            reward.update_statistics(out.details)
        return [out.scores for out in outputs], reward.state_dict()

    forward, state = run(list(range(worker.BATCHES)))
    backward, state_back = run(list(reversed(range(worker.BATCHES))))
    assert all(worker.bits(a, b) for a, b in zip(forward, backward))
    assert all(worker.bits(state[k], state_back[k]) for k in state)
    with pytest.raises(ValueError, match="missing"):
        worker.make_reward(0).update_statistics({"red": torch.zeros(2)})
