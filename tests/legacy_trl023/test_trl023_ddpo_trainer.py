"""trl 0.23's DDPOTrainer trains 2 steps on a tiny SD pipeline with ``as_ddpo_reward`` rewards, sync and async.

Runs only in its own environment (``.venv-trl023``, built by ``.ci/run`` from ``requirements.txt`` here): trl 0.24
removed DDPOTrainer and the main environment runs TRL 1.x. The main suite does not collect this folder.

What the trainer does with the reward (``trl/trainer/ddpo_trainer.py`` 0.23.1, ``compute_rewards`` / ``step``):
sync ``reward, meta = reward_fn(images, prompts, prompt_metadata)`` then ``torch.as_tensor(reward)``; with
``async_reward_computation=True`` ``executor.map(lambda x: reward_fn(*x), batches)`` then ``.result()`` on both
returned values; then ``torch.cat``, per-prompt advantages and PPO steps on the UNet.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import rewardkit as rk
import rewardkit.testing as rkt
from rewardkit.testing.pipelines import tiny_sd_pipeline
from rewardkit.integrations.ddpo import as_ddpo_reward

# Only its own environment collects this module, so a missing or newer trl is the wrong environment: an error,
# never a skip (a skipped trainer test would prove nothing).
try:
    import trl
except ImportError as error:
    raise RuntimeError("trl is not installed: run this folder in the .venv-trl023 environment "
                       "(pip install -r tests/legacy_trl023/requirements.txt)") from error
if not hasattr(trl, "DDPOTrainer"):
    raise RuntimeError(f"trl {trl.__version__} has no DDPOTrainer; install tests/legacy_trl023/requirements.txt")

PROMPTS = ["a red cat", "a blue dog", "a green bird"]
EPOCHS = 2  # "2 steps": DDPOTrainer.train(epochs) runs one step() per epoch
BATCH = 2


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD 1.x pipeline saved with save_pretrained: DefaultDDPOStableDiffusionPipeline loads a model id/path."""
    root = tmp_path_factory.mktemp("pipe")
    tiny_sd_pipeline(root=root)
    return root / "tiny-sd"


@pytest.fixture(scope="module")
def reward(tmp_path_factory: pytest.TempPathFactory):
    """A composition of a tiny LAION aesthetic model and DDPO's JPEG compressibility (kB)."""
    aesthetic = rkt.load_tiny("aesthetic", tmp_path_factory.mktemp("tiny"))
    return rk.compose({aesthetic: 1.0, "jpeg-compressibility": 0.1})


class Recorder:
    """Wraps the adapter to keep what the trainer passed and what the adapter returned (futures resolved)."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, []

    def __call__(self, images, prompts, prompt_metadata):
        out = self.fn(images, prompts, prompt_metadata)
        self.calls.append((images, prompts, prompt_metadata, out))
        return out


def _train(folder: Path, reward_fn, async_rewards: bool) -> tuple[object, torch.nn.Module]:
    from accelerate import PartialState
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    PartialState(cpu=True)  # DDPOTrainer logs through accelerate before it builds its Accelerator
    config = DDPOConfig(
        num_epochs=EPOCHS, sample_num_steps=2, sample_batch_size=BATCH, sample_num_batches_per_epoch=2,
        train_batch_size=BATCH, train_gradient_accumulation_steps=1, train_num_inner_epochs=1,
        train_learning_rate=1e-3, mixed_precision="no", log_with=None, save_freq=1000,
        per_prompt_stat_tracking=True, per_prompt_stat_tracking_min_count=2,
        async_reward_computation=async_rewards, max_workers=2, accelerator_kwargs={"cpu": True}, seed=0,
    )
    pipeline = DefaultDDPOStableDiffusionPipeline(str(folder), use_lora=False)
    cycle = iter(range(10**6))

    def prompt_fn() -> tuple[str, dict]:
        index = next(cycle)
        return PROMPTS[index % len(PROMPTS)], {"index": index}

    trainer = DDPOTrainer(config, reward_fn, prompt_fn, pipeline)
    trainer.train()
    return trainer, pipeline.unet


def _check_calls(recorder: Recorder, reward, is_async: bool) -> None:
    assert len(recorder.calls) == EPOCHS * 2  # two sampling batches per epoch
    for images, prompts, metadata, (rewards, info) in recorder.calls:
        assert isinstance(images, torch.Tensor) and images.shape[:2] == (BATCH, 3) and images.dtype == torch.float32
        assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
        assert isinstance(prompts, tuple) and isinstance(metadata, tuple) and isinstance(metadata[0], dict)
        if is_async:
            assert isinstance(rewards, Future) and isinstance(info, Future)
            rewards, info = rewards.result(), info.result()
        expected = reward(images, list(prompts))
        assert torch.equal(rewards, expected) and all(math.isfinite(v) for v in rewards.tolist())
        assert {"aesthetic", "jpeg-compressibility"} <= set(info)


def test_ddpo_trainer_trains_two_steps_sync_and_async(pipeline_folder: Path, reward) -> None:
    from diffusers import UNet2DConditionModel

    start = UNet2DConditionModel.from_pretrained(str(pipeline_folder), subfolder="unet").state_dict()
    sync = Recorder(as_ddpo_reward(reward))
    _, sync_unet = _train(pipeline_folder, sync, async_rewards=False)
    _check_calls(sync, reward, is_async=False)

    with ThreadPoolExecutor(max_workers=1) as pool:
        late = Recorder(as_ddpo_reward(reward, executor=pool))
        _, async_unet = _train(pipeline_folder, late, async_rewards=True)
    _check_calls(late, reward, is_async=True)

    trained = sync_unet.state_dict()
    moved = [k for k in start if not torch.equal(start[k], trained[k].cpu())]
    assert moved, "two DDPO steps must update the UNet"
    assert all(torch.isfinite(v).all() for v in trained.values())
    # Same seed, same samples, same rewards: the async path trains exactly what the sync path trains.
    for key, value in async_unet.state_dict().items():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=0)
