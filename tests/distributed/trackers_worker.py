"""Run by tests/test_trackers.py under torchrun with 2 CPU processes (gloo): several tracker updates on
uneven shards (5 + 7 rows of each 12-row batch); writes each rank's advantages and final state."""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
import torch.distributed as dist

from rewardkit.training.trackers import PerPromptStatTracker


def _batches(n_batches: int, seed: int, group: int = 4, n_prompts: int = 3, pool: int = 5):
    """The same batches as tests/test_trackers.py::_batches."""
    rng = np.random.default_rng(seed)
    for _ in range(n_batches):
        chosen = rng.choice(pool, size=n_prompts, replace=False)
        prompts = [f"prompt {k}" for k in chosen for _ in range(group)]
        yield prompts, np.repeat(chosen.astype(np.float64), group) + rng.normal(size=len(prompts))


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    rows = slice(0, 5) if rank == 0 else slice(5, 12)
    result = {}
    for style, options in (("ddpo", {"buffer_size": 6, "min_count": 4}), ("flow_grpo", {})):
        tracker = PerPromptStatTracker(style, **options)
        advantages = []
        for prompts, rewards in _batches(4, seed=7):
            advantages.append(tracker.update(prompts[rows], torch.tensor(rewards[rows])).tolist())
        state = tracker.state_dict()
        state["history"] = [h.tolist() for h in state["history"]]
        result[style] = {"advantages": advantages, "state": state}
    with open(f"{out_path}.{rank}", "w") as handle:
        json.dump(result, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
