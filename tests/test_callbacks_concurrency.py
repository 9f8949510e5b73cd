"""Concurrency proof for the evaluation callbacks (DESIGN "Concurrency rule"): their results never depend
on threads or on when each rank reaches a collective.

* Two gloo ranks evaluate ``RewardEvalCallback`` (tiny CLIP aesthetic composed with two toy parts, with the
  reward-hacking alarm), ``FIDEvalCallback`` (pixel features) and a ``RewardEvalCallback`` of a z-score
  composition while the first composed reward scores training batches on a 3-thread pool, with
  rank-dependent sleeps; the z-score composition is trained on the pool too (ticketed, all-reducing),
  resolved before each evaluation. The logged values equal one sequential process: bit for bit for the
  rewards' raw parts, correlations and alarm (rows are all-reduced, then reduced identically), within
  stated float64-order tolerances for FID and for anything read through z-score statistics (their sums
  add the ranks' shares in another order); the ranks agree bit for bit.
* A z-score composition called by a training thread *during* an evaluation still folds that batch into its
  running statistics: the evaluation never flips the shared ``update_stats`` flag (the bug this replaced).
"""

from __future__ import annotations

import importlib.util
import math
import sys
import threading
from pathlib import Path

import pytest
import torch

import rewardkit as rk
import rewardkit.testing as rkt
from recipe_harness import free_port
from rewardkit.integrations.callbacks import RewardEvalCallback
from rewardkit.protocols import Reward, RewardOutput

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

_spec = importlib.util.spec_from_file_location(
    "callbacks_concurrency_worker", Path(__file__).parent / "distributed" / "callbacks_concurrency_worker.py")
_dist = Path(__file__).parent / "distributed"
sys.path.insert(0, str(_dist))  # the worker imports its sibling callbacks_worker, as under torchrun
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)
sys.path.remove(str(_dist))

# FID: each rank sums its shard's float64 (n, Σx, Σxxᵀ), then one all-reduce adds the two partial sums;
# one process adds the same rows one by one. Same terms, other association: float64 rounding only
# (measured: see the report in the assertion message). Rewards need no tolerance.
FID_REL_TOL = 1e-9
TRAIN_REWARD_REL_TOL = 1e-12  # per-rank exactly rounded sums (math.fsum), then one float64 addition
FLOAT64_ORDER_REL_TOL = 1e-12  # z-score moments: (sum of rank 0) + (sum of rank 1) vs one pass over both
# z-scores are float32: statistics that differ in the last float64 bits may round a score differently
ZSCORE_REL_TOL = 1e-6


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def _sequential(tmp_path: Path) -> tuple[dict, dict, dict]:
    """The same callbacks in one process, no threads, in the worker's order at every step: the z-score
    training batches (both ranks' batch ``i`` in one call, as their all-reduce folds them together), the
    evaluations (steps 2 and 4), then the stateless training batches, recorded for the alarm."""
    callbacks = worker.build(tmp_path / "tiny")
    reward, zreward = callbacks["reward"].reward, callbacks["zscore"].reward
    results, train = {name: {} for name in callbacks}, {}
    for step in range(1, worker.STEPS + 1):
        for index in range(worker.JOBS_PER_STEP):
            batches = [worker.training_batch(rank, step, index) for rank in (0, 1)]
            scores = zreward(torch.cat([b[0] for b in batches]), batches[0][1] + batches[1][1]).tolist()
            for rank, batch in enumerate(batches):
                size = batch[0].shape[0]
                train[(rank, f"z{step}/{index}")] = scores[rank * size : (rank + 1) * size]
        for name, callback in callbacks.items():
            values = callback.maybe_evaluate(step)
            if values is not None:
                results[name][str(step)] = values
        for rank in (0, 1):
            for index in range(worker.JOBS_PER_STEP):
                images, prompts = worker.training_batch(rank, step, index)
                scores = reward(images, prompts).tolist()
                train[(rank, f"{step}/{index}")] = scores
                callbacks["reward"].record_train_reward(torch.tensor(scores))
    state = {k: v.tolist() for k, v in zreward.state_dict().items()}
    return results, train, state


def test_two_ranks_with_a_scoring_thread_pool_equal_one_sequential_process(run_two_processes, tmp_path) -> None:
    ranks = run_two_processes("callbacks_concurrency_worker.py", free_port())
    expected, train, zstate = _sequential(tmp_path)
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["results"] == ranks[1]["results"]  # bit for bit across ranks, FID included
    assert ranks[0]["zscore_state"] == ranks[1]["zscore_state"]
    for key, value in zstate.items():  # each rank's moments summed by the all-reduce vs one pass over both
        assert ranks[0]["zscore_state"][key] == pytest.approx(value, rel=FLOAT64_ORDER_REL_TOL), key
    for rank in ranks:
        for key, scores in rank["train"].items():
            if key.startswith("z"):  # float32 z-scores of statistics equal up to float64 order
                assert scores == pytest.approx(train[(rank["rank"], key)], rel=ZSCORE_REL_TOL, abs=ZSCORE_REL_TOL)
            else:  # the pool's stateless scores equal sequential calls bit for bit
                assert scores == train[(rank["rank"], key)], key
    results = ranks[0]["results"]
    assert sorted(results["reward"]) == sorted(results["fid"]) == sorted(results["zscore"]) == ["2", "4"]
    for step in ("2", "4"):
        for name in ("reward", "zscore"):
            values = results[name][step]
            assert values.keys() == expected[name][step].keys()
            for key, value in values.items():
                want = expected[name][step][key]
                if key == "eval/train_reward":
                    assert value == pytest.approx(want, rel=TRAIN_REWARD_REL_TOL), key
                elif key.startswith("eval/zcomposed_"):  # the total reads the z-score statistics
                    assert value == pytest.approx(want, rel=ZSCORE_REL_TOL), key
                else:  # raw parts, their correlations, the alarm flag
                    assert _same(value, want), (step, key, value, want)
        assert not math.isnan(results["reward"][step]["eval/composed/spearman/aesthetic~brightness"])
        fid, want = results["fid"][step], expected["fid"][step]
        assert fid["eval/fid_num_images"] == want["eval/fid_num_images"] == len(worker.PROMPTS)
        gap = abs(fid["eval/fid"] - want["eval/fid"]) / abs(want["eval/fid"])
        assert gap <= FID_REL_TOL, f"FID relative gap {gap:.3g}"
    assert [e["step"] for e in ranks[0]["logged"]] == [2, 2, 2, 4, 4, 4] and ranks[1]["logged"] == []


class _Gate(Reward):
    """Brightness that, inside an evaluation on the main thread, waits until a training call on another
    thread has entered the composition: forces the interleaving the old flag flip got wrong."""

    name, requires_prompt, differentiable, thread_safe = "gate", False, False, True

    def __init__(self) -> None:
        super().__init__()
        self.armed, self.inside, self.entered = False, threading.Event(), threading.Event()

    def score(self, images, prompts, **context):
        if self.armed and threading.current_thread() is threading.main_thread():
            self.inside.set()
            assert self.entered.wait(30), "the training call never entered the composition"
        elif self.armed:
            self.entered.set()
        return RewardOutput(images.mean(dim=(1, 2, 3)).float())


def test_a_training_thread_keeps_updating_zscore_statistics_during_an_evaluation() -> None:
    gate = _Gate()
    total = rk.compose({gate: 1.0, worker.Redness(): 1.0}, normalize="zscore")
    first, second = rkt.random_images(3, 16, 16, seed=1), rkt.random_images(4, 16, 16, seed=2)
    total(first)
    outputs = {}

    def train() -> None:
        assert gate.inside.wait(30)
        outputs["scores"] = total(second)

    thread = threading.Thread(target=train)
    thread.start()
    gate.armed = True
    callback = RewardEvalCallback(total, worker.PROMPTS, every_n_steps=1, generate_fn=worker.generate)
    values = callback.evaluate()
    thread.join(60)
    assert not thread.is_alive()
    reference = rk.compose({_Gate(): 1.0, worker.Redness(): 1.0}, normalize="zscore")  # never armed
    reference(first)
    expected_scores = reference(second)  # the training call, sequentially, after the first batch
    got, want = total.state_dict(), reference.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert torch.equal(outputs["scores"], expected_scores) and total.update_stats
    images = worker.generate(worker.PROMPTS, list(range(len(worker.PROMPTS))))
    assert values["eval/gate_mean"] == images.mean(dim=(1, 2, 3)).double().mean().item()


class _Stateful(Reward):
    """A user reward with an ``update_stats`` flag but no per-call override: evaluated through a view."""

    name, requires_prompt, differentiable = "stateful", False, False

    def __init__(self) -> None:
        super().__init__()
        self.update_stats, self.seen, self.instance = True, [], [self]  # a list: not registered as a submodule

    def score(self, images, prompts, **context):
        self.seen.append((self.update_stats, self.instance[0].update_stats))  # the view's flag, the instance's
        return RewardOutput(images.mean(dim=(1, 2, 3)).float())


def test_a_reward_without_a_per_call_flag_is_evaluated_through_a_view() -> None:
    reward = _Stateful()
    values = RewardEvalCallback(reward, worker.PROMPTS, every_n_steps=1, generate_fn=worker.generate).evaluate()
    assert reward.seen == [(False, True)]  # frozen for the evaluation, never flipped on the shared instance
    assert reward.update_stats and values["eval/stateful_mean"] > 0
