"""Speed of rewardkit's CLIP-family rewards against the reference computation, on the same weights, on CPU.

For each reward a seeded random checkpoint of the chosen size is written in the reward's real format
(Hugging Face folder for pickscore / clip-score / the aesthetic tower + MLP head ``.pth``, HPS
``{"state_dict": ...}`` ``.pt`` for hpsv2, open_clip hub folder for bioclip). rewardkit loads it with
``rk.load`` (exact fp32 and ``dtype="bf16"``); the reference loads the same files with the upstream
libraries, the way the upstream projects call them:

* pickscore, clip-score: ``CLIPModel.from_pretrained`` + ``CLIPProcessor`` (PIL backend, which is what
  rewardkit's exact path reproduces), ``get_image_features`` / ``get_text_features``, ``x / x.norm()``,
  ``logit_scale.exp() * cos`` (PickScore README) or ``2.5 * max(cos, 0)`` (CLIPScore);
* hpsv2: open_clip model + ``load_state_dict(checkpoint["state_dict"])``, the HPSv2 letterbox
  transform (written below from ``hpsv2/src/open_clip/transform.py``), open_clip tokenizer,
  ``diag(image_features @ text_features.T)``; batched (upstream ``hpsv2.score`` loops batch 1);
* aesthetic: ``CLIPModel.from_pretrained`` image features + OpenAI ``clip.load`` preprocessing
  (torchvision on PIL) + numpy L2 normalisation + the ``simple_inference.py`` MLP;
* bioclip: ``open_clip.create_model_and_transforms("local-dir:...")`` + its ``preprocess_val`` +
  ``open_clip.get_tokenizer``, ``logit_scale.exp() * cos``.

Input: a GRPO-shaped batch, 8 distinct prompts x 4 images, 512x512 smooth random RGB images (uint8 PIL
for the reference and rewardkit's exact path; the same pixels / 255 as a float tensor for the tensor
path). Timed under ``torch.inference_mode()``, after one warm-up call, median of ``--repeats``; modes
are interleaved within each repeat so that a change of machine load hits all of them alike. rewardkit
caches text embeddings across calls: "cold" rows clear ``reward.prompt_cache`` before every timed call,
"warm" rows keep it (an RL-loop advantage, labelled as such).

Usage:
    .venv/bin/python benchmarks/bench_clip_rewards.py --size tiny --repeats 2 --out /tmp/smoke.md
    .venv/bin/python benchmarks/bench_clip_rewards.py --rewards pickscore hpsv2 aesthetic --repeats 3

The pieces live in ``benchmarks/clip_bench/`` (inputs, checkpoints, references, timing, run, report); this
script is the command line and re-exports the names the other benchmarks import from it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from clip_bench.checkpoints import ALL_REWARDS, SIZES  # noqa: E402
from clip_bench.inputs import GROUP_SIZE, GROUPS, IMAGE_SIDE, PROMPTS, make_images, to_float_tensor  # noqa: E402
from clip_bench.report import machine_description, speed_table, write_report  # noqa: E402
from clip_bench.run import bench_reward  # noqa: E402

# Re-exported for bench_compose, bench_serve, bench_hpsv3, bench_imagereward and measure_tensor_path_gap,
# which import them from this script.
from clip_bench.checkpoints import Arch, write_checkpoint  # noqa: E402, F401
from clip_bench.timing import CpuContention, Mode, median_s, native_bf16, time_modes  # noqa: E402, F401

DEFAULT_REWARDS = ("pickscore", "hpsv2", "aesthetic")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rewards", nargs="+", default=list(DEFAULT_REWARDS), choices=ALL_REWARDS)
    parser.add_argument("--size", default="vit-b-16", choices=sorted(SIZES),
                        help="random checkpoint size (default: ViT-B/16-like; 'tiny' for a smoke run)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per mode (median reported)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "clip_rewards.md")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--breakdown", action="store_true",
                        help="also time preprocessing / image tower / text tower separately")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("REWARDKIT_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    arch = SIZES[args.size]
    pil_images = make_images(GROUPS * GROUP_SIZE, IMAGE_SIDE, seed=args.seed)
    tensor_images = to_float_tensor(pil_images)
    prompts = [prompt for prompt in PROMPTS[:GROUPS] for _ in range(GROUP_SIZE)]
    header = machine_description(args.threads)
    print("\n".join(header), flush=True)
    results = []
    for name in args.rewards:
        start = time.perf_counter()
        results.append(bench_reward(name, arch, args, pil_images, tensor_images, prompts))
        print(f"[{name}] done in {time.perf_counter() - start:.0f} s "
              f"(other processes: {results[-1]['other_cores']:.2f} cores)", flush=True)
        print("\n".join(speed_table(results[-1:])), flush=True)
        report = write_report(results, args, arch, header)  # after every reward: a long run keeps its part
    print(report)
    print(f"written to {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
