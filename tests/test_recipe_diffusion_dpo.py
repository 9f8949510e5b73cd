"""Launch tests of recipes/diffusion_dpo.py: --tiny runs under `accelerate launch`, 1 and 2 CPU processes, resume."""

from __future__ import annotations

import math

import pytest

from recipe_harness import (
    ROOT,
    check_lora_changed,
    check_resumed_at_step_2,
    check_two_process_artefacts,
    checkpointed_runs,
    import_recipe,
    scalar_events,
    values_by_step,
)

RECIPE_NAME = "diffusion_dpo"
TRAIN_KEYS = ("train/loss", "train/implicit_acc", "train/reward_margin", "train/implicit_reward_margin",
              "train/valid_pair_frac", "train/reward/mean", "train/rewards/brightness/mean", "train/rewards/hpsv2/mean")
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


def test_two_processes_log_rewards_losses_and_eval(runs):
    (scalars,) = map(values_by_step, scalar_events(runs["two"]))  # exactly one event file
    for key in TRAIN_KEYS:
        assert set(scalars[key]) == {1, 2}, key
    for key in EVAL_KEYS:
        assert set(scalars[key]) == {2}, key  # --tiny evaluates every 2 steps
    # step 1: the LoRA B matrices start at zero, so model == reference: loss ln 2, implicit margin 0 and
    # (paper convention: ties are not correct) implicit accuracy 0
    assert abs(scalars["train/loss"][1] - math.log(2)) < 1e-5
    assert scalars["train/implicit_reward_margin"][1] == 0.0 and scalars["train/implicit_acc"][1] == 0.0
    assert scalars["train/loss"][2] != scalars["train/loss"][1]  # the trained model left the reference
    assert all(value > 0 for value in scalars["train/reward_margin"].values())  # chosen scored above rejected


def test_two_processes_change_the_lora_weights(runs):
    check_lora_changed(runs["two"])


def test_one_process_run_and_resume_continue_at_the_right_step(runs):
    check_resumed_at_step_2(runs["one"], runs["resumed"], runs["resume_log"])


@pytest.mark.parametrize("flags, message", [
    (["--images_per_prompt", "1"], "images_per_prompt >= 2"),
    (["--beta", "0"], "beta > 0"),
    (["--min_margin", "-1"], "min_margin >= 0"),
    (["--dpo_convention", "ipo"], "invalid choice"),
])
def test_bad_configs_are_refused_with_the_reason(recipe, tmp_path, flags, message, capsys):
    with pytest.raises((ValueError, SystemExit)) as error:
        recipe.parse_config(recipe.Config, ["--output_dir", str(tmp_path), *flags])
    assert message in str(error.value) + capsys.readouterr().err


def test_real_config_parses_and_tiny_overrides_it(recipe):
    path = str(ROOT / "recipes" / "configs" / "diffusion_dpo.yaml")
    config = recipe.parse_config(recipe.Config, ["--config", path])
    assert config.rewards == {"pickscore": 1.0} and config.beta == 5000 and config.dpo_convention == "paper"
    tiny = recipe.parse_config(recipe.Config, ["--config", path, "--tiny", "--max_steps", "2"])
    assert tiny.tiny and tiny.resolution == 32 and tiny.max_steps == 2 and tiny.rewards == recipe.TINY_REWARDS
