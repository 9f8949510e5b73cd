"""The ``ocr`` reward against flow_grpo's per-image loop, side by side on the same PP-OCRv4 models, on CPU.

Reference: flow_grpo ``flow_grpo/ocr.py`` ``OcrScorer.__call__`` rewritten here (not imported: it needs
PaddleOCR): one engine, one ``ocr(image)`` call per image in a Python loop, then the capped-Levenshtein
formula. The engine is RapidOCR with the same models and PaddleOCR detection defaults that rewardkit uses, so
the comparison isolates the batching (rewardkit runs ``workers`` rows at once, each thread with its own
engine and ``cpu_count // workers`` onnxruntime threads; the reference runs one engine with onnxruntime's
default of every core per call). Both must give identical scores; the script checks it.

Images: ``--batch`` 512 x 512 renders of flow_grpo-style phrases (DejaVu Sans, ``rewardkit.testing.ocr``), a
quarter of them blank. Timing: median of ``--repeats`` after a warm-up, the two sides interleaved.

Usage:
    python benchmarks/bench_ocr.py                       # writes benchmarks/results/ocr.md
    python benchmarks/bench_ocr.py --batch 8 --repeats 2 --out /tmp/ocr.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import rewardkit as rk  # noqa: E402
from rewardkit.rewards.ocr_backends import PADDLEOCR_DET_DEFAULTS, PADDLEOCR_DROP_SCORE  # noqa: E402
from rewardkit.testing.ocr import render_text  # noqa: E402

PHRASES = ("Spring Collection 2024", "Step Goal Achieved", "Forever Yours", "Hello World", "Open Late",
           "Fresh Bread Daily", "Gate 42", "Welcome Home")


def reference_scorer():
    """flow_grpo's OcrScorer loop over one RapidOCR engine (same models and detection settings as rewardkit)."""
    from Levenshtein import distance
    from rapidocr_onnxruntime import RapidOCR

    engine = RapidOCR(use_cls=False, text_score=PADDLEOCR_DROP_SCORE, **PADDLEOCR_DET_DEFAULTS)

    def score(images: list[np.ndarray], prompts: list[str]) -> list[float]:
        rewards = []
        for image, prompt in zip(images, prompts):
            target = prompt.split('"')[1]
            result, _ = engine(image, use_cls=False)
            text = "".join(t if c > 0 else "" for _, t, c in result) if result else ""
            text, target = text.replace(" ", "").lower(), target.replace(" ", "").lower()
            dist = 0 if target in text else min(distance(text, target), len(target))
            rewards.append(1 - dist / len(target))
        return rewards

    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "ocr.md"))
    args = parser.parse_args()

    arrays = [render_text(PHRASES[i % len(PHRASES)], size=(512, 512), origin=(20, 200)) if i % 4 != 3
              else np.full((512, 512, 3), 255, np.uint8) for i in range(args.batch)]
    prompts = [f'a photo of a sign that says "{PHRASES[i % len(PHRASES)]}"' for i in range(args.batch)]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    reward = rk.load("ocr", workers=args.workers)
    reference = reference_scorer()

    ours, theirs = reward(images, prompts), reference(arrays, prompts)  # warm-up + equality check
    if ours.tolist() != theirs:
        raise SystemExit(f"scores differ: rewardkit {ours.tolist()} vs reference {theirs}")
    times: dict[str, list[float]] = {"rewardkit": [], "flow_grpo loop": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        reward(images, prompts)
        times["rewardkit"].append(time.perf_counter() - start)
        start = time.perf_counter()
        reference(arrays, prompts)
        times["flow_grpo loop"].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    ratio = median["flow_grpo loop"] / median["rewardkit"]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    lines = [
        "# OCR reward vs flow_grpo's per-image loop (CPU)", "",
        f"{args.batch} images 512x512 (a quarter blank), PP-OCRv4 det+rec from the rapidocr-onnxruntime wheel, "
        f"PaddleOCR detection defaults; median of {args.repeats}; {machine}. Scores identical on every row.", "",
        "| side | seconds / batch | images / s |", "| --- | ---: | ---: |",
        *(f"| {k} | {v:.3f} | {args.batch / v:.1f} |" for k, v in median.items()), "",
        f"rewardkit (workers={args.workers}) is {ratio:.2f}x the reference loop's speed.", "",
    ]
    print("\n".join(lines))
    Path(args.out).write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
