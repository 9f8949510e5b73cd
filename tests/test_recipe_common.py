"""Tests of the recipe support module (rewardkit/recipe_support/common.py, checkpoint.py),
the toy brightness reward and the tiny SD3 pipeline builder. No network."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import types
import warnings
from pathlib import Path

import pytest
import torch

import rewardkit as rk
from rewardkit.recipe_support import common as rc
from rewardkit.protocols import Reward, RewardOutput
from rewardkit.testing.toy_rewards import MeanBrightness, load_brightness

BRIGHTNESS = "rewardkit.testing.toy_rewards:load_brightness"


@dataclasses.dataclass
class _Config(rc.CommonConfig):
    group_size: int = 4  # a recipe-specific field

    TINY_OVERRIDES = {**rc.CommonConfig.TINY_OVERRIDES, "group_size": 2}


def _fake_accelerator(processes: int = 1) -> types.SimpleNamespace:
    logged: list = []
    return types.SimpleNamespace(num_processes=processes, process_index=0, is_main_process=True,
                                 is_local_main_process=True, log=lambda values, step: logged.append((step, values)),
                                 logged=logged)


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.fixture(scope="module")
def sd3_pipe():
    torch.set_num_threads(1)
    from rewardkit.testing.pipelines import tiny_sd3_pipeline

    return tiny_sd3_pipeline()


# --- config parsing -------------------------------------------------------------------------------

def test_parse_config_yaml_then_command_line(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\nrewards: {{'{BRIGHTNESS}': 1.0, pickscore: 0.5}}\n"
                      "resolution: 256\ngroup_size: 8\nnormalize: zscore\n")
    cfg = rc.parse_config(_Config, ["--config", str(config), "--resolution", "128"])
    assert cfg.rewards == {BRIGHTNESS: 1.0, "pickscore": 0.5}  # a mapping from YAML
    assert (cfg.resolution, cfg.group_size, cfg.normalize, cfg.tiny) == (128, 8, "zscore", False)
    cfg = rc.parse_config(_Config, ["--config", str(config), "--rewards", '{"aesthetic": 2}'])
    assert cfg.rewards == {"aesthetic": 2}  # JSON on the command line replaces the YAML mapping


def test_tiny_overrides_beat_yaml_but_not_flags(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path}\nresolution: 512\ngroup_size: 8\nnum_inference_steps: 20\n")
    cfg = rc.parse_config(_Config, ["--config", str(config), "--tiny", "--num_inference_steps", "5"])
    assert cfg.tiny and cfg.resolution == 32 and cfg.group_size == 2  # TINY_OVERRIDES over YAML
    assert cfg.num_inference_steps == 5  # an explicit flag over TINY_OVERRIDES


@pytest.mark.parametrize("argv, match", [
    (["--rewards", "{pickscore: 1}"], "JSON object"),  # not JSON
    (["--rewards", "{}"], "at least one reward"),
    (["--rewards", '{"pickscore": "high"}'], "must be a number"),
    (["--reward_weights", '{"aesthetic": "hf:x/y"}'], "not in rewards"),
    (["--max_steps", "0"], "max_steps must be >= 1"),
])
def test_bad_config_values_raise(tmp_path: Path, argv: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rc.parse_config(_Config, ["--output_dir", str(tmp_path), *argv])


def test_unknown_normalize_is_rejected_by_the_parser(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):  # argparse choices from the Literal type
        rc.parse_config(_Config, ["--output_dir", str(tmp_path), "--normalize", "minmax"])


# --- batch arithmetic and prompts -----------------------------------------------------------------

def test_batch_arithmetic_reports_and_divides() -> None:
    cfg = _Config(output_dir="unused", train_batch_size=3, gradient_accumulation_steps=2)
    derived = rc.check_batch_arithmetic(cfg, _fake_accelerator(2), group_size=3, prompts_per_step=(6, 3))
    assert derived["global_batch"] == 6 and derived["images_per_optimizer_step"] == 12
    assert derived["prompts_per_step"] == 2 and derived["group_size"] == 3


@pytest.mark.parametrize("pair", [(6, 4), (6, 0), (0, 3)])
def test_batch_arithmetic_uneven_raises(pair: tuple) -> None:
    cfg = _Config(output_dir="unused")
    with pytest.raises(ValueError, match="does not divide evenly"):
        rc.check_batch_arithmetic(cfg, _fake_accelerator(), prompts_per_step=pair)


def test_k_repeat_prompts_groups_span_ranks() -> None:
    prompts = [f"prompt {i}" for i in range(10)]
    shares = [rc.k_repeat_prompts(prompts, 3, 4, step=7, rank=r, world=2, seed=1) for r in range(2)]
    merged = shares[0] + shares[1]
    assert len(shares[0]) == len(shares[1]) == 6
    assert sorted(merged.count(p) for p in set(merged)) == [3, 3, 3, 3]  # 4 groups of 3
    assert merged == rc.k_repeat_prompts(prompts, 3, 4, step=7, rank=0, world=1, seed=1)  # same global list
    assert merged != rc.k_repeat_prompts(prompts, 3, 4, step=8, rank=0, world=1, seed=1)  # a new draw per step


def test_k_repeat_prompts_bad_sizes() -> None:
    with pytest.raises(ValueError, match="distinct prompts"):
        rc.k_repeat_prompts(["a", "b", "a"], 2, 3, step=0, rank=0, world=1)
    with pytest.raises(ValueError, match="cannot be split"):
        rc.k_repeat_prompts(["a", "b", "c"], 3, 1, step=0, rank=0, world=2)


def test_load_prompts(tmp_path: Path) -> None:
    assert rc.load_prompts(_Config(output_dir="x")) == list(rc.BUILTIN_PROMPTS)
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert rc.load_prompts(_Config(output_dir="x", prompts=str(tmp_path / "p.txt"))) == ["a cat", "a dog"]
    with pytest.raises(ValueError, match="one prompt per line"):
        rc.load_prompts(_Config(output_dir="x", prompts=str(tmp_path / "missing.txt")))



GENEVAL_ROWS = [  # flow_grpo dataset/geneval/*_metadata.jsonl lines: the prompt and its GenEval metadata
    {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}],
     "prompt": "a photo of two cats"},
    {"tag": "colors", "include": [{"class": "bus", "count": 1, "color": "red"}], "prompt": "a photo of a red bus"},
]




class _RecordLength(Reward):
    """Length of each image's metadata record's prompt; NaN without ``metadata=`` (as GenEval): shows what arrived."""

    name = "record_length"
    requires_prompt = False
    differentiable = False

    def score(self, images, prompts, *, metadata=None, **context):
        values = [float("nan")] * len(images) if metadata is None else [float(len(m["prompt"])) for m in metadata]
        return RewardOutput(torch.tensor(values))


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    return path


def test_load_prompts_jsonl_keeps_each_prompts_record(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "geneval.jsonl", GENEVAL_ROWS + [GENEVAL_ROWS[0]])  # an identical repeat is fine
    prompts = rc.load_prompts(_Config(output_dir="x", prompts=str(path), rewards={"geneval": 1.0}))
    assert prompts == ["a photo of two cats", "a photo of a red bus"]
    batch = ["a photo of a red bus", "a photo of two cats", "a photo of a red bus"]
    assert prompts.metadata_for(batch) == [GENEVAL_ROWS[1], GENEVAL_ROWS[0], GENEVAL_ROWS[1]]  # whole line, as upstream
    with pytest.raises(ValueError, match="no metadata record for prompt 'a dog'"):
        prompts.metadata_for(["a dog"])
    (tmp_path / "p.txt").write_text("a cat\n")
    assert rc.load_prompts(_Config(output_dir="x", prompts=str(tmp_path / "p.txt"))).metadata_for(["a cat"]) is None


@pytest.mark.parametrize("lines, match", [
    (['{"prompt": "a cat"', ], "line 1 is not JSON"),
    (['{"tag": "x"}'], 'line 1 must be an object with a non-empty "prompt"'),
    (['["a cat"]'], "must be an object"),
    ([json.dumps(GENEVAL_ROWS[0]), json.dumps({**GENEVAL_ROWS[0], "tag": "colors"})], "line 2 repeats the prompt"),
])
def test_load_prompts_jsonl_errors_name_the_line(tmp_path: Path, lines: list, match: str) -> None:
    (tmp_path / "bad.jsonl").write_text("\n".join(lines))
    with pytest.raises(ValueError, match=match):
        rc.load_prompts(_Config(output_dir="x", prompts=str(tmp_path / "bad.jsonl")))


def test_a_metadata_reward_needs_records(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("a photo of two cats\n")
    for prompts in (str(tmp_path / "p.txt"), None):
        with pytest.raises(ValueError, match="reward 'geneval' scores each image against its prompt's metadata"):
            rc.load_prompts(_Config(output_dir="x", prompts=prompts, rewards={"geneval": 1.0}))


@dataclasses.dataclass
class _TaskConfig(rc.CommonConfig):
    TINY_DEFAULTS = {"rewards": {BRIGHTNESS: 1.0}}


def test_tiny_defaults_yield_to_yaml_and_tiny_prompts_replace_prompts(tmp_path: Path) -> None:
    task = tmp_path / "task.yaml"
    task.write_text(f"output_dir: {tmp_path}\nrewards: {{ocr: 1.0}}\nprompts: full.txt\ntiny_prompts: tiny.txt\n")
    plain = tmp_path / "plain.yaml"
    plain.write_text(f"output_dir: {tmp_path}\n")
    cfg = rc.parse_config(_TaskConfig, ["--config", str(task)])
    assert (cfg.rewards, cfg.prompts) == ({"ocr": 1.0}, "full.txt")  # tiny_prompts only matters with --tiny
    cfg = rc.parse_config(_TaskConfig, ["--config", str(task), "--tiny"])
    assert (cfg.rewards, cfg.prompts, cfg.resolution) == ({"ocr": 1.0}, "tiny.txt", 32)  # the task's rewards survive
    cfg = rc.parse_config(_TaskConfig, ["--config", str(task), "--tiny", "--prompts", "mine.txt"])
    assert cfg.prompts == "mine.txt"  # an explicit flag wins
    assert rc.parse_config(_TaskConfig, ["--config", str(plain), "--tiny"]).rewards == {BRIGHTNESS: 1.0}
    assert rc.parse_config(_TaskConfig, ["--output_dir", "x", "--tiny"]).rewards == {BRIGHTNESS: 1.0}
    assert rc.parse_config(_TaskConfig, ["--config", str(plain)]).rewards == {"pickscore": 1.0}  # no --tiny


def test_prompt_metadata_reward_hands_records_to_the_reward(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "geneval.jsonl", GENEVAL_ROWS)
    prompts = rc.load_prompts(_Config(output_dir="x", prompts=str(path)))
    total = rk.compose({_RecordLength(): 1.0}, normalize="zscore")
    bound = rc.PromptMetadataReward(total, prompts)
    images = torch.rand(3, 3, 8, 8)
    batch = ["a photo of a red bus", "a photo of two cats", "a photo of a red bus"]
    assert (bound.name, bound.part_names, bound.update_stats) == (total.name, ["record_length"], True)
    before = total.state_dict()
    out = bound.evaluate(images, batch, update_stats=False)  # what RewardEvalCallback passes to a z-score composition
    assert out.details["record_length"].tolist() == [float(len(p)) for p in batch]
    assert all(torch.equal(before[k], v) for k, v in total.state_dict().items())  # update_stats reached compose
    assert bound(images, "a photo of two cats").shape == (3,)  # one prompt, broadcast


def test_eval_callbacks_score_jsonl_prompts_with_their_records(tmp_path: Path, sd3_pipe) -> None:
    path = _write_jsonl(tmp_path / "geneval.jsonl", GENEVAL_ROWS)
    cfg = _Config(output_dir=str(tmp_path), tiny=True, eval_prompts=2, eval_every=1, resolution=32,
                  num_inference_steps=2, prompts=str(path))
    (callback,) = rc.eval_callbacks(cfg, sd3_pipe, rk.compose({_RecordLength(): 1.0}))
    values = callback.maybe_evaluate(1)
    expected = sum(len(row["prompt"]) for row in GENEVAL_ROWS) / 2  # NaN rows would be left out of the mean
    assert values["eval/record_length_mean"] == pytest.approx(expected)


# --- toy reward and rewards from config ------------------------------------------------------------

def test_brightness_reward_value_gradient_and_factory_forms() -> None:
    images = torch.rand(3, 3, 8, 8, requires_grad=True)
    reward = rk.load(BRIGHTNESS)
    assert isinstance(reward, MeanBrightness) and not reward.requires_prompt
    scores = reward(images)
    torch.testing.assert_close(scores, images.detach().mean(dim=(1, 2, 3)), rtol=0, atol=1e-7)
    scores.sum().backward()
    torch.testing.assert_close(images.grad, torch.full_like(images, 1 / (3 * 8 * 8)))
    composed = rk.compose({reward: 2.0})  # keyed by reward.name ("brightness")
    torch.testing.assert_close(composed(images.detach()), 2 * scores.detach())
    with pytest.raises(ValueError, match="no weights"):
        load_brightness(weights="hf:x/y")
    with pytest.raises(TypeError, match="unknown options"):
        load_brightness(size=3)


def test_build_reward_tiny_keys_parts_by_name(tmp_path: Path) -> None:
    cfg = _Config(output_dir=str(tmp_path), tiny=True, rewards={BRIGHTNESS: 1.0, "aesthetic": 0.5},
                  normalize="zscore")
    reward = rc.build_reward(cfg, "cpu")
    output = reward.evaluate(torch.rand(2, 3, 32, 32))
    assert set(reward.part_names) == {"brightness", "aesthetic"}
    assert torch.isfinite(output.scores).all() and "aesthetic" in output.details
    assert (tmp_path / rc.TINY_WEIGHTS_FOLDER / "aesthetic").is_dir()  # tiny weights under output_dir


# --- tiny SD3 pipeline, LoRA, checkpoints ----------------------------------------------------------

def test_tiny_sd3_pipeline_generates_deterministic_images(sd3_pipe) -> None:
    from rewardkit.testing.pipelines import generate_images

    first = generate_images(sd3_pipe, ["a red cat", "a dog"], [0, 1], num_inference_steps=2, guidance_scale=4.5)
    again = generate_images(sd3_pipe, ["a red cat", "a dog"], [0, 1], num_inference_steps=2, guidance_scale=4.5)
    assert first.shape == (2, 3, 32, 32) and 0 <= float(first.min()) and float(first.max()) <= 1
    assert torch.equal(first, again) and not torch.equal(first[0], first[1])
    assert type(sd3_pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"


def test_add_lora_trains_only_adapters_and_starts_as_identity(sd3_pipe) -> None:
    from rewardkit.testing.pipelines import tiny_sd3_pipeline

    transformer = tiny_sd3_pipeline().transformer
    hidden = torch.randn(1, 4, 16, 16)
    inputs = dict(hidden_states=hidden, encoder_hidden_states=torch.randn(1, 5, 64), pooled_projections=torch.randn(1, 64),
                  timestep=torch.tensor([500.0]))
    with torch.no_grad():
        before = transformer(**inputs).sample
    params = rc.add_lora(transformer, _Config(output_dir="x", lora_rank=2, lora_alpha=2.0))
    names = [n for n, p in transformer.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names) and len(names) == len(params)
    assert all(p.dtype == torch.float32 for p in params)
    with torch.no_grad():
        torch.testing.assert_close(transformer(**inputs).sample, before, rtol=0, atol=1e-6)  # B starts at zero


def _training_state(tmp_path: Path, seed: int):
    from rewardkit.testing.pipelines import tiny_sd3_pipeline

    torch.manual_seed(seed)
    transformer = tiny_sd3_pipeline().transformer
    params = rc.add_lora(transformer, _Config(output_dir="x", lora_rank=2, lora_alpha=2.0))
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    reward = rk.compose({load_brightness(): 1.0}, normalize="zscore")
    return transformer, params, optimizer, reward


def test_checkpoint_round_trip_restores_lora_optimizer_normaliser_step_and_rng(tmp_path: Path, accelerator) -> None:
    cfg = _Config(output_dir=str(tmp_path))
    transformer, params, optimizer, reward = _training_state(tmp_path, seed=0)
    sum(p.sum() for p in params).backward()
    optimizer.step()  # non-zero LoRA B and optimizer moments
    reward(torch.rand(4, 3, 8, 8))  # running z-score statistics
    state = {"denoiser": transformer, "optimizer": optimizer, "reward": reward}
    folder = rc.save_checkpoint(accelerator, cfg, 7, state)
    expected_rng = torch.rand(3)
    saved_files = sorted(p.name for p in folder.iterdir())
    assert saved_files == ["denoiser.lora.safetensors", "meta.json", "optimizer.pt", "reward.pt", "rng_state_0.pt"]

    fresh_transformer, fresh_params, fresh_optimizer, fresh_reward = _training_state(tmp_path, seed=1)
    fresh = {"denoiser": fresh_transformer, "optimizer": fresh_optimizer, "reward": fresh_reward}
    step = rc.resume(accelerator, dataclasses.replace(cfg, resume_from="latest"), fresh)
    assert step == 7
    torch.testing.assert_close(torch.rand(3), expected_rng)  # RNG restored
    for saved, loaded in zip(params, fresh_params):
        torch.testing.assert_close(loaded, saved, rtol=0, atol=0)
    assert any(float(p.detach().abs().max()) > 0 for n, p in fresh_transformer.named_parameters() if "lora_B" in n)
    moments = [fresh_optimizer.state[p]["exp_avg"] for p in fresh_params]
    torch.testing.assert_close(moments, [optimizer.state[p]["exp_avg"] for p in params], rtol=0, atol=0)
    torch.testing.assert_close(fresh_reward.stats.state_dict(), reward.stats.state_dict(), rtol=0, atol=0)
    assert json.loads((folder / "meta.json").read_text())["step"] == 7


def test_resume_latest_picks_highest_complete_step(tmp_path: Path, accelerator) -> None:
    cfg = _Config(output_dir=str(tmp_path), resume_from="latest")
    assert rc.resume(accelerator, cfg, {}) == 0  # nothing yet: start at 0
    rc.save_checkpoint(accelerator, cfg, 2, {})
    rc.save_checkpoint(accelerator, cfg, 10, {})
    (tmp_path / "checkpoints" / "checkpoint-12").mkdir()  # interrupted save: no meta.json
    assert rc.latest_checkpoint(tmp_path).name == "checkpoint-10"
    assert rc.resume(accelerator, cfg, {}) == 10


def test_an_older_checkpoint_without_the_tracker_resumes_with_a_fresh_one(tmp_path: Path, accelerator,
                                                                          caplog) -> None:
    from rewardkit.training.trackers import PerPromptStatTracker

    cfg = _Config(output_dir=str(tmp_path))
    saved = PerPromptStatTracker("ddpo")
    saved.update(["a cat", "a cat", "a dog"], torch.tensor([1.0, 2.0, 3.0]))
    folder = rc.save_checkpoint(accelerator, cfg, 4, {"tracker": saved})
    (folder / "tracker.pt").unlink()  # what a checkpoint from before trackers were saved looks like
    fresh = PerPromptStatTracker("ddpo")
    resumed_cfg = dataclasses.replace(cfg, resume_from=str(folder))
    with caplog.at_level("WARNING"):
        assert rc.resume(accelerator, resumed_cfg, {"tracker": fresh}, fresh_if_missing=("tracker",)) == 4
    assert fresh.state_dict() == PerPromptStatTracker("ddpo").state_dict()  # untouched: starts empty
    assert "no tracker.pt" in caplog.text and "starts fresh" in caplog.text
    with pytest.raises(ValueError, match="tracker.pt is missing"):  # without the opt-in it stays an error
        rc.resume(accelerator, resumed_cfg, {"tracker": PerPromptStatTracker("ddpo")})


def test_resume_errors(tmp_path: Path, accelerator) -> None:
    cfg = _Config(output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        rc.resume(accelerator, dataclasses.replace(cfg, resume_from=str(tmp_path / "nope")), {})
    transformer, _, optimizer, _ = _training_state(tmp_path, seed=0)
    folder = rc.save_checkpoint(accelerator, cfg, 3, {"denoiser": transformer})
    with pytest.raises(ValueError, match="optimizer.pt is missing"):
        rc.resume(accelerator, dataclasses.replace(cfg, resume_from=str(folder)),
                  {"denoiser": transformer, "optimizer": optimizer})
    from rewardkit.testing.pipelines import tiny_sd3_pipeline

    other = tiny_sd3_pipeline().transformer
    rc.add_lora(other, _Config(output_dir="x", lora_rank=2), target_modules=("to_q",))
    with pytest.raises(ValueError, match="do not match the model"):
        rc.resume(accelerator, dataclasses.replace(cfg, resume_from=str(folder)), {"denoiser": other})


# --- logging and evaluation wiring -----------------------------------------------------------------

def test_log_metrics_converts_tensors() -> None:
    fake = _fake_accelerator()
    values = rc.log_metrics(fake, {"loss": torch.tensor([1.0, 3.0]), "kl": 0.5}, step=4)
    assert values == {"loss": 2.0, "kl": 0.5} and fake.logged == [(4, values)]


def test_eval_callbacks_reward_and_fid(tmp_path: Path, sd3_pipe) -> None:
    from rewardkit.integrations.callbacks import FIDEvalCallback, RewardEvalCallback

    reward = rk.compose({load_brightness(): 1.0})
    cfg = _Config(output_dir=str(tmp_path), tiny=True, eval_prompts=2, eval_every=1, resolution=32,
                  num_inference_steps=2, fid_reference=str(tmp_path / "missing.npz"))
    with pytest.raises(ValueError, match="fid_reference"):
        rc.eval_callbacks(cfg, sd3_pipe, reward)
    cfg = dataclasses.replace(cfg, fid_reference=None)
    (callback,) = rc.eval_callbacks(cfg, sd3_pipe, reward)
    assert isinstance(callback, RewardEvalCallback)
    values = callback.maybe_evaluate(1)
    assert 0 < values["eval/composed_mean"] < 1 and "eval/brightness_mean" in values
    reference = tmp_path / "reference"
    reference.mkdir()
    from PIL import Image

    for i in range(3):
        Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(reference / f"{i}.png")
    cfg = dataclasses.replace(cfg, fid_reference=str(reference))
    callbacks = rc.eval_callbacks(cfg, sd3_pipe, reward)
    assert isinstance(callbacks[1], FIDEvalCallback)
    assert callbacks[1].maybe_evaluate(1)["eval/fid"] >= 0


# --- reward-hacking alarm: config -> callbacks, stop, callback state in checkpoints ------------------

class _Worsening(Reward):
    """Scores ``-n`` on its ``n``-th call: a held-out value that worsens at every evaluation."""

    name = "worsening"
    requires_prompt = False
    differentiable = False

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def score(self, images, prompts, **context):
        self.calls += 1
        return RewardOutput(torch.full((len(images),), -float(self.calls)))


def _alarm_config(tmp_path: Path, **fields) -> _Config:
    return _Config(output_dir=str(tmp_path), tiny=True, eval_prompts=2, eval_every=1, resolution=32,
                   num_inference_steps=2, hacking_alarm_window=2, **fields)


@pytest.mark.parametrize(("fields", "match"), [({"hacking_alarm_window": 1}, "0 \\(off\\) or >= 2"),
                                               ({"hacking_alarm_window": -3}, "0 \\(off\\) or >= 2"),
                                               ({"stop_on_hacking_alarm": True}, "needs the alarm on")])
def test_hacking_alarm_config_is_checked(fields: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _Config(output_dir="x", **fields)


def test_hacking_alarm_window_gives_each_callback_an_alarm_that_stops_the_run(tmp_path: Path, sd3_pipe,
                                                                             caplog) -> None:
    from rewardkit.integrations.hacking_alarm import RewardHackingAlarm
    from rewardkit.recipe_support.models import stop_requested

    off = rc.eval_callbacks(_Config(output_dir=str(tmp_path), eval_prompts=2), sd3_pipe,
                            rk.compose({load_brightness(): 1.0}))
    assert off[0].alarm is None and not off[0].stop_on_alarm  # the default (window 0) adds no alarm
    reference = tmp_path / "reference"
    reference.mkdir()
    from PIL import Image

    for i in range(3):
        Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(reference / f"{i}.png")
    cfg = _alarm_config(tmp_path, stop_on_hacking_alarm=True, fid_reference=str(reference))
    callbacks = rc.eval_callbacks(cfg, sd3_pipe, rk.compose({_Worsening(): 1.0}))
    assert [type(c.alarm) for c in callbacks] == [RewardHackingAlarm] * 2
    assert callbacks[0].alarm is not callbacks[1].alarm  # each keeps its own history
    assert all(c.alarm.window == 2 and c.stop_on_alarm for c in callbacks)
    (reward_callback, _) = callbacks
    for step, train in ((1, 0.1), (2, 0.2)):  # the optimised reward rises while the held-out one falls
        reward_callback.record_train_reward(torch.tensor([train, train, float("nan")]))  # NaN rows left out
        with pytest.warns(UserWarning, match="possible reward hacking") if step == 2 else contextlib.nullcontext():
            values = reward_callback.maybe_evaluate(step)
        assert values["eval/train_reward"] == pytest.approx(train)
        assert values["eval/hacking_alarm"] == float(step == 2)
        assert stop_requested(callbacks, step) is (step == 2)
    assert "stopping at step 2" in caplog.text and "worsening_mean" in caplog.text


def test_callback_states_survive_a_checkpoint_and_old_checkpoints_resume_fresh(tmp_path: Path, sd3_pipe,
                                                                               accelerator, caplog) -> None:
    reference = tmp_path / "reference"
    reference.mkdir()
    from PIL import Image

    for i in range(3):
        Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(reference / f"{i}.png")
    cfg = _alarm_config(tmp_path, stop_on_hacking_alarm=True, fid_reference=str(reference))
    callbacks = rc.eval_callbacks(cfg, sd3_pipe, rk.compose({_Worsening(): 1.0}), accelerator)
    for step, train in ((1, 0.1), (2, 0.2)):
        for callback in callbacks:
            callback.record_train_reward(train)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the alarm's warning (tested above)
                callback.maybe_evaluate(step, accelerator)
    for callback in callbacks:
        callback.record_train_reward([0.5, 0.7])  # recorded after the last evaluation: pending, must survive
    # the reward callback's held-out value fell; FID of the same seeded images is flat (no alarm)
    assert [c.should_stop for c in callbacks] == [True, False]
    saved = [c.state_dict() for c in callbacks]
    folder = rc.save_checkpoint(accelerator, cfg, 2, {}, callbacks)
    assert (folder / "callbacks.pt").is_file()

    resumed_cfg = dataclasses.replace(cfg, resume_from=str(folder))
    fresh = rc.eval_callbacks(cfg, sd3_pipe, rk.compose({_Worsening(): 1.0}), accelerator)
    assert rc.resume(accelerator, resumed_cfg, {}, callbacks=fresh) == 2
    assert "had stopped the run on its hacking alarm; continuing" in caplog.text
    for before, callback in zip(saved, fresh):
        after = callback.state_dict()
        assert not callback.should_stop and not callback.should_evaluate(2)  # done step 2 is not evaluated again
        assert after["alarm"] == before["alarm"] and len(after["alarm"]["history"]) == 2
        assert after["train_reward"] == pytest.approx([2.0, 1.2])  # the pending [count, sum]
    restored = fresh[1].state_dict()["reference"]  # FID's reference, frozen at the first evaluation
    assert restored["meta"] == saved[1]["reference"]["meta"] and restored["n"] == saved[1]["reference"]["n"] == 3
    torch.testing.assert_close((restored["mu"], restored["sigma"]),
                               (saved[1]["reference"]["mu"], saved[1]["reference"]["sigma"]), rtol=0, atol=0)

    (folder / "callbacks.pt").unlink()  # a checkpoint written before callback states were saved
    caplog.clear()
    older = rc.eval_callbacks(cfg, sd3_pipe, rk.compose({_Worsening(): 1.0}), accelerator)
    assert rc.resume(accelerator, resumed_cfg, {}, callbacks=older) == 2
    assert "has no callbacks.pt" in caplog.text and "start fresh" in caplog.text
    assert all(c.last_step is None and c.alarm.history == [] for c in older)
    assert older[1].state_dict()["reference"] is None  # recomputed from the images at the next evaluation

    rc.save_checkpoint(accelerator, cfg, 2, {}, callbacks)
    no_alarm = rc.eval_callbacks(dataclasses.replace(cfg, hacking_alarm_window=0, stop_on_hacking_alarm=False),
                                 sd3_pipe, rk.compose({_Worsening(): 1.0}), accelerator)
    with pytest.raises(ValueError, match="alarm"):
        rc.resume(accelerator, resumed_cfg, {}, callbacks=no_alarm)
    with pytest.raises(ValueError, match="holds callbacks"):
        rc.resume(accelerator, resumed_cfg, {}, callbacks=no_alarm[:1])


def test_evaluate_recipe_scores_jsonl_prompts_with_their_records(tmp_path: Path, sd3_pipe) -> None:
    """recipes/evaluate.py: .jsonl rows reach the reward as metadata= through run_evaluation; a z-score
    composition's statistics stay frozen; a .txt file gives plain prompt rows without records."""
    from recipe_harness import import_recipe
    from rewardkit.integrations.evaluation import run_evaluation

    evaluate = import_recipe("evaluate")
    path = _write_jsonl(tmp_path / "geneval.jsonl", GENEVAL_ROWS)
    cfg = rc.parse_config(evaluate.EvalConfig, ["--output_dir", str(tmp_path), "--prompt_file", str(path),
                                                "--seeds_per_prompt", "2", "--rewards", '{"pickscore": 1.0}'])
    prompts, seeds = evaluate.load_prompt_rows(cfg)
    assert prompts.metadata_for(prompts) == [row for row in GENEVAL_ROWS for _ in range(2)] and seeds == [0, 1, 0, 1]
    total = rk.compose({_RecordLength(): 1.0}, normalize="zscore")
    before = {k: v.clone() for k, v in total.state_dict().items()}
    result = run_evaluation(sd3_pipe, prompts, seeds, {"reward": evaluate.MetadataReward(total, prompts)},
                            call_kwargs={"num_inference_steps": 2, "height": 32, "width": 32})
    lengths = [float(len(row["prompt"])) for row in GENEVAL_ROWS for _ in range(2)]
    assert [row["record_length"] for row in result.rows] == lengths  # NaN without metadata=
    assert all(torch.equal(before[k], v) for k, v in total.state_dict().items())
    (tmp_path / "p.txt").write_text("one\n two \n\nthree\n")
    txt = dataclasses.replace(cfg, prompt_file=str(tmp_path / "p.txt"), seeds_per_prompt=1)
    rows, _ = evaluate.load_prompt_rows(txt)
    assert rows == ["one", "two", "three"] and not rows.records
