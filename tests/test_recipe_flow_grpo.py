"""Tests of recipes/flow_grpo.py: `accelerate launch` smoke runs (1 and 2 CPU processes), resume, a learning
signal on the tiny SD3 pipeline with the brightness reward, and the GenEval and OCR task configs under --tiny
(their own rewards, prompt files and metadata). No network."""

from __future__ import annotations

from pathlib import Path

import math

import pytest
import torch
import yaml

from recipe_harness import (
    RECIPES,
    checkpoint_dir,
    import_recipe,
    launch,
    lora_weights,
    scalar_events,
    values_by_step,
)

RECIPE_NAME = "flow_grpo"
REWARD_KEYS = ("train/reward/mean", "train/rewards/brightness/mean", "train/rewards/hpsv2/mean",
               "train/frac_reward_zero_std", "train/zero_std_ratio", "train/group_std_mean",
               "train/part_corr/brightness_vs_hpsv2")
TRAIN_KEYS = ("train/loss", "train/policy_loss", "train/kl", "train/approx_kl", "train/clip_frac", "train/ratio")
EVAL_KEYS = ("eval/composed_mean", "eval/brightness_mean", "eval/hpsv2_mean")


def _logged_steps(output_dir: Path) -> dict[str, list[int]]:
    """Every TensorBoard scalar tag under ``output_dir/logs`` -> its logged steps (event files in creation order)."""
    found: dict[str, list[int]] = {}
    for run in scalar_events(output_dir):
        for tag, points in run.items():
            found.setdefault(tag, []).extend(step for step, _ in points)
    return found


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output_dir = tmp_path_factory.mktemp("flow-grpo-1")
    launch(RECIPE_NAME, 1, output_dir, "--max_steps", "2")
    return output_dir


def test_one_process_smoke_run_writes_artefacts_and_logs(one_process_run: Path) -> None:
    checkpoint = checkpoint_dir(one_process_run, 2)
    for name in ("denoiser.lora.safetensors", "optimizer.pt", "reward.pt", "tracker.pt", "rng_state_0.pt", "meta.json"):
        assert (checkpoint / name).is_file(), name
    assert (one_process_run / "config.yaml").is_file() and (one_process_run / "samples" / "step-2.png").is_file()
    scalars = _logged_steps(one_process_run)
    for key in REWARD_KEYS + TRAIN_KEYS:
        assert scalars.get(key) == [1, 2], key
    for key in EVAL_KEYS:  # eval_every = 2 under --tiny
        assert scalars.get(key) == [2], key
    lora = lora_weights(checkpoint)
    b_weights = [v for k, v in lora.items() if "lora_B" in k]
    assert b_weights and any(float(v.abs().max()) > 0 for v in b_weights)  # B starts at zero: training moved it


def test_resume_continues_at_the_saved_step(one_process_run: Path) -> None:
    before = lora_weights(checkpoint_dir(one_process_run, 2))
    result = launch(RECIPE_NAME, 1, one_process_run, "--max_steps", "3", "--resume_from", "latest",
                    "--checkpoint_every", "1")
    assert "at step 2" in result.stderr  # the resume log line
    assert not (one_process_run / "checkpoints" / "checkpoint-1").exists()  # no step was redone
    after = lora_weights(checkpoint_dir(one_process_run, 3))
    assert set(after) == set(before) and any(not torch.equal(after[k], before[k]) for k in before)
    assert _logged_steps(one_process_run)["train/loss"] == [1, 2, 3]  # step 3 logged once, after steps 1-2


def test_two_processes_smoke_run(tmp_path: Path) -> None:
    result = launch(RECIPE_NAME, 2, tmp_path, "--max_steps", "2")
    assert "processes                        2" in result.stderr  # the start-up batch arithmetic
    checkpoint = checkpoint_dir(tmp_path, 2)
    assert (checkpoint / "rng_state_0.pt").is_file() and (checkpoint / "rng_state_1.pt").is_file()
    scalars = _logged_steps(tmp_path)
    for key in REWARD_KEYS + TRAIN_KEYS:
        assert scalars.get(key) == [1, 2], key
    assert scalars.get("eval/composed_mean") == [2]
    assert any(float(v.abs().max()) > 0 for k, v in lora_weights(checkpoint).items() if "lora_B" in k)


def test_flow_grpo_raises_the_brightness_reward(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    recipe = import_recipe(RECIPE_NAME)
    steps, k = 16, 4
    cfg = recipe.rc.parse_config(recipe.Config, [
        "--tiny", "--output_dir", str(tmp_path), "--max_steps", str(steps), "--learning_rate", "1e-2",
        "--rewards", '{"rewardkit.testing.toy_rewards:load_brightness": 1.0}', "--resolution", "16",
        "--train_batch_size", "8", "--group_size", "4", "--num_inner_epochs", "1", "--kl_beta", "0",
        "--eval_every", "1000", "--checkpoint_every", "1000", "--log_with", "none", "--seed", "0"])
    history = recipe.main(cfg)
    rewards = [metrics["train/reward/mean"] for metrics in history]
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    # Seeded run: 0.480 -> 0.528 when written (per-step noise ~0.01, so a 4-step mean has std ~0.005).
    assert last - first > 0.02, rewards


@pytest.mark.parametrize("name", ["flow_grpo.yaml", "flow_grpo_tiny.yaml"])
def test_shipped_configs_parse_and_divide_on_eight_processes(name: str) -> None:
    import types

    recipe = import_recipe(RECIPE_NAME)
    cfg = recipe.rc.parse_config(recipe.Config, ["--config", str(RECIPES / "configs" / name)])
    fake = types.SimpleNamespace(num_processes=8, process_index=0, is_main_process=False)
    groups = (cfg.train_batch_size * 8, cfg.group_size)
    sizes = recipe.rc.check_batch_arithmetic(cfg, fake, prompts_per_micro_batch=groups)
    assert sizes["prompts_per_micro_batch"] <= len(recipe.rc.load_prompts(cfg))  # distinct prompts suffice


TASKS = {"flow_grpo_geneval.yaml": "geneval", "flow_grpo_ocr.yaml": "ocr"}  # task config -> its reward


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_configs_keep_their_reward_and_take_their_tiny_prompts(name: str) -> None:
    """Full size: flow_grpo's batch arithmetic on 8 processes; --tiny: the task's reward (not the toy pair) and its
    shipped tiny prompt file, whose prompts are ones the reward can score (GenEval records; quoted OCR targets)."""
    import types

    from rewardkit.rewards.geneval_rules import check_metadata
    from rewardkit.rewards.ocr import quoted_target

    recipe = import_recipe(RECIPE_NAME)
    config = str(RECIPES / "configs" / name)
    cfg = recipe.rc.parse_config(recipe.Config, ["--config", config])
    fake = types.SimpleNamespace(num_processes=8, process_index=0, is_main_process=False)
    recipe.rc.check_batch_arithmetic(cfg, fake, prompts_per_micro_batch=(cfg.train_batch_size * 8, cfg.group_size))
    tiny = recipe.rc.parse_config(recipe.Config, ["--config", config, "--tiny"])
    assert cfg.rewards == tiny.rewards == {TASKS[name]: 1.0} and tiny.prompts == cfg.tiny_prompts != cfg.prompts
    prompts = recipe.rc.load_prompts(tiny)
    assert len(prompts) >= tiny.train_batch_size // tiny.group_size
    if TASKS[name] == "geneval":
        records = prompts.metadata_for(prompts)
        assert [check_metadata(r) for r in records] == records
        assert {r["tag"] for r in records} >= {"counting", "position"}
    else:
        assert prompts.metadata_for(prompts) is None and all(quoted_target(p) for p in prompts)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_config_tiny_run_trains_on_finite_task_rewards(name: str, tmp_path: Path) -> None:
    """One process, 2 steps of the task config under --tiny: every logged reward of the task's part, in training and
    in the step-2 evaluation, is finite (a GenEval row without its record, or an OCR prompt without quotes, is NaN,
    and an all-NaN step logs NaN)."""
    part = TASKS[name]
    launch(RECIPE_NAME, 1, tmp_path, "--config", str(RECIPES / "configs" / name), "--max_steps", "2")
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["rewards"] == {part: 1.0} and written["prompts"] == written["tiny_prompts"]
    (scalars,) = map(values_by_step, scalar_events(tmp_path))
    for key in ("train/reward/mean", f"train/rewards/{part}/mean", f"train/rewards/{part}/std"):
        assert set(scalars[key]) == {1, 2} and all(math.isfinite(v) for v in scalars[key].values()), key
    for key in ("eval/composed_mean", f"eval/{part}_mean"):
        assert set(scalars[key]) == {2} and math.isfinite(scalars[key][2]), key
    assert checkpoint_dir(tmp_path, 2).is_dir()
