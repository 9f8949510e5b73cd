"""Run by tests/test_callbacks_concurrency.py under torchrun with 2 CPU ranks (gloo).

While the evaluation callbacks evaluate (tiny CLIP aesthetic + toy parts composed; FID on pixel
features; a z-score composition), the same composed reward scores training batches on a 3-thread pool,
with rank-dependent sleeps in the pool jobs and in generation, so the ranks reach each collective at
different times and with different jobs still in flight. The z-score composition is also trained on the
pool (ticketed, all-reducing) and resolved before each evaluation. Each rank writes what it logged, what
the pool returned and the z-score statistics.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import rewardkit as rk
import rewardkit.testing as rkt
from callbacks_worker import FEATURE_DIM, PROMPTS, SIDE, Brightness, Redness, generate, make_tracker, reference_images
from rewardkit.integrations.callbacks import FIDEvalCallback, RewardEvalCallback
from rewardkit.integrations.hacking_alarm import RewardHackingAlarm
from rewardkit.metrics.fid import FrechetDistance
from rewardkit.testing.metrics import PixelFeatures

STEPS, EVERY, JOBS_PER_STEP, POOL_THREADS = 4, 2, 3, 3
DELAY_S = 0.02  # per-rank, per-job sleep unit: shifts when each rank reaches its collectives


def composed_reward(root: Path):
    """Tiny CLIP aesthetic (real loading code) + two toy parts, no running statistics."""
    aesthetic = rkt.load_tiny("aesthetic", root)
    return rk.compose({aesthetic: 1.0, Brightness(): 0.5, Redness(): 2.0}, normalize="none")


def zscore_reward():
    """Toy parts under running z-score statistics: every training call all-reduces them (ticketed)."""
    return rk.compose({Brightness(): 1.0, Redness(): 1.0}, normalize="zscore", name="zcomposed")


def build(root: Path, generate_fn=generate) -> dict:
    """The callbacks, one image per generate/score call so that no row depends on its batch-mates."""
    # Pixel features keep this fast (the tiny FID-Inception is exercised in test_integrations_callbacks.py);
    # one image per feature batch, so no feature row depends on its batch-mates either.
    fid = FrechetDistance(PixelFeatures(dim=FEATURE_DIM).freeze(), batch_size=1)
    reward = composed_reward(root)
    return {"reward": RewardEvalCallback(reward, PROMPTS, every_n_steps=EVERY, generate_fn=generate_fn, batch_size=1,
                                         alarm=RewardHackingAlarm(window=2)),
            "fid": FIDEvalCallback(fid, PROMPTS, every_n_steps=EVERY, generate_fn=generate_fn, batch_size=1,
                                   reference_images=reference_images()),
            # uneven shards: 3 evaluation calls on rank 0, 2 on rank 1, none of them a collective
            "zscore": RewardEvalCallback(zscore_reward(), PROMPTS, every_n_steps=EVERY, generate_fn=generate_fn,
                                         batch_size=1)}


def training_batch(rank: int, step: int, job: int) -> tuple[torch.Tensor, list[str]]:
    """Rank-dependent training images (as under DDP), 2 per job."""
    seed = 1000 + 100 * rank + 10 * step + job
    return rkt.random_images(2, SIDE, SIDE, seed=seed), [PROMPTS[job % len(PROMPTS)]] * 2


def main(out_path: str) -> None:
    from accelerate import Accelerator

    torch.set_num_threads(1)
    tracker = make_tracker()
    accelerator = Accelerator(cpu=True, log_with=[tracker])
    accelerator.init_trackers("callbacks-concurrency")
    rank = accelerator.process_index

    def slow_generate(prompts, seeds):
        time.sleep(DELAY_S * rank)  # rank 1 reaches the reduction later
        return generate(prompts, seeds)

    callbacks = build(Path(f"{out_path}.tiny{rank}"), slow_generate)
    reward, zreward = callbacks["reward"].reward, callbacks["zscore"].reward

    def job(step: int, index: int) -> list[float]:
        time.sleep(DELAY_S * ((index + rank) % JOBS_PER_STEP))  # finishing order differs by rank
        images, prompts = training_batch(rank, step, index)
        return reward(images, prompts).tolist()

    def zjob(step: int, index: int, ticket) -> list[float]:
        time.sleep(DELAY_S * ((index + rank) % JOBS_PER_STEP))
        images, prompts = training_batch(rank, step, index)
        return zreward.evaluate(images, prompts, ticket=ticket).scores.tolist()

    results: dict[str, dict[int, dict]] = {name: {} for name in callbacks}
    train: dict[str, list[float]] = {}
    with ThreadPoolExecutor(max_workers=POOL_THREADS) as pool:
        for step in range(1, STEPS + 1):
            futures = [pool.submit(job, step, index) for index in range(JOBS_PER_STEP)]
            # z-score calls all-reduce from pool threads: reserve their order at submission, and let them
            # finish before the evaluation issues its own collectives (two threads must never interleave
            # collectives on one process group: ranks could pair them differently)
            zfutures = [pool.submit(zjob, step, index, zreward.reserve()) for index in range(JOBS_PER_STEP)]
            for index, future in enumerate(zfutures):
                train[f"z{step}/{index}"] = future.result()
            for name, callback in callbacks.items():  # evaluates while the stateless jobs are in flight
                values = callback.maybe_evaluate(step, accelerator)
                if values is not None:
                    results[name][step] = values
            for index, future in enumerate(futures):
                scores = future.result()
                train[f"{step}/{index}"] = scores
                callbacks["reward"].record_train_reward(torch.tensor(scores))
    result = {"rank": rank, "world": accelerator.num_processes, "results": results, "train": train,
              "logged": tracker.logs, "zscore_state": {k: v.tolist() for k, v in zreward.state_dict().items()}}
    with open(f"{out_path}.{rank}", "w") as handle:
        json.dump(result, handle)
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
