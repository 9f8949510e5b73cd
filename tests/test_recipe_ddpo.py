"""Launch tests of recipes/ddpo.py: --tiny runs under `accelerate launch` with 1 and 2 CPU processes, resume."""

from __future__ import annotations

import pytest

from recipe_harness import (
    ROOT,
    check_lora_changed,
    check_resumed_at_step_2,
    check_two_process_artefacts,
    checkpoint_dir,
    checkpointed_runs,
    import_recipe,
    scalar_events,
    values_by_step,
)

RECIPE_NAME = "ddpo"
TRAIN_KEYS = ("train/loss", "train/approx_kl", "train/clipfrac", "train/ratio", "train/reward/mean",
              "train/rewards/brightness/mean", "train/rewards/hpsv2/mean", "train/zero_std_ratio",
              "train/group_std_mean", "train/part_corr/brightness_vs_hpsv2")
EVAL_KEYS = ("eval/composed_mean", "eval/brightness_mean", "eval/hpsv2_mean")


@pytest.fixture(scope="module")
def recipe():
    """The recipe file imported as a module (for its Config; no launch)."""
    return import_recipe(RECIPE_NAME)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """2 processes, 1 process, and 1 process resumed from the latter's step-1 checkpoint (2 steps each)."""
    return checkpointed_runs(RECIPE_NAME, tmp_path_factory)


def test_two_processes_write_every_artefact(runs):
    check_two_process_artefacts(runs["two"])
    assert (checkpoint_dir(runs["two"], 2) / "tracker.pt").is_file()  # the advantage tracker's reward history


def test_two_processes_log_rewards_losses_and_eval(runs):
    (scalars,) = map(values_by_step, scalar_events(runs["two"]))  # exactly one event file
    for key in TRAIN_KEYS:
        assert set(scalars[key]) == {1, 2}, key
    for key in EVAL_KEYS:
        assert set(scalars[key]) == {2}, key  # --tiny evaluates every 2 steps
    # one inner epoch: the recomputed policy equals the sampling policy (same CFG, float32 log-probs)
    assert all(abs(value - 1.0) < 1e-4 for value in scalars["train/ratio"].values())
    assert all(value == 0.0 for value in scalars["train/clipfrac"].values())


def test_two_processes_change_the_lora_weights(runs):
    check_lora_changed(runs["two"])


def test_one_process_run_and_resume_continue_at_the_right_step(runs):
    check_resumed_at_step_2(runs["one"], runs["resumed"], runs["resume_log"])


@pytest.mark.parametrize("flags, message", [
    (["--images_per_prompt", "1"], "images_per_prompt must be >= 2"),
    (["--eta", "0"], "eta > 0"),
    (["--timestep_fraction", "1.5"], "timestep_fraction"),
    (["--max_steps", "3", "--num_inner_epochs", "2"], "multiples of num_inner_epochs"),
    (["--advantage_std", "global"], "advantage_tracker 'ddpo'"),
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
