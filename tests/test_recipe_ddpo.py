"""Launch tests of recipes/ddpo.py: --tiny runs under `accelerate launch` with 1 and 2 CPU processes, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recipe_harness import ROOT, checkpoint_dir, import_recipe, launch, lora_weights, scalar_events, values_by_step

RECIPE_NAME = "ddpo"
TRAIN_KEYS = ("train/loss", "train/approx_kl", "train/clipfrac", "train/ratio", "train/reward/mean",
              "train/rewards/brightness/mean", "train/rewards/hpsv2/mean")
EVAL_KEYS = ("eval/composed_mean", "eval/brightness_mean", "eval/hpsv2_mean")


@pytest.fixture(scope="module")
def recipe():
    """The recipe file imported as a module (for its Config; no launch)."""
    return import_recipe(RECIPE_NAME)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output_dir = tmp_path_factory.mktemp("ddpo-2proc")
    launch(RECIPE_NAME, 2, output_dir, "--max_steps", "2", "--checkpoint_every", "1")
    return output_dir


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A 2-step run, and a second run that resumes from its step-1 checkpoint into a fresh folder."""
    first = tmp_path_factory.mktemp("ddpo-1proc")
    launch(RECIPE_NAME, 1, first, "--max_steps", "2", "--checkpoint_every", "1")
    resumed = tmp_path_factory.mktemp("ddpo-resumed")
    result = launch(RECIPE_NAME, 1, resumed, "--max_steps", "2", "--checkpoint_every", "1",
                    "--resume_from", str(first / "checkpoints" / "checkpoint-1"))
    return first, resumed, result.stderr + result.stdout


def test_two_processes_write_every_artefact(two_process_run):
    assert (two_process_run / "config.yaml").is_file()
    for step in (1, 2):
        folder = two_process_run / "checkpoints" / f"checkpoint-{step}"
        names = {p.name for p in folder.iterdir()}
        assert {"denoiser.lora.safetensors", "optimizer.pt", "reward.pt", "meta.json", "rng_state_0.pt",
                "rng_state_1.pt"} <= names
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["step"] == step and meta["num_processes"] == 2


def test_two_processes_log_rewards_losses_and_eval(two_process_run):
    (scalars,) = map(values_by_step, scalar_events(two_process_run))  # exactly one event file
    for key in TRAIN_KEYS:
        assert set(scalars[key]) == {1, 2}, key
    for key in EVAL_KEYS:
        assert set(scalars[key]) == {2}, key  # --tiny evaluates every 2 steps
    # one inner epoch: the recomputed policy equals the sampling policy (same CFG, float32 log-probs)
    assert all(abs(value - 1.0) < 1e-4 for value in scalars["train/ratio"].values())
    assert all(value == 0.0 for value in scalars["train/clipfrac"].values())


def test_two_processes_change_the_lora_weights(two_process_run):
    first, second = (lora_weights(checkpoint_dir(two_process_run, step)) for step in (1, 2))
    lora_b = [key for key in first if "lora_B" in key]
    assert lora_b, "no LoRA B matrices in the checkpoint"
    assert any(bool(first[key].abs().max() > 0) for key in lora_b)  # B starts at zero (gaussian init)
    assert any(not torch.equal(first[key], second[key]) for key in first)


def test_one_process_run_and_resume_continue_at_the_right_step(one_process_runs):
    first, resumed, log = one_process_runs
    assert "at step 1" in log
    assert not (resumed / "checkpoints" / "checkpoint-1").exists()  # nothing redone before the resume point
    (scalars,) = map(values_by_step, scalar_events(resumed))  # exactly one event file
    assert set(scalars["train/loss"]) == {2}
    (original,) = map(values_by_step, scalar_events(first))  # exactly one event file
    assert set(original["train/loss"]) == {1, 2}
    # everything that step 2 depends on (LoRA, optimizer, RNG, epoch) was restored: the same weights
    before, after = lora_weights(checkpoint_dir(first, 2)), lora_weights(checkpoint_dir(resumed, 2))
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=1e-6, rtol=0)
    assert any(not torch.equal(lora_weights(checkpoint_dir(first, 1))[key], after[key]) for key in after)


@pytest.mark.parametrize("flags, message", [
    (["--images_per_prompt", "1"], "images_per_prompt must be >= 2"),
    (["--eta", "0"], "eta > 0"),
    (["--timestep_fraction", "1.5"], "timestep_fraction"),
    (["--max_steps", "3", "--num_inner_epochs", "2"], "multiples of num_inner_epochs"),
])
def test_bad_configs_are_refused_with_the_reason(recipe, tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        recipe.parse_config(recipe.Config, ["--output_dir", str(tmp_path), *flags])


def test_real_config_parses_and_tiny_overrides_it(recipe):
    config = recipe.parse_config(recipe.Config, ["--config", str(ROOT / "recipes" / "configs" / "ddpo.yaml")])
    assert config.rewards == {"aesthetic": 1.0} and config.eta == 1.0 and config.num_inference_steps == 50
    tiny = recipe.parse_config(recipe.Config, ["--config", str(ROOT / "recipes" / "configs" / "ddpo.yaml"), "--tiny",
                                               "--max_steps", "2"])
    assert tiny.tiny and tiny.resolution == 32 and tiny.max_steps == 2 and tiny.rewards == recipe.TINY_REWARDS
