"""Resuming the evaluation callbacks (issue 13.4): save, build a fresh callback, load, continue -> the same
values as an uninterrupted run; no re-evaluation of a step already done; the FID reference frozen at the
first evaluation is kept (not recomputed from whatever reference images the resumed run passes); the alarm
keeps its history. Through ``torch.save``/``torch.load(weights_only=True)``, accelerate's
``register_for_checkpointing`` and the transformers Trainer's checkpoints."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import pytest
import torch
from torch import nn

import rewardkit.testing as rkt
from rewardkit.integrations.callbacks import FIDEvalCallback, RewardEvalCallback
from rewardkit.integrations.hacking_alarm import RewardHackingAlarm
from rewardkit.metrics.fid import FrechetDistance
from rewardkit.metrics.kid import KID
from rewardkit.testing.metrics import PixelFeatures

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

_spec = importlib.util.spec_from_file_location("callbacks_worker", Path(__file__).parent / "distributed" / "callbacks_worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

STEPS, EVERY = 8, 2


class _Policy:
    """A stand-in for the trained model: its images darken a little at every training step."""

    def __init__(self) -> None:
        self.step = 0

    def generate(self, prompts, seeds):
        return worker.generate(prompts, seeds) * (1.0 - 0.04 * self.step)


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # as accelerate and the Trainer load checkpoints


def _reward_callback(policy: _Policy) -> RewardEvalCallback:
    return RewardEvalCallback(worker.Brightness(), worker.PROMPTS, every_n_steps=EVERY, generate_fn=policy.generate,
                              alarm=RewardHackingAlarm(window=3))


def _loop(callback, policy: _Policy, steps: range) -> dict[int, dict]:
    logged = {}
    for step in steps:
        policy.step = step
        callback.record_train_reward(torch.tensor([0.1 * step, 0.2 * step]))
        values = callback.maybe_evaluate(step)
        if values is not None:
            logged[step] = values
    return logged


@pytest.mark.filterwarnings("ignore:RewardEvalCallback. possible reward hacking")
@pytest.mark.parametrize("stop_at", [4, 5])  # right after an evaluation, and with training rewards pending
def test_reward_callback_resume_equals_an_uninterrupted_run(stop_at: int) -> None:
    whole_policy = _Policy()
    whole = _reward_callback(whole_policy)
    expected = _loop(whole, whole_policy, range(1, STEPS + 1))
    assert any(v["eval/hacking_alarm"] == 1.0 for v in expected.values())  # the history matters

    policy = _Policy()
    first = _reward_callback(policy)
    before = _loop(first, policy, range(1, stop_at + 1))
    resumed = _reward_callback(policy)
    resumed.load_state_dict(_roundtrip(first.state_dict()))
    assert resumed.maybe_evaluate(4) is None  # a restarted step 4 is not evaluated again
    after = _loop(resumed, policy, range(stop_at + 1, STEPS + 1))
    assert {**before, **after} == expected
    assert resumed.alarm.fired == whole.alarm.fired


@pytest.mark.parametrize("kind", ["fid", "kid"])
def test_fid_callback_keeps_its_frozen_reference(kind: str) -> None:
    def build(reference_images: torch.Tensor) -> FIDEvalCallback:
        extractor = PixelFeatures(dim=worker.FEATURE_DIM).freeze()
        metric = FrechetDistance(extractor) if kind == "fid" else KID(extractor, subsets=4, subset_size=3)
        return FIDEvalCallback(metric, worker.PROMPTS, every_n_steps=EVERY, generate_fn=worker.generate,
                               reference_images=reference_images, alarm=RewardHackingAlarm(window=2))

    key = f"eval/{kind}"
    original, other = worker.reference_images(), rkt.random_images(6, worker.SIDE, worker.SIDE, seed=99)
    whole = build(original)
    expected = [whole.maybe_evaluate(step)[key] for step in (2, 4)]
    first = build(original)
    first.maybe_evaluate(2)
    state = _roundtrip(first.state_dict())
    resumed = build(other)  # the resumed run passes other reference images: they must not be used
    resumed.load_state_dict(state)
    assert resumed.maybe_evaluate(2) is None and resumed.maybe_evaluate(4)[key] == expected[1]
    assert build(other).maybe_evaluate(4)[key] != expected[1]  # the reference does change the value
    if kind == "fid":  # a reference= given to the constructor is rebuilt by it, not copied into checkpoints
        given = FIDEvalCallback(FrechetDistance(PixelFeatures(dim=worker.FEATURE_DIM).freeze()), worker.PROMPTS,
                                every_n_steps=EVERY, generate_fn=worker.generate,
                                reference=whole.metric.reference_statistics())
        given.maybe_evaluate(2)
        assert given.state_dict()["reference"] is None


def test_load_refuses_another_configuration() -> None:
    policy = _Policy()
    state = _reward_callback(policy).state_dict()
    other_prompts = RewardEvalCallback(worker.Brightness(), worker.PROMPTS[:2], every_n_steps=EVERY,
                                       generate_fn=policy.generate, alarm=RewardHackingAlarm(window=3))
    with pytest.raises(ValueError, match="other prompts/seeds"):
        other_prompts.load_state_dict(state)
    no_alarm = RewardEvalCallback(worker.Brightness(), worker.PROMPTS, every_n_steps=EVERY, generate_fn=policy.generate)
    with pytest.raises(ValueError, match="alarm"):
        no_alarm.load_state_dict(state)


def test_accelerate_register_for_checkpointing(tmp_path) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    policy = _Policy()
    callback = _reward_callback(policy)
    _loop(callback, policy, range(1, 5))
    accelerator.register_for_checkpointing(callback)
    accelerator.save_state(str(tmp_path / "state"))
    restarted = Accelerator(cpu=True)  # a restarted script: new accelerator, fresh callback, load
    fresh = _reward_callback(policy)
    restarted.register_for_checkpointing(fresh)
    restarted.load_state(str(tmp_path / "state"))
    assert fresh.state_dict() == callback.state_dict() and fresh.last_step == 4


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, x, labels=None):
        return {"loss": ((self.linear(x).squeeze(-1) - labels) ** 2).mean()}


def _train(output_dir: Path, reference_images: torch.Tensor, resume: str | None = None) -> dict[int, float]:
    from transformers import Trainer, TrainingArguments

    data = [{"x": torch.randn(4, generator=torch.Generator().manual_seed(i)), "labels": torch.tensor(1.0)}
            for i in range(32)]
    args = TrainingArguments(output_dir=str(output_dir), max_steps=6, per_device_train_batch_size=2, report_to=[],
                             logging_steps=1, save_strategy="steps", save_steps=2, use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=_Tiny(), args=args, train_dataset=data)
    callback = FIDEvalCallback(FrechetDistance(PixelFeatures(dim=worker.FEATURE_DIM).freeze()), worker.PROMPTS,
                               every_n_steps=EVERY, generate_fn=worker.generate, reference_images=reference_images)
    trainer.add_callback(callback.as_trainer_callback(trainer))
    trainer.train(resume_from_checkpoint=resume)
    entries = [e for e in trainer.state.log_history if "eval/fid" in e]
    assert len({e["step"] for e in entries}) == len(entries)  # no step evaluated twice
    return {e["step"]: e["eval/fid"] for e in entries}


def test_trainer_checkpoints_carry_the_evaluation_state(tmp_path) -> None:
    expected = _train(tmp_path, worker.reference_images())
    assert sorted(expected) == [2, 4, 6]
    assert (tmp_path / "checkpoint-4" / "rewardkit_eval-eval.pt").is_file()
    other = rkt.random_images(6, worker.SIDE, worker.SIDE, seed=99)
    resumed = _train(tmp_path, other, resume=str(tmp_path / "checkpoint-4"))
    assert resumed == expected  # steps 2, 4 from the restored history; step 6 with the frozen reference
