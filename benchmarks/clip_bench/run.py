"""One reward end to end: checkpoint, reference, rewardkit exact / fast, timing, fidelity, stage breakdown."""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import rewardkit as rk
from clip_bench.checkpoints import ALL_REWARDS, Arch, write_checkpoint
from clip_bench.references import build_reference
from clip_bench.timing import CpuContention, Mode, median_s, time_modes
from rewardkit.errors import check_images
from rewardkit.preprocess import preprocess, preprocess_pil


def bench_reward(name: str, arch: Arch, args: argparse.Namespace, pil_images, tensor_images, prompts) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"rk-bench-{name}-") as tmp:
        checkpoint = write_checkpoint(name, Path(tmp), arch, seed=args.seed + ALL_REWARDS.index(name))
        reference = build_reference(name, checkpoint["files"])
        exact = rk.load(name, **checkpoint["rk"])
        fast = rk.load(name, dtype="bf16", **checkpoint["rk"])
        uses_prompts = exact.requires_prompt
        call_prompts = prompts if uses_prompts else None

        def cold(reward):
            return reward.prompt_cache.clear

        def warm(reward):
            def fill() -> None:  # untimed: make sure every prompt is cached (inference mode is active)
                reward.text_embeds(list(dict.fromkeys(prompts)))
            return fill

        modes = [
            Mode("reference", "reference (upstream, PIL input)", lambda: reference(pil_images, prompts)),
            Mode("exact_pil", "rewardkit exact, PIL path (evaluate_pil)",
                 lambda: exact.evaluate_pil(pil_images, call_prompts).scores, cold(exact)),
            Mode("exact_tensor", "rewardkit exact, tensor path",
                 lambda: exact(tensor_images, call_prompts), cold(exact)),
            Mode("fast_tensor", "rewardkit fast (bf16 autocast), tensor path",
                 lambda: fast(tensor_images, call_prompts), cold(fast)),
        ]
        if uses_prompts:
            modes.append(Mode("exact_tensor_warm", "rewardkit exact, tensor path, warm prompt cache",
                              lambda: exact(tensor_images, call_prompts), warm(exact)))
        load_before = os.getloadavg()
        with CpuContention() as contention:
            time_modes(modes, args.repeats)
        result = {"name": name, "modes": modes, "uses_prompts": uses_prompts, "load_before": load_before,
                  "load_after": os.getloadavg(), "other_cores": contention.other_cores, "fidelity": fidelity(modes)}
        if args.breakdown:
            result["breakdown"] = breakdown(reference, exact, fast, pil_images, tensor_images, prompts,
                                            uses_prompts, args.repeats)
        del reference, exact, fast
        gc.collect()
    return result


def fidelity(modes: list[Mode]) -> dict[str, float]:
    from scipy.stats import spearmanr

    scores = {mode.key: mode.scores for mode in modes}
    ref, pil, tensor, fast = scores["reference"], scores["exact_pil"], scores["exact_tensor"], scores["fast_tensor"]
    delta = np.abs(fast - tensor)
    return {
        "exact_pil_vs_ref_max": float(np.max(np.abs(pil - ref))),
        "tensor_vs_pil_max": float(np.max(np.abs(tensor - pil))),
        "fast_vs_exact_max": float(np.max(delta)),
        "fast_vs_exact_mean": float(np.mean(delta)),
        "fast_vs_exact_spearman": float(spearmanr(fast, tensor).statistic),
        "exact_std": float(np.std(tensor)),
        "exact_mean": float(np.mean(tensor)),
    }


def breakdown(reference, exact, fast, pil_images, tensor_images, prompts, uses_prompts, repeats) -> dict:
    """Median seconds of each stage, reference vs rewardkit, on identical inputs per stage."""
    unique = list(dict.fromkeys(prompts))
    with torch.inference_mode():
        ref_pixels = reference.preprocess(pil_images)
        rk_pixels = preprocess_pil(pil_images, exact.spec)
        stages = {
            "preprocess: reference": lambda: reference.preprocess(pil_images),
            "preprocess: rewardkit exact (PIL)": lambda: preprocess_pil(pil_images, exact.spec),
            "input check: rewardkit tensor (check_images)": lambda: check_images(exact.name, tensor_images),
            "preprocess: rewardkit tensor": lambda: preprocess(tensor_images, exact.spec),
            "image tower: reference": lambda: reference.image_features(ref_pixels),
            "image tower: rewardkit exact": lambda: exact.image_embeds(rk_pixels),
            "image tower: rewardkit fast (bf16)": lambda: fast.image_embeds(rk_pixels),
        }
        if uses_prompts:
            stages.update({
                f"text tower: reference ({len(prompts)} prompts)": lambda: reference.text_features(prompts),
                f"text tower: rewardkit exact ({len(unique)} distinct)": lambda: exact.towers.encode_text(unique),
            })
        result = {}
        for label, fn in stages.items():
            fn()  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            result[label] = median_s(times)
    return result
