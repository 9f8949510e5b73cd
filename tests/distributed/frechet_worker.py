"""Run by tests/test_frechet.py under torchrun with 2 CPU processes (gloo): uneven shards, two sync APIs."""

from __future__ import annotations

import json
import sys

import torch.distributed as dist

import rewardkit.testing as rkt
from rewardkit.metrics.feature_store import FeatureStore
from rewardkit.metrics.fid import FrechetDistance
from rewardkit.testing.metrics import PixelFeatures

REAL_SPLIT, FAKE_SPLIT = 5, 3  # rank 0 takes the first rows, rank 1 the rest


def _shard(metric: FrechetDistance, rank: int) -> FrechetDistance:
    real, fake = rkt.random_images(13, 16, 16, seed=10), rkt.random_images(11, 16, 16, seed=11)
    metric.update(real[:REAL_SPLIT] if rank == 0 else real[REAL_SPLIT:], real=True)
    metric.update(fake[:FAKE_SPLIT] if rank == 0 else fake[FAKE_SPLIT:], real=False)
    return metric


def main(out_path: str) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)  # initialises the default (gloo) group from torchrun's variables
    rank = dist.get_rank()
    plain = _shard(FrechetDistance(PixelFeatures(dim=12).freeze(), batch_size=4), rank)
    plain.sync()
    with_accelerate = _shard(FrechetDistance(PixelFeatures(dim=12).freeze(), batch_size=4), rank)
    with_accelerate.sync(accelerator)
    store = FeatureStore()
    extractor = PixelFeatures(dim=12).freeze()
    store.add(extractor(extractor.prep.tensor(255 * rkt.random_images(REAL_SPLIT + 3 * rank, 16, 16))), real=True)
    store.add(extractor(extractor.prep.tensor(255 * rkt.random_images(FAKE_SPLIT + 5 * rank, 16, 16))), real=False)
    store.sync(accelerator)
    result = {"n": [plain.real.n, plain.fake.n], "torch_distributed": float(plain.compute()),
              "accelerate": float(with_accelerate.compute()),
              "gathered_rows": [store.count(True), store.count(False)]}
    with open(f"{out_path}.{rank}", "w") as handle:
        json.dump(result, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
