"""Run by tests/test_integrations_advantages.py under torchrun with 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from rewardkit.training.advantages import per_prompt_advantages

# The global batch of the single-process test, split unevenly across the two ranks (3 + 5 rows).
SCORES = [1.0, 2.0, 3.0, 10.0, 20.0, float("nan"), 4.0, 30.0]
PROMPTS = ["a", "a", "a", "b", "b", "b", "a", "b"]


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    rows = slice(0, 3) if rank == 0 else slice(3, 8)
    result = {}
    for std in ("group", "global", "none"):
        advantages = per_prompt_advantages(torch.tensor(SCORES[rows]), PROMPTS[rows], std=std)
        result[std] = advantages.tolist()
    with open(f"{out_path}.{rank}", "w") as handle:
        json.dump(result, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
