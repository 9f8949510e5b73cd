"""The results: machine header, speed / fidelity / load / breakdown tables (Markdown) and the raw JSON."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path
from typing import Any

from clip_bench.checkpoints import Arch
from clip_bench.inputs import GROUP_SIZE, GROUPS, IMAGE_SIDE
from clip_bench.timing import median_s, native_bf16
from machine import describe


def machine_description(threads: int) -> list[str]:
    """Markdown bullet lines for a results header: ``machine.describe()``'s facts, library versions, date."""
    import open_clip
    import transformers

    return [
        *(f"- {line}" for line in describe()),
        f"- torch intra-op threads: {threads}; transformers {transformers.__version__}, "
        f"open_clip {open_clip.__version__}, Python {platform.python_version()}",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
    ]


def bf16_note(results: list[dict]) -> list[str]:
    """A warning paragraph when bf16 autocast cannot be fast on this CPU, with the measured slowdown."""
    if native_bf16():
        return []
    slowdowns = [
        median_s(modes["fast_tensor"].times) / median_s(modes["exact_tensor"].times)
        for modes in ({mode.key: mode for mode in result["modes"]} for result in results)
    ]
    return [
        "**This CPU has no native bf16 matmul (no AVX512-BF16 / AMX).** Under bf16 autocast every linear "
        "layer runs a bf16 GEMM without hardware support and the patch-embedding convolution leaves oneDNN, "
        f"so here the fast mode ran {min(slowdowns):.1f}-{max(slowdowns):.1f}x *slower* than exact. Its "
        "fidelity numbers still hold; its speed-up needs AVX512-BF16 / AMX or a GPU.",
        "",
    ]


def fmt_delta(value: float) -> str:
    return f"{value:.2e}"


def speed_table(results: list[dict]) -> list[str]:
    batch = GROUPS * GROUP_SIZE
    lines = ["| reward | mode | s / batch (median) | min - max | images / s | x ref |", "|---|---|---:|---:|---:|---:|"]
    for result in results:
        modes = result["modes"]
        ref_time = median_s(modes[0].times)
        for mode in modes:
            t = median_s(mode.times)
            cold_row = result["uses_prompts"] and mode.key != "reference" and "warm" not in mode.key
            label = f"{mode.label}, cold" if cold_row else mode.label
            lines.append(
                f"| {result['name']} | {label} | {t:.3f} | {min(mode.times):.3f} - {max(mode.times):.3f} | "
                f"{batch / t:.2f} | {ref_time / t:.2f} |"
            )
    return lines


def render(results: list[dict], args: argparse.Namespace, arch: Arch, header: list[str]) -> str:
    batch = GROUPS * GROUP_SIZE
    lines = [
        "# CLIP-family rewards: rewardkit vs reference (CPU)",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        "",
        *header,
        f"- model size `{args.size}`: {arch.describe()} (seeded random weights in each reward's real format)",
        f"- batch: {GROUPS} prompts x {GROUP_SIZE} images = {batch} images of {IMAGE_SIDE}x{IMAGE_SIDE}; "
        f"median of {args.repeats} interleaved repeats after one warm-up, under torch.inference_mode()",
        "",
        "## Speed",
        "",
        "x ref = reference time / mode time (> 1: rewardkit is faster). \"cold\" = prompt cache cleared before "
        "every call (fair comparison); \"warm\" = prompts already cached, as in an RL loop that re-scores "
        "the same prompt set (not a like-for-like comparison).",
        "",
        *bf16_note(results),
        *speed_table(results),
    ]
    lines += [
        "",
        "## Fidelity",
        "",
        "Scores on the benchmark batch. exact PIL vs ref: rewardkit's exact path against the reference "
        "(same preprocessing semantics). tensor vs PIL: the documented gap of the differentiable tensor "
        "preprocessing. fast vs exact: bf16 autocast against fp32, both on the tensor path; Spearman rank "
        "correlation over the 32 scores. Score std: spread of the exact scores, to read |delta| against.",
        "",
        "| reward | exact PIL vs ref max abs delta | tensor vs PIL max abs delta | fast vs exact max abs delta "
        "| fast vs exact mean abs delta | fast vs exact Spearman | exact score mean / std |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        fid = result["fidelity"]
        lines.append(
            f"| {result['name']} | {fmt_delta(fid['exact_pil_vs_ref_max'])} | {fmt_delta(fid['tensor_vs_pil_max'])} "
            f"| {fmt_delta(fid['fast_vs_exact_max'])} | {fmt_delta(fid['fast_vs_exact_mean'])} "
            f"| {fid['fast_vs_exact_spearman']:.4f} | {fid['exact_mean']:.4g} / {fid['exact_std']:.3g} |"
        )
    lines += [
        "",
        "## Machine load during the timing",
        "",
        "Other processes' CPU use (cores, averaged over each reward's timing loop, from /proc/stat) and the "
        "1-minute load average before / after. On this machine anything above ~0.2 cores of foreign load "
        "inflates the absolute times; the interleaved ratios are less affected.",
        "",
        "| reward | other processes (cores) | loadavg 1 min before / after |",
        "|---|---:|---:|",
    ]
    for result in results:
        lines.append(f"| {result['name']} | {result['other_cores']:.2f} | "
                     f"{result['load_before'][0]:.2f} / {result['load_after'][0]:.2f} |")
    if any("breakdown" in r for r in results):
        lines += ["", "## Stage breakdown (median seconds for the whole batch)", "",
                  "| reward | stage | s |", "|---|---|---:|"]
        for result in results:
            for label, seconds in result.get("breakdown", {}).items():
                lines.append(f"| {result['name']} | {label} | {seconds:.4f} |")
    lines += [
        "",
        "References: pickscore / clip-score = `CLIPModel.from_pretrained` + `CLIPProcessor(backend=\"pil\")`; "
        "hpsv2 = open_clip model + HPSv2 letterbox transform + open_clip tokenizer, batched (upstream "
        "`hpsv2.score` scores one image per forward); aesthetic = HF CLIP image features + OpenAI "
        "`clip.load` transform + numpy L2 norm + MLP; bioclip = `open_clip.create_model_and_transforms("
        "'local-dir:...')`. The reference encodes all 32 prompts (no de-duplication), as upstream code does.",
        "",
    ]
    return "\n".join(lines)


def write_report(results: list[dict], args: argparse.Namespace, arch: Arch, header: list[str]) -> str:
    report = render(results, args, arch, header)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    args.out.with_suffix(".json").write_text(json.dumps(raw_results(results, args), indent=1))
    return report


def raw_results(results: list[dict], args: argparse.Namespace) -> dict[str, Any]:
    """Every timing (seconds) and score, for re-analysis without re-running."""
    return {
        "argv": sys.argv, "size": args.size, "threads": args.threads, "repeats": args.repeats,
        "rewards": {
            result["name"]: {
                "times_s": {mode.key: mode.times for mode in result["modes"]},
                "scores": {mode.key: mode.scores.tolist() for mode in result["modes"]},
                "fidelity": result["fidelity"], "other_cores": result["other_cores"],
                "loadavg_before": result["load_before"], "loadavg_after": result["load_after"],
                "breakdown_s": result.get("breakdown"),
            }
            for result in results
        },
    }
