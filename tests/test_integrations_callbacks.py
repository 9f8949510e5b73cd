"""Periodic evaluation callbacks: 2-rank reduction equals one process, schedule, isolation, logging,
the transformers Trainer variant, and the tiny diffusers pipeline as the generator."""

from __future__ import annotations

import importlib.util
import math
import random
from pathlib import Path

import pytest
import torch
from torch import nn

import rewardkit as rk
import rewardkit.testing as rkt
from rewardkit.integrations.callbacks import FIDEvalCallback, RewardEvalCallback, shard_range
from rewardkit.metrics.fid import FrechetDistance
from rewardkit.testing.metrics import PixelFeatures
from recipe_harness import free_port  # a fixed port collides with parallel suites (EADDRINUSE)

_spec = importlib.util.spec_from_file_location("callbacks_worker", Path(__file__).parent / "distributed" / "callbacks_worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

# Statistics are float64 sums, but the float32 features of an image depend slightly on the batch it was
# extracted in (matmul blocking), and shards batch differently: measured 2.3e-8 relative on FID here.
REL_TOL = 1e-6


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on the shared 2-core runners 2 threads are 2-3x slower (reference section 3.2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pixel_fid(**options) -> FIDEvalCallback:
    metric = FrechetDistance(PixelFeatures(dim=worker.FEATURE_DIM).freeze(), batch_size=2)
    options.setdefault("reference_images", worker.reference_images())
    options.setdefault("generate_fn", worker.generate)
    return FIDEvalCallback(metric, worker.PROMPTS, every_n_steps=2, **options)


def test_shards_are_contiguous_uneven_and_cover_everything() -> None:
    assert [list(shard_range(5, r, 2)) for r in (0, 1)] == [[0, 1, 2], [3, 4]]
    assert [list(shard_range(1, r, 2)) for r in (0, 1)] == [[0], []]
    assert sum((list(shard_range(11, r, 4)) for r in range(4)), []) == list(range(11))


def test_two_processes_equal_one_process(run_two_processes) -> None:
    ranks = run_two_processes("callbacks_worker.py", free_port())
    assert [r["world"] for r in ranks] == [2, 2]
    single = {name: worker.build(kind).evaluate(step=2)
              for name, kind in (("fid", "fid"), ("reward", "reward"))}
    single["reward_one_prompt"] = worker.build("reward", prompts=worker.PROMPTS[:1]).evaluate(step=2)
    for rank in ranks:
        assert rank["module_training"] is True
        for name, expected in single.items():
            steps = rank["results"][name]
            assert sorted(steps) == ["2", "4"]  # every_n_steps=2 over steps 1..4
            for values in steps.values():  # the second evaluation starts clean: same value
                assert values.keys() == expected.keys()
                for key, value in expected.items():
                    got = values[key]
                    assert (math.isnan(value) and math.isnan(got)) or math.isclose(got, value, rel_tol=REL_TOL), key
    assert ranks[0]["calls"] == [2, 1, 2, 1] and ranks[1]["calls"] == [2, 2]  # shards 3 + 2, batch 2
    assert single["fid"]["eval/fid_num_images"] == 5 and single["fid"]["eval/fid"] > 0
    assert set(single["reward"]) == {f"eval/{n}_{s}" for n in ("composed", "brightness", "redness")
                                      for s in ("mean", "std")} | {f"eval/composed/{c}/brightness~redness"
                                                                   for c in ("pearson", "spearman")}
    assert math.isnan(single["reward_one_prompt"]["eval/composed_std"])  # one image: no std, never 0.0
    logged = ranks[0]["logged"]
    assert [entry["step"] for entry in logged] == [2, 2, 2, 4, 4, 4] and "eval/fid" in logged[0]
    assert ranks[1]["logged"] == []  # trackers live on the main process


def test_every_n_steps_model_modes_and_rng_are_restored() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1), nn.Sequential(nn.Dropout(0.1)))
    model.train()
    model[2].eval()  # a frozen submodule stays in eval mode
    frozen = nn.Linear(2, 2).eval()
    seen = []

    def generate(prompts, seeds):
        seen.append((model.training, frozen.training, torch.is_grad_enabled()))
        torch.rand(100), random.random()  # disturb the global RNGs inside evaluation
        return worker.generate(prompts, seeds)

    callback = FIDEvalCallback(FrechetDistance(PixelFeatures(dim=4).freeze()), worker.PROMPTS, every_n_steps=3,
                               reference_images=worker.reference_images(), generate_fn=generate, batch_size=8)
    torch.manual_seed(0), random.seed(0)
    expected = torch.rand(5), random.random()
    torch.manual_seed(0), random.seed(0)
    evaluated = [s for s in range(1, 8) if callback.maybe_evaluate(s, model=[model, frozen]) is not None]
    assert callback.maybe_evaluate(6, model=model) is None  # a step is evaluated once
    assert torch.equal(torch.rand(5), expected[0]) and random.random() == expected[1]
    assert evaluated == [3, 6] and seen == [(False, False, False)] * 2
    assert model.training and model[1].training and not model[2].training and not frozen.training


def test_fid_reference_forms_agree(tmp_path) -> None:
    from_images = _pixel_fid().evaluate()
    metric = FrechetDistance(PixelFeatures(dim=worker.FEATURE_DIM).freeze())
    metric.update(worker.reference_images(), real=True)
    metric.save_reference(tmp_path / "ref.npz")
    from_file = _pixel_fid(reference_images=None, reference=tmp_path / "ref.npz").evaluate()
    from_stats = _pixel_fid(reference_images=None, reference=metric.reference_statistics()).evaluate()
    assert from_file == pytest.approx(from_images, rel=REL_TOL) and from_stats == pytest.approx(from_images, rel=REL_TOL)
    with pytest.raises(ValueError, match="reference"):
        FIDEvalCallback(FrechetDistance(PixelFeatures(dim=4)), worker.PROMPTS, every_n_steps=1, generate_fn=worker.generate)


def test_bad_arguments_and_outputs_raise_with_a_fix() -> None:
    metric = FrechetDistance(PixelFeatures(dim=4))
    with pytest.raises(ValueError, match="exactly one of generate_fn"):
        FIDEvalCallback(metric, ["a"], every_n_steps=1, reference_images=worker.reference_images())
    with pytest.raises(ValueError, match="one seed per prompt"):
        RewardEvalCallback(worker.Brightness(), ["a", "b"], seeds=[1], every_n_steps=1, generate_fn=worker.generate)
    callback = RewardEvalCallback(worker.Brightness(), ["a", "b"], every_n_steps=1,
                                  generate_fn=lambda p, s: torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(2, 3, H, W\)"):
        callback.evaluate()
    assert callback._rows == []  # reset even after a failure


def test_reward_callback_logs_every_part_of_a_tiny_composed_reward(tiny_reward) -> None:
    aesthetic = tiny_reward("aesthetic")
    total = rk.compose({aesthetic: 1.0, worker.Brightness(): 2.0})
    values = RewardEvalCallback(total, worker.PROMPTS, every_n_steps=1, generate_fn=worker.generate,
                                batch_size=2).evaluate()
    images = worker.generate(worker.PROMPTS, list(range(5)))
    with torch.no_grad():
        details = total.evaluate(images, worker.PROMPTS).details
    for name in ("aesthetic", "brightness"):
        assert values[f"eval/{name}_mean"] == pytest.approx(details[name].double().mean().item(), rel=1e-6)
        assert values[f"eval/{name}_std"] == pytest.approx(details[name].double().std().item(), rel=1e-5)
    assert values["eval/composed_mean"] == pytest.approx(
        values["eval/aesthetic_mean"] + 2 * values["eval/brightness_mean"], rel=1e-6)


def test_evaluation_does_not_update_zscore_statistics() -> None:
    total = rk.compose({worker.Brightness(): 1.0, worker.Redness(): 1.0}, normalize="zscore")
    total(worker.generate(["a", "b", "c"], [0, 1, 2]))  # training-time scores fill the statistics
    before = {k: v.clone() for k, v in total.state_dict().items()}
    RewardEvalCallback(total, worker.PROMPTS, every_n_steps=1, generate_fn=worker.generate).evaluate()
    assert all(torch.equal(before[k], v) for k, v in total.state_dict().items()) and total.update_stats


def test_trainer_callback_without_trainer_appends_to_log_history() -> None:
    from transformers import TrainerControl, TrainerState

    state, control = TrainerState(), TrainerControl()
    callback = _pixel_fid().as_trainer_callback()
    for step in (1, 2):
        state.global_step = step
        assert callback.on_step_end(None, state, control) is control
    assert [entry["step"] for entry in state.log_history] == [2] and "eval/fid" in state.log_history[0]


def test_trainer_callback_logs_into_log_history(tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear, self.dropout = nn.Linear(4, 1), nn.Dropout(0.1)

        def forward(self, x, labels=None):
            loss = ((self.linear(self.dropout(x)).squeeze(-1) - labels) ** 2).mean()
            return {"loss": loss}

    data = [{"x": torch.randn(4, generator=torch.Generator().manual_seed(i)), "labels": torch.tensor(float(i % 3))}
            for i in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to=[],
                             logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=Tiny(), args=args, train_dataset=data)
    modes = []

    def generate(prompts, seeds):
        modes.append(trainer.model.training)
        return worker.generate(prompts, seeds)

    callback = _pixel_fid(generate_fn=generate)
    trainer.add_callback(callback.as_trainer_callback(trainer))
    trainer.train()
    entries = [e for e in trainer.state.log_history if "eval/fid" in e]
    assert [e["step"] for e in entries] == [2, 4] and modes == [False, False]
    assert entries[0]["eval/fid"] == pytest.approx(_pixel_fid().evaluate()["eval/fid"], rel=REL_TOL)
    assert any("loss" in e for e in trainer.state.log_history)  # training logs are untouched
    from rewardkit.integrations.callbacks import EvalTrainerCallback

    assert isinstance(trainer.callback_handler.callbacks[-1], EvalTrainerCallback)


def test_tiny_diffusers_pipeline_as_the_generator() -> None:
    from rewardkit.testing.pipelines import generate_images, tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=0)
    pipe.unet.train()  # as during fine-tuning
    prompts = worker.PROMPTS[:4]
    metric = FrechetDistance(PixelFeatures(dim=4).freeze())
    reference = rkt.random_images(6, 32, 32, seed=3)
    callback = FIDEvalCallback(metric, prompts, pipeline=pipe, reference_images=reference, every_n_steps=1,
                               batch_size=3, pipeline_kwargs={"num_inference_steps": 2, "height": 32, "width": 32})
    value = callback.evaluate()["eval/fid"]
    assert pipe.unet.training and not pipe.vae.training
    pipe.unet.eval()
    expected = FrechetDistance(PixelFeatures(dim=4).freeze())
    expected.update(reference, real=True)
    expected.update(generate_images(pipe, prompts, range(4)), real=False)  # one generator per seed
    assert value == pytest.approx(float(expected.compute()), rel=1e-4)  # batch 3+1 vs 4: float rounding only


def test_real_tiny_fid_inception_single_process(tiny_root) -> None:
    from rewardkit.metrics.fid import load_fid
    from rewardkit.metrics.frechet import GaussianStats

    weights = rkt.tiny_fid_inception(tiny_root / "fid-callback")["weights"]
    prompts = worker.PROMPTS[:3]
    callback = FIDEvalCallback(load_fid(weights=weights), prompts, every_n_steps=1, generate_fn=worker.generate,
                               reference_images=worker.reference_images()[:3], batch_size=2)
    value = callback.evaluate()["eval/fid"]
    metric = callback.metric  # the reference is now frozen in it; the generated side was reset
    assert metric.fake.n == 0 and metric.reference_statistics().n == 3
    generated = GaussianStats(metric.extractor.feature_dim)
    generated.update(metric.features(worker.generate(prompts, [0, 1, 2])))
    expected = metric.reference_statistics().distance(generated.mean(), generated.cov())
    assert value == pytest.approx(expected, rel=1e-6) and value > 0
