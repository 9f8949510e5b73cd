"""Batched VLM-judge generation vs the reference's one-sample-at-a-time loop, on the tiny Qwen VLMs (CPU).

DiffSynth-Studio's generative metrics (``diffsynth/metrics/unified_reward_2.py``,
``unified_reward_edit.py``, ``qwen_image_bench.py``) score one sample at a time: per image
``apply_chat_template`` -> ``processor(text=[text], images=[image])`` -> ``model.generate`` (greedy,
batch 1) -> ``batch_decode(...)[0]`` (/work/shared/reference/vlm_family.md §2). rewardkit's
``TransformersBackend`` sends every request of a judge call through left-padded batches of
``--batch-size``. Both run here side by side on the same model, images and prompts, greedy, and the
script checks that they return the same texts.

Models: ``rewardkit.testing.tiny_qwen_vl`` (qwen2_vl, qwen3_vl, qwen3_5; hidden 64, 2-4 layers, seeded
random weights). These are overhead-bound toys: the ratio says how much per-call overhead batching
removes, not what a 9B judge gains on a GPU (there decoding at batch 1 is memory-bound, so batching
helps even more, per the estimates of vlm_family.md §4.5; not measured here: no GPU in this run).
Timings: median of ``--repeats`` interleaved rounds after one warm-up round.

Usage:
    .venv/bin/python benchmarks/bench_vlm.py                    # writes benchmarks/results/vlm.md
    .venv/bin/python benchmarks/bench_vlm.py --repeats 1 --images 4 --out /tmp/vlm.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from bench_clip_rewards import machine_description  # noqa: E402
from rewardkit.testing.vlm import VLM_FAMILIES, tiny_qwen_vl  # noqa: E402
from rewardkit.vlm import ChatRequest, GenerationSettings, TransformersBackend  # noqa: E402

IMAGE_SIDE = 64  # pixels: 16 merged visual tokens per image on the tiny processors


def make_requests(count: int, max_new_tokens: int, seed: int = 0) -> list[ChatRequest]:
    """``count`` single-image requests with prompts of different lengths (so padding is exercised)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    requests = []
    for i in range(count):
        image = Image.fromarray(rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8))
        text = f"Text Caption: [a photo number {i}]" + " Rate it." * (i % 3)
        requests.append(ChatRequest([{"role": "user", "content": [{"type": "image", "image": image},
                                                                   {"type": "text", "text": text}]}], settings))
    return requests


def reference_loop(backend: TransformersBackend, requests: list[ChatRequest]) -> list[str]:
    """DiffSynth's per-sample recipe with plain transformers calls (batch 1, no padding)."""
    processor, model = backend.processor, backend.model
    tokenizer = processor.tokenizer
    answers = []
    for request in requests:
        text = processor.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=[text], images=request.images(), padding=True, return_tensors="pt")
        inputs = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        with torch.inference_mode():
            output = model.generate(**inputs, do_sample=False, max_new_tokens=request.settings.max_new_tokens,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        answers.append(tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True,
                                              clean_up_tokenization_spaces=False)[0])
    return answers


def interleaved(modes: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Median seconds per mode over ``repeats`` rounds after a warm-up round; also the last results."""
    results = {label: fn() for label, fn in modes.items()}
    times: dict[str, list[float]] = {label: [] for label in modes}
    for _ in range(repeats):
        for label, fn in modes.items():
            start = time.perf_counter()
            results[label] = fn()
            times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) for label, t in times.items()}, results


def bench_family(root: Path, family: str, args: argparse.Namespace) -> dict[str, Any]:
    backend = TransformersBackend(tiny_qwen_vl(root, family), batch_size=args.batch_size).load()
    requests = make_requests(args.images, args.max_new_tokens)
    medians, results = interleaved({
        "reference": lambda: reference_loop(backend, requests),
        "batched": lambda: [c.text for c in backend.generate(requests)],
    }, args.repeats)
    tokens = sum(len(backend.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in results["batched"])
    return {"family": family, "ref_s": medians["reference"], "batched_s": medians["batched"],
            "same": results["reference"] == results["batched"], "tokens": tokens}


def render(args: argparse.Namespace, header: list[str], rows: list[dict[str, Any]]) -> str:
    lines = ["# VLM judges: batched generation vs one sample at a time (CPU, tiny models)", "",
             f"Command: `python benchmarks/bench_vlm.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`", "",
             *header, f"- loadavg at start: {args.load_start:.2f}; at end: {os.getloadavg()[0]:.2f}",
             f"- {args.images} requests of one {IMAGE_SIDE}x{IMAGE_SIDE} image + a caption, greedy, "
             f"max_new_tokens={args.max_new_tokens}; rewardkit batch_size={args.batch_size} (left padding); "
             f"median of {args.repeats} interleaved repeats after one warm-up", "",
             "reference = DiffSynth's loop (batch-1 `generate` per sample); batched = `TransformersBackend.generate`. "
             "speed-up = reference s / batched s; same texts = both return identical answers.", "",
             "| model (tiny, random) | reference s | reference img/s | batched s | batched img/s | speed-up | "
             "same texts | answer tokens (all rows) |", "|---|---:|---:|---:|---:|---:|---|---:|"]
    for row in rows:
        lines.append(f"| {row['family']} | {row['ref_s']:.3f} | {args.images / row['ref_s']:.1f} | "
                     f"{row['batched_s']:.3f} | {args.images / row['batched_s']:.1f} | "
                     f"{row['ref_s'] / row['batched_s']:.2f}x | {row['same']} | {row['tokens']} |")
    lines += ["", "These are overhead-bound toy models on a shared 2-core CPU; the ratio shows the per-call "
              "overhead batching removes. Real 8-27B judges on a GPU were not measured here."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--families", nargs="+", default=list(VLM_FAMILIES), choices=VLM_FAMILIES)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "vlm.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="rk-bench-vlm-") as root:
        rows = [bench_family(Path(root), family, args) for family in args.families]
    text = render(args, machine_description(args.threads), rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
