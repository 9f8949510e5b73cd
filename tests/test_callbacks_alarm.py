"""Reward-hacking alarm (pure logic and inside the callbacks), the stop in both loop styles, and the
per-part correlations of a composed reward on the evaluation set."""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import rewardkit as rk
from rewardkit.integrations.callbacks import FIDEvalCallback, RewardEvalCallback
from rewardkit.integrations.hacking_alarm import RewardHackingAlarm, part_correlations, trend
from rewardkit.metrics.fid import FrechetDistance
from rewardkit.protocols import Reward, RewardOutput
from rewardkit.testing.metrics import PixelFeatures

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

_spec = importlib.util.spec_from_file_location("callbacks_worker", Path(__file__).parent / "distributed" / "callbacks_worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def _feed(alarm: RewardHackingAlarm, train: list[float], evals: list[float], key: str = "pickscore_mean",
          higher: bool = True) -> list[list[str]]:
    return [alarm.observe(step, t, {key: e}, {key: higher}) for step, (t, e) in enumerate(zip(train, evals))]


# --- the pure alarm -------------------------------------------------------------------------------------

def test_trend_is_the_least_squares_change_over_the_window() -> None:
    rng = np.random.default_rng(0)
    for n in (2, 3, 7):
        values = rng.normal(size=n).tolist()
        slope = np.polyfit(np.arange(n), values, 1)[0]  # independent fit
        assert trend(values) == pytest.approx(slope * (n - 1), rel=1e-12, abs=1e-12)
    assert math.isnan(trend([1.0])) and math.isnan(trend([1.0, math.nan, 2.0]))


def test_fires_when_train_rises_while_eval_falls_over_the_window() -> None:
    alarm = RewardHackingAlarm(window=3)
    fired = _feed(alarm, [1.0, 1.2, 1.4, 1.6], [0.5, 0.4, 0.3, 0.2])
    assert fired == [[], [], ["pickscore_mean"], ["pickscore_mean"]]  # not before 3 evaluations
    assert alarm.triggered and [f["step"] for f in alarm.fired] == [2, 3]
    calm = RewardHackingAlarm(window=3)
    assert _feed(calm, [1.0, 1.2, 1.4], [0.5, 0.6, 0.7]) == [[], [], []]  # both rise: healthy
    assert _feed(RewardHackingAlarm(window=3), [1.0, 0.9, 0.8], [0.5, 0.4, 0.3]) == [[], [], []]  # both fall
    assert not calm.triggered


def test_noise_within_the_tolerance_is_flat() -> None:
    alarm = RewardHackingAlarm(window=3, eval_tolerance=0.05)
    noisy = [0.50, 0.48, 0.51, 0.47, 0.49]  # fitted changes over 3 evaluations stay within 0.05
    assert all(abs(trend(noisy[i : i + 3])) <= 0.05 for i in range(3))
    assert _feed(alarm, [1.0, 1.1, 1.2, 1.3, 1.4], noisy) == [[]] * 5
    assert alarm.observe(5, 1.5, {"pickscore_mean": 0.46}) == []  # (0.47, 0.49, 0.46): -0.01, within 0.05
    assert alarm.observe(6, 1.6, {"pickscore_mean": 0.30}) == ["pickscore_mean"]  # (0.49, 0.46, 0.30): -0.19
    strict = RewardHackingAlarm(window=3, train_tolerance=1.0)  # a training rise within its tolerance
    assert _feed(strict, [1.0, 1.2, 1.4], [0.5, 0.3, 0.1]) == [[], [], []]


def test_window_length_decides_what_counts_as_a_fall() -> None:
    train, evals = [1.0, 1.1, 1.2, 1.3], [0.2, 0.6, 0.7, 0.5]  # up overall, down over the last two
    assert trend(evals) > 0 and trend(evals[-2:]) < 0
    assert _feed(RewardHackingAlarm(window=4), train, evals)[-1] == []
    assert _feed(RewardHackingAlarm(window=2), train, evals)[-1] == ["pickscore_mean"]


def test_orientation_nan_and_watch() -> None:
    fid_rises = _feed(RewardHackingAlarm(window=2), [1.0, 2.0], [10.0, 12.0], key="fid", higher=False)
    assert fid_rises[-1] == ["fid"]  # FID up = worse
    assert _feed(RewardHackingAlarm(window=2), [1.0, 2.0], [12.0, 10.0], key="fid", higher=False)[-1] == []
    assert _feed(RewardHackingAlarm(window=2), [math.nan, 2.0], [0.5, 0.1])[-1] == []  # unknown train reward
    assert _feed(RewardHackingAlarm(window=2), [1.0, 2.0], [math.nan, 0.1])[-1] == []  # NaN in the window
    watched = RewardHackingAlarm(window=2, watch=["b"])
    watched.observe(0, 1.0, {"a": 1.0, "b": 1.0})
    assert watched.observe(1, 2.0, {"a": 0.0, "b": 0.0}) == ["b"]


def test_alarm_state_dict_resumes_the_same_decisions() -> None:
    train, evals = [1.0, 1.2, 1.1, 1.5, 1.7, 1.9], [0.5, 0.5, 0.45, 0.3, 0.35, 0.1]
    whole = _feed(RewardHackingAlarm(window=3, eval_tolerance=0.01), train, evals)
    first = RewardHackingAlarm(window=3, eval_tolerance=0.01)
    head = _feed(first, train[:3], evals[:3])
    resumed = RewardHackingAlarm(window=3, eval_tolerance=0.01)
    resumed.load_state_dict(torch.load(_saved(first.state_dict()), weights_only=True))
    tail = [resumed.observe(step + 3, t, {"pickscore_mean": e}) for step, (t, e) in enumerate(zip(train[3:], evals[3:]))]
    assert head + tail == whole and resumed.fired == _alarm_after(train, evals).fired
    with pytest.raises(ValueError, match="window"):
        RewardHackingAlarm(window=4).load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="window must be >= 2"):
        RewardHackingAlarm(window=1)
    with pytest.raises(ValueError, match="tolerances"):
        RewardHackingAlarm(eval_tolerance=-1.0)


def _alarm_after(train: list[float], evals: list[float]) -> RewardHackingAlarm:
    alarm = RewardHackingAlarm(window=3, eval_tolerance=0.01)
    _feed(alarm, train, evals)
    return alarm


def _saved(state: dict) -> "io.BytesIO":  # noqa: F821
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


# --- inside the callbacks -------------------------------------------------------------------------------

class _Fading:
    """generate_fn whose images get darker at every evaluation (a "policy" losing brightness)."""

    def __init__(self) -> None:
        self.evaluations, self.last_seed = 0, None

    def __call__(self, prompts, seeds):
        if seeds[0] == 0:  # the first batch of an evaluation
            self.evaluations += 1
        return worker.generate(prompts, seeds) * (1.0 - 0.1 * self.evaluations)


def test_callback_feeds_the_alarm_warns_logs_and_requests_a_stop() -> None:
    fading = _Fading()
    callback = RewardEvalCallback(worker.Brightness(), worker.PROMPTS, every_n_steps=2, generate_fn=fading,
                                  alarm=RewardHackingAlarm(window=2), stop_on_alarm=True)
    logged = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 7):
            callback.record_train_reward(torch.tensor([float(step), math.nan, float(step)]))  # NaN rows left out
            values = callback.maybe_evaluate(step)
            if values is not None:
                logged[step] = values
            if callback.should_stop:
                break
    assert sorted(logged) == [2, 4] and step == 4
    assert logged[2]["eval/train_reward"] == 1.5 and logged[4]["eval/train_reward"] == 3.5  # (1+2)/2, (3+4)/2
    assert [logged[s]["eval/hacking_alarm"] for s in (2, 4)] == [0.0, 1.0]
    assert logged[4]["eval/brightness_mean"] < logged[2]["eval/brightness_mean"]
    assert any("reward hacking at step 4" in str(w.message) and "brightness_mean" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="stop_on_alarm=True needs alarm"):
        RewardEvalCallback(worker.Brightness(), ["a"], every_n_steps=1, generate_fn=worker.generate, stop_on_alarm=True)


def test_fid_callback_alarm_watches_fid_rising() -> None:
    fading = _Fading()
    metric = FrechetDistance(PixelFeatures(dim=worker.FEATURE_DIM).freeze())
    callback = FIDEvalCallback(metric, worker.PROMPTS, every_n_steps=1, generate_fn=fading,
                               reference_images=worker.generate(worker.PROMPTS, list(range(5))),
                               alarm=RewardHackingAlarm(window=2))
    values = []
    with pytest.warns(UserWarning, match=r"\['fid'\] worsened"):
        for step in (1, 2):
            callback.record_train_reward(float(step))
            values.append(callback.maybe_evaluate(step))
    assert values[1]["eval/fid"] > values[0]["eval/fid"] and values[1]["eval/hacking_alarm"] == 1.0
    assert not callback.should_stop  # stop_on_alarm defaults to False


def test_trainer_stops_when_the_alarm_fires(tmp_path) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class RisingReward(TrainerCallback):
        """Stands in for a trainer that logs its optimised reward (TRL logs "reward")."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:  # training logs only, not the evaluation's own entries
                logs["reward"] = float(state.global_step)

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 1)

        def forward(self, x, labels=None):
            return {"loss": ((self.linear(x).squeeze(-1) - labels) ** 2).mean()}

    data = [{"x": torch.randn(4, generator=torch.Generator().manual_seed(i)), "labels": torch.tensor(1.0)}
            for i in range(32)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=2, report_to=[],
                             logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=Tiny(), args=args, train_dataset=data, callbacks=[RisingReward()])
    callback = RewardEvalCallback(worker.Brightness(), worker.PROMPTS, every_n_steps=2, generate_fn=_Fading(),
                                  alarm=RewardHackingAlarm(window=2), stop_on_alarm=True)
    trainer.add_callback(callback.as_trainer_callback(trainer, train_reward_key="reward"))
    with pytest.warns(UserWarning, match="reward hacking at step 4"):
        trainer.train()
    assert trainer.state.global_step == 4  # stopped right after the alarm, not at max_steps=8
    entries = {e["step"]: e for e in trainer.state.log_history if "eval/hacking_alarm" in e}
    assert sorted(entries) == [2, 4] and entries[4]["eval/hacking_alarm"] == 1.0
    assert entries[2]["eval/train_reward"] == 1.0 and entries[4]["eval/train_reward"] == 2.5  # logs of 1 / 2, 3
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [1, 2, 3, 4]  # no training entry lost


# --- per-part correlations ----------------------------------------------------------------------------

class _Steps(Reward):
    """Brightness rounded to 0.1 (ties for Spearman), NaN for the darkest images (not applicable)."""

    name, requires_prompt, differentiable = "steps", False, False

    def score(self, images, prompts, **context):
        value = images.mean(dim=(1, 2, 3)).float()
        return RewardOutput(torch.where(value < 0.2, torch.nan, (value * 10).round() / 10))


def test_correlations_of_composed_parts_match_scipy() -> None:
    from scipy import stats

    prompts = [f"prompt {i}" for i in range(12)]
    total = rk.compose({worker.Brightness(): 1.0, worker.Redness(): 1.0, _Steps(): 1.0})
    values = RewardEvalCallback(total, prompts, every_n_steps=1, generate_fn=worker.generate, batch_size=5).evaluate()
    images = worker.generate(prompts, list(range(12)))
    with torch.no_grad():
        details = total.evaluate(images, prompts).details
    columns = {k: details[k].double().numpy() for k in ("brightness", "redness", "steps")}
    assert np.isnan(columns["steps"]).any() and len(set(columns["steps"][~np.isnan(columns["steps"])])) < 12
    for a, b in (("brightness", "redness"), ("brightness", "steps"), ("redness", "steps")):
        keep = ~np.isnan(columns[a]) & ~np.isnan(columns[b])
        x, y = columns[a][keep], columns[b][keep]
        assert values[f"eval/composed/pearson/{a}~{b}"] == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
        assert values[f"eval/composed/spearman/{a}~{b}"] == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    constant = part_correlations({"a": torch.ones(4), "b": torch.arange(4.0)})
    assert math.isnan(constant["pearson/a~b"]) and math.isnan(constant["spearman/a~b"])  # no spread: NaN, never 0
    single = RewardEvalCallback(worker.Brightness(), prompts, every_n_steps=1, generate_fn=worker.generate).evaluate()
    assert not any("pearson" in k for k in single)  # one reward: nothing to correlate
