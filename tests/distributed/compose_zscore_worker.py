"""Run by tests/test_compose.py under torchrun with 2 CPU processes (gloo): z-score statistics sync."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from rewardkit.compose import compose
from rewardkit.protocols import Reward, RewardOutput


class RankValues(Reward):
    requires_prompt = False
    differentiable = False
    name = "a"

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.values = values

    def score(self, images, prompts, **context):
        return RewardOutput(torch.tensor(self.values))


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    values = [[1.0, 2.0, float("nan")], [4.0, 5.0, 6.0]][rank]  # ranks see different batches
    reward = compose({RankValues(values): 1.0}, normalize="zscore")
    scores = reward(torch.zeros(3, 3, 4, 4))
    stats = reward.stats["a"]
    result = {"count": stats.count.item(), "mean": stats.mean.item(), "std": stats.std.item(), "scores": scores.tolist()}
    with open(f"{out_path}.{rank}", "w") as handle:
        json.dump(result, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
