"""AsyncRewardScorer: same scores as sync, order, exceptions, overlap (shown with events, never timings)."""

from __future__ import annotations

import threading

import pytest
import torch

import rewardkit.testing as rkt
from rewardkit.integrations.async_scoring import THREAD_NAME_PREFIX, AsyncRewardScorer
from rewardkit.protocols import Reward, RewardOutput

PROMPTS = ["a red fox in the snow", "an astronaut on a horse"]
WAIT_S = 30.0  # generous bound for an event that should fire at once; a timeout fails the test


def batches(count: int = 4) -> list[torch.Tensor]:
    return [rkt.random_images(2, 40, 40, seed=seed) for seed in range(count)]


class Brightness(Reward):
    requires_prompt = False
    name = "brightness"

    def score(self, images, prompts, **context):
        return RewardOutput(images.mean(dim=(1, 2, 3)), {"threads": [threading.current_thread().name]})


class Failing(Brightness):
    name = "failing"

    def score(self, images, prompts, **context):
        raise ValueError("failing: this reward always fails")


class Gated(Brightness):
    """Signals ``started`` when scoring begins, then waits for ``release``."""

    name = "gated"

    def __init__(self) -> None:
        super().__init__()
        self.started, self.release = threading.Event(), threading.Event()
        self.saw = {}

    def score(self, images, prompts, **context):
        self.started.set()
        self.saw = {"inference_mode": torch.is_inference_mode_enabled(), "requires_grad": images.requires_grad}
        assert self.release.wait(WAIT_S), "the test never released the gated reward"
        return super().score(images, prompts, **context)


def test_async_equals_sync_in_submission_order(tiny_reward) -> None:
    reward = tiny_reward("pickscore")
    inputs = batches()
    expected = [reward(x, PROMPTS) for x in inputs]
    with AsyncRewardScorer(reward) as scorer:
        futures = [scorer.submit(x, PROMPTS) for x in inputs]
        mapped = list(scorer.map(inputs, [PROMPTS] * len(inputs)))
    for future, got, want in zip(futures, mapped, expected):
        assert torch.equal(future.result(), want) and torch.equal(got, want)
        assert got.dtype == torch.float32 and got.shape == (2,)


def test_exceptions_surface_on_result() -> None:
    with AsyncRewardScorer(Failing()) as scorer:
        future = scorer.submit(batches(1)[0])
        with pytest.raises(ValueError, match="always fails"):
            future.result()
        ok = AsyncRewardScorer(Brightness())
        assert ok.submit(batches(1)[0]).result().shape == (2,)  # a failure does not poison the pool
        ok.shutdown()


def test_scoring_overlaps_the_callers_work() -> None:
    """submit returns while the batch is being scored; the caller samples meanwhile (no clocks involved)."""
    reward = Gated()
    images = batches(1)[0].requires_grad_(True)
    with AsyncRewardScorer(reward) as scorer:
        future = scorer.submit(images)  # returns although scoring cannot finish until released
        assert reward.started.wait(WAIT_S)  # scoring started in the worker ...
        assert not future.done()  # ... and is still running while control is back here
        sampled = torch.randn(2, 3, 8, 8).sum()  # the "next batch" is sampled meanwhile
        reward.release.set()
        scores = future.result(timeout=WAIT_S)
    assert torch.isfinite(sampled)
    assert torch.equal(scores, images.detach().mean(dim=(1, 2, 3)))
    assert reward.saw == {"inference_mode": True, "requires_grad": False}  # detached, inference mode


def test_scores_are_ordinary_tensors_usable_in_autograd() -> None:
    with AsyncRewardScorer(Brightness()) as scorer:
        scores = scorer.submit(batches(1)[0]).result()
    assert not scores.is_inference()
    log_probs = torch.zeros(2, requires_grad=True)
    (scores * log_probs).sum().backward()  # an inference tensor would fail here ("saved for backward")
    assert torch.equal(log_probs.grad, scores)


def test_one_instance_per_worker_running_concurrently() -> None:
    with pytest.raises(ValueError, match="instances"):
        AsyncRewardScorer(Brightness(), max_workers=2)
    rewards = [Gated(), Gated()]
    with AsyncRewardScorer(rewards) as scorer:
        futures = [scorer.submit_evaluate(x) for x in batches(2)]
        assert all(r.started.wait(WAIT_S) for r in rewards)  # both instances busy at once, one per worker
        for r in rewards:
            r.release.set()
        outputs = [f.result(timeout=WAIT_S) for f in futures]
    threads = {out.details["threads"][0] for out in outputs}
    assert len(threads) == 2 and all(t.startswith(THREAD_NAME_PREFIX) for t in threads)


def test_device_move_and_return(tiny_reward) -> None:
    reward = tiny_reward("hpsv2")
    x = batches(1)[0]
    with AsyncRewardScorer(reward, device="cpu", clone_inputs=True, num_threads=1) as scorer:
        scores = scorer.submit(x, PROMPTS).result()
    assert scores.device == x.device and torch.equal(scores, reward(x, PROMPTS))


def test_bad_use_is_reported() -> None:
    scorer = AsyncRewardScorer(Brightness())
    with pytest.raises(TypeError, match="float tensor"):
        scorer.submit([[0.5]])
    with pytest.raises(ValueError, match="prompt entries"):
        scorer.map(batches(2), ["a", "b", "c"])
    scorer.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        scorer.submit(batches(1)[0])
    with pytest.raises(ValueError, match="max_workers"):
        AsyncRewardScorer(Brightness(), max_workers=0)


def test_a_zscore_composition_is_one_shared_instance_scored_in_submission_order() -> None:
    import rewardkit as rk

    with pytest.raises(ValueError, match="one shared instance"):
        AsyncRewardScorer([rk.compose({Brightness(): 1.0}, normalize="zscore") for _ in range(2)])
    inputs = batches(6)
    sequential = rk.compose({Brightness(): 1.0}, normalize="zscore")
    expected = [sequential(x) for x in inputs]
    shared = rk.compose({Brightness(): 1.0}, normalize="zscore")
    with AsyncRewardScorer(shared, max_workers=4) as scorer:  # thread_safe: one instance, four workers
        got = list(scorer.map(inputs))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert torch.equal(shared.stats["brightness"].total, sequential.stats["brightness"].total)


def test_a_cancelled_job_gives_its_place_in_the_order_up() -> None:
    import rewardkit as rk

    gate = Gated()
    reward = rk.compose({gate: 1.0}, normalize="zscore")
    x = batches(1)[0]
    with AsyncRewardScorer(reward) as scorer:  # one worker: jobs 1 and 2 queue behind job 0
        first, cancelled, last = scorer.submit(x), scorer.submit(x), scorer.submit(x)
        assert gate.started.wait(WAIT_S)
        assert cancelled.cancel()  # still queued: cancelled, its ticket released
        gate.release.set()
        first.result(timeout=WAIT_S)
        last.result(timeout=WAIT_S)  # would wait forever for the cancelled ticket otherwise
    assert reward.stats["gated"].count.item() == 4
