"""Run by tests/test_integrations_callbacks.py under torchrun with 2 CPU ranks (gloo).

Uneven shards (5 prompts -> 3 + 2; 1 prompt -> 1 + 0), FID with a reference computed from sharded
images at first use, a composed reward, and a capturing accelerate tracker on the main process.
"""

from __future__ import annotations

import json
import sys

import torch
from torch import nn

import rewardkit as rk
import rewardkit.testing as rkt
from rewardkit.integrations.callbacks import FIDEvalCallback, RewardEvalCallback
from rewardkit.metrics.fid import FrechetDistance
from rewardkit.protocols import Reward, RewardOutput
from rewardkit.testing.metrics import PixelFeatures

PROMPTS = ["a red cat", "a blue dog", "a green frog", "a white horse", "a black bird"]
SIDE, FEATURE_DIM, EVERY = 16, 8, 2


class Brightness(Reward):
    name, requires_prompt, differentiable = "brightness", False, True

    def score(self, images, prompts, **context):
        return RewardOutput(images.mean(dim=(1, 2, 3)).float())


class Redness(Reward):
    name, requires_prompt, differentiable = "redness", False, True

    def score(self, images, prompts, **context):
        return RewardOutput((images[:, 0] - images[:, 1:].mean(1)).mean(dim=(1, 2)).float())


def generate(prompts: list[str], seeds: list[int]) -> torch.Tensor:
    """Each image depends only on its seed and prompt length (float [0, 1], (B, 3, 16, 16))."""
    images = [rkt.random_images(1, SIDE, SIDE, seed=100 + seed) ** (1 + len(p) % 3) for p, seed in zip(prompts, seeds)]
    return torch.cat(images) if images else torch.zeros(0, 3, SIDE, SIDE)


def reference_images() -> torch.Tensor:
    return rkt.random_images(7, SIDE, SIDE, seed=7)


def build(kind: str, prompts: list[str] = PROMPTS, generate_fn=generate):
    """The callbacks compared between the 2-rank run and one process."""
    if kind == "fid":
        metric = FrechetDistance(PixelFeatures(dim=FEATURE_DIM).freeze(), batch_size=2)
        return FIDEvalCallback(metric, prompts, reference_images=reference_images(), every_n_steps=EVERY,
                               generate_fn=generate_fn, batch_size=2)
    reward = rk.compose({Brightness(): 1.0, Redness(): 0.5}, normalize="none")
    return RewardEvalCallback(reward, prompts, every_n_steps=EVERY, generate_fn=generate_fn, batch_size=2)


def make_tracker():
    from accelerate.tracking import GeneralTracker

    class Capture(GeneralTracker):
        name, requires_logging_directory, main_process_only = "capture", False, True

        def __init__(self) -> None:
            super().__init__()
            self.logs: list[dict] = []

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values: dict) -> None:
            pass

        def log(self, values: dict, step: int | None = None, **kwargs) -> None:
            self.logs.append({"step": step, **values})

    return Capture()


def main(out_path: str) -> None:
    from accelerate import Accelerator

    torch.set_num_threads(1)
    tracker = make_tracker()
    accelerator = Accelerator(cpu=True, log_with=[tracker])
    accelerator.init_trackers("callbacks-test")
    calls: list[int] = []

    def counting(prompts, seeds):
        calls.append(len(prompts))
        return generate(prompts, seeds)

    callbacks = {"fid": build("fid", generate_fn=counting), "reward": build("reward"),
                 "reward_one_prompt": build("reward", prompts=PROMPTS[:1])}
    module = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()
    results: dict[str, dict[int, dict]] = {name: {} for name in callbacks}
    for step in range(1, 5):
        for name, callback in callbacks.items():
            values = callback.maybe_evaluate(step, accelerator, model=module)
            if values is not None:
                results[name][step] = values
    result = {"rank": accelerator.process_index, "world": accelerator.num_processes, "results": results,
              "calls": calls, "logged": tracker.logs, "module_training": module.training}
    with open(f"{out_path}.{accelerator.process_index}", "w") as handle:
        json.dump(result, handle)
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
