"""Speed of rewardkit's ImageReward against the upstream ``image-reward`` package, same weights, on CPU.

A seeded random checkpoint of the chosen size is written in the upstream layout (``ImageReward.pt``, a
plain state dict with all 625-style keys incl. ``blip.vision_proj`` / ``blip.text_proj`` and
``position_ids``, ``med_config.json`` beside it, a ``bert-base-uncased/`` tokenizer folder). rewardkit
loads it with ``rk.load("imagereward", weights=..., tokenizer=..., config=...)`` (exact fp32 and
``dtype="bf16"``); the reference is the upstream package itself (``ImageReward/ImageReward.py`` and BLIP's
``vit.py`` / ``med.py`` unchanged), imported under transformers 5.x by
``rewardkit.testing.imagereward_upstream`` (the same adapter as the parity test) and built at the same size.

Modes, timed on the same GRPO-shaped batch (8 distinct prompts x 4 images, 512x512 smooth random RGB):

* reference: upstream ``model.score(prompt, [4 PIL images])`` once per prompt, as upstream users score a
  list; ``score`` with a list calls ``inference_rank``, which runs ``_transform`` + ViT + BERT once *per
  image* (batch 1) and the MLP once per list;
* upstream batched (ReFL-style): the same upstream model, ``_transform`` per image, stacked, the prompts
  tokenized as upstream does, one ``score_gard`` call on the whole batch: not how upstream scores images,
  shown to separate the cost of upstream's per-image loop from the cost of its layers;
* rewardkit exact, PIL path: ``reward.evaluate_pil(images, prompts)`` (upstream's preprocessing, batched);
* rewardkit exact, tensor path: ``reward(images, prompts)`` on the same pixels as float ``(B, 3, H, W)``;
* rewardkit fast: ``dtype="bf16"`` autocast of the towers (MLP in fp32), tensor path.

Timed under ``torch.inference_mode()``: one warm-up call per mode (its scores are the fidelity numbers),
then the median of ``--repeats`` rounds, the modes interleaved within each round so that a change of
machine load hits all of them alike. rewardkit has no prompt cache for ImageReward (the text tower
cross-attends to the image), so there is no cold / warm distinction.

Usage:
    .venv/bin/python benchmarks/bench_imagereward.py --size tiny --repeats 1 --out /tmp/smoke.md
    .venv/bin/python benchmarks/bench_imagereward.py --repeats 7
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import rewardkit as rk  # noqa: E402
from bench_clip_rewards import (  # noqa: E402
    GROUP_SIZE,
    GROUPS,
    IMAGE_SIDE,
    PROMPTS,
    CpuContention,
    Mode,
    machine_description,
    make_images,
    median_s,
    native_bf16,
    time_modes,
    to_float_tensor,
)
from rewardkit.nets.blip import ImageRewardConfig, ImageRewardNet  # noqa: E402
from rewardkit.rewards.imagereward import IMAGEREWARD_MAX_LENGTH  # noqa: E402
from rewardkit.testing._common import spread_weights  # noqa: E402
from rewardkit.testing.imagereward import TINY_IMAGEREWARD_CONFIG, write_bert_tokenizer  # noqa: E402
from rewardkit.testing.imagereward_upstream import upstream_imagereward, write_upstream_med_config  # noqa: E402

_VOCAB = TINY_IMAGEREWARD_CONFIG["vocab_size"]  # the offline WordPiece vocabulary + [DEC] + [ENC]
SIZES: dict[str, dict[str, Any]] = {
    # Both towers at MiniLM / ViT-S widths: ~26M parameters, where the ViT and BERT layers dominate the time
    # (ImageReward v1.0 itself is ViT-L/16 24 x 1024 + BERT-base 12 x 768, ~450M).
    "medium": {"image_size": 224, "patch_size": 16, "vision_width": 384, "vision_layers": 6, "vision_heads": 6,
               "text_width": 384, "text_layers": 6, "text_heads": 6, "text_intermediate": 1536,
               "vocab_size": _VOCAB, "max_positions": 512},
    # BLIP-base's shapes (ViT-B/16 768 x 12 + BERT-base 768 x 12 with cross-attention): ImageReward at ViT-B/16 size.
    "vit-b-16": {"image_size": 224, "patch_size": 16, "vision_width": 768, "vision_layers": 12,
                 "vision_heads": 12, "text_width": 768, "text_layers": 12, "text_heads": 12,
                 "text_intermediate": 3072, "vocab_size": _VOCAB, "max_positions": 512},
    # ImageReward v1.0's shapes (BLIP ViT-L/16 24 x 1024 + BERT-base 12 x 768 with cross-attention), with the
    # offline WordPiece vocabulary (only the embedding table is smaller than bert-base-uncased's 30524 rows).
    "vit-l-16": {"image_size": 224, "patch_size": 16, "vision_width": 1024, "vision_layers": 24,
                 "vision_heads": 16, "text_width": 768, "text_layers": 12, "text_heads": 12,
                 "text_intermediate": 3072, "vocab_size": _VOCAB, "max_positions": 512},
    "tiny": dict(TINY_IMAGEREWARD_CONFIG),  # smoke run: seconds
}
_BLIP_EMBED_DIM = 256  # BLIP_Pretrain(embed_dim=256): vision_proj / text_proj (unused by the reward)


def describe(config: ImageRewardConfig) -> str:
    params = sum(p.numel() for p in ImageRewardNet(config).parameters())
    return (f"ViT image {config.image_size}/{config.patch_size}, width {config.vision_width} x "
            f"{config.vision_layers} layers ({config.vision_heads} heads); BERT width {config.text_width} x "
            f"{config.text_layers} layers ({config.text_heads} heads, FFN {config.text_intermediate}) with "
            f"cross-attention; prompt length {IMAGEREWARD_MAX_LENGTH}; {params / 1e6:.1f}M parameters")


# ---------------------------------------------------------------------------------------------------
# Random checkpoint in the upstream layout
# ---------------------------------------------------------------------------------------------------
def random_upstream_state(config: ImageRewardConfig, seed: int) -> dict[str, torch.Tensor]:
    """Seeded, non-degenerate weights under upstream ``ImageReward.pt`` key names.

    Matrices N(0, 1 / fan_in); embeddings, class token and position embeddings N(0, 0.5^2); LayerNorm
    scales 1 + N(0, 0.2^2), shifts and biases N(0, 0.1^2), so that every image gets its own score and the
    rank correlation of the bf16 mode means something. Timing does not depend on the values.
    """
    net = ImageRewardNet(config)
    spread_weights(net, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in net.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1 and "norm" in name.lower():
                param.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
            elif "embeddings." in name or name.endswith(("cls_token", "pos_embed")):
                param.copy_(0.5 * noise)
            elif param.ndim == 1:
                param.copy_(0.1 * noise)
    state = {("" if k.startswith("mlp.") else "blip.") + k: v.contiguous() for k, v in net.state_dict().items()}
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(config.max_positions)[None]
    for prefix, width in (("blip.vision_proj", config.vision_width), ("blip.text_proj", config.text_width)):
        state[f"{prefix}.weight"] = torch.randn(_BLIP_EMBED_DIM, width, generator=generator) / width**0.5
        state[f"{prefix}.bias"] = torch.zeros(_BLIP_EMBED_DIM)
    return state


def write_checkpoint(root: Path, config: ImageRewardConfig, seed: int) -> dict[str, Any]:
    """``ImageReward.pt`` + ``med_config.json`` + ``bert-base-uncased/``; returns the ``rk.load`` kwargs."""
    root.mkdir(parents=True, exist_ok=True)
    weights = root / "ImageReward.pt"
    torch.save(random_upstream_state(config, seed), weights)
    write_upstream_med_config(root / "med_config.json", config)
    tokenizer = write_bert_tokenizer(root / "bert-base-uncased")
    return {"weights": str(weights), "tokenizer": str(tokenizer), "config": config.to_dict()}


# ---------------------------------------------------------------------------------------------------
# Reference calls (the upstream package)
# ---------------------------------------------------------------------------------------------------
def upstream_score_per_prompt(model: Any, groups: list[tuple[str, list[Any]]]) -> list[float]:
    """How upstream users score a GRPO batch: ``model.score(prompt, images)`` for each prompt's images."""
    scores: list[float] = []
    for prompt, images in groups:
        scores.extend(model.score(prompt, images))
    return scores


def upstream_batched(model: Any, images: list[Any], prompts: list[str]) -> torch.Tensor:
    """The upstream model on the whole batch: ``_transform`` per image, stacked, one ``score_gard`` call."""
    pixels = torch.stack([model.preprocess(image) for image in images])
    tokens = model.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=IMAGEREWARD_MAX_LENGTH,
                                  return_tensors="pt")
    return model.score_gard(tokens.input_ids, tokens.attention_mask, pixels)[:, 0]


# ---------------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    config = ImageRewardConfig.coerce(SIZES[args.size])
    pil_images = make_images(GROUPS * GROUP_SIZE, IMAGE_SIDE, seed=args.seed)
    tensor_images = to_float_tensor(pil_images)
    prompts = [prompt for prompt in PROMPTS[:GROUPS] for _ in range(GROUP_SIZE)]
    groups = [(PROMPTS[g], pil_images[g * GROUP_SIZE:(g + 1) * GROUP_SIZE]) for g in range(GROUPS)]
    with tempfile.TemporaryDirectory(prefix="rk-bench-imagereward-") as tmp, upstream_imagereward() as upstream:
        kwargs = write_checkpoint(Path(tmp), config, args.seed)
        reference = upstream.load(**kwargs)
        exact = rk.load("imagereward", **kwargs)
        fast = rk.load("imagereward", dtype="bf16", **kwargs)
        modes = [
            Mode("reference", "reference: upstream `score(prompt, images)` per prompt (per-image loop)",
                 lambda: upstream_score_per_prompt(reference, groups)),
            Mode("upstream_batched", "upstream model batched: `_transform` + one `score_gard` (not upstream's call)",
                 lambda: upstream_batched(reference, pil_images, prompts)),
            Mode("exact_pil", "rewardkit exact, PIL path (`evaluate_pil`)",
                 lambda: exact.evaluate_pil(pil_images, prompts).scores),
            Mode("exact_tensor", "rewardkit exact, tensor path", lambda: exact(tensor_images, prompts)),
            Mode("fast_tensor", "rewardkit fast (bf16 autocast), tensor path", lambda: fast(tensor_images, prompts)),
        ]
        load_before = os.getloadavg()
        start = time.perf_counter()
        with CpuContention() as contention:
            time_modes(modes, args.repeats)
        wall = time.perf_counter() - start
        load_after = os.getloadavg()
    return {"config": config, "modes": modes, "load_before": load_before, "load_after": load_after,
            "other_cores": contention.other_cores, "wall_s": wall, "fidelity": fidelity(modes)}


def fidelity(modes: list[Mode]) -> dict[str, float]:
    from scipy.stats import spearmanr

    s = {mode.key: mode.scores for mode in modes}
    delta = np.abs(s["fast_tensor"] - s["exact_tensor"])
    return {
        "exact_pil_vs_ref_max": float(np.max(np.abs(s["exact_pil"] - s["reference"]))),
        "batched_vs_ref_max": float(np.max(np.abs(s["upstream_batched"] - s["reference"]))),
        "tensor_vs_pil_max": float(np.max(np.abs(s["exact_tensor"] - s["exact_pil"]))),
        "fast_vs_exact_max": float(np.max(delta)),
        "fast_vs_exact_mean": float(np.mean(delta)),
        "fast_vs_exact_spearman": float(spearmanr(s["fast_tensor"], s["exact_tensor"]).statistic),
        "tensor_vs_pil_spearman": float(spearmanr(s["exact_tensor"], s["exact_pil"]).statistic),
        "exact_mean": float(np.mean(s["exact_pil"])),
        "exact_std": float(np.std(s["exact_pil"])),
    }


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------
def speed_table(result: dict[str, Any]) -> list[str]:
    batch = GROUPS * GROUP_SIZE
    modes = result["modes"]
    ref = median_s(modes[0].times)
    lines = ["| mode | s / batch (median) | min - max | images / s | x ref |", "|---|---:|---:|---:|---:|"]
    for mode in modes:
        t = median_s(mode.times)
        lines.append(f"| {mode.label} | {t:.3f} | {min(mode.times):.3f} - {max(mode.times):.3f} | "
                     f"{batch / t:.2f} | {ref / t:.2f} |")
    return lines


def bf16_note(result: dict[str, Any]) -> list[str]:
    if native_bf16():
        return []
    times = {mode.key: median_s(mode.times) for mode in result["modes"]}
    return [
        "**This CPU has no native bf16 matmul (no AVX512-BF16 / AMX).** Under bf16 autocast every linear layer "
        "runs a bf16 GEMM without hardware support and the patch-embedding convolution leaves oneDNN, so here "
        f"the fast mode ran {times['fast_tensor'] / times['exact_tensor']:.1f}x *slower* than exact. Its "
        "fidelity numbers still hold; its speed-up needs AVX512-BF16 / AMX or a GPU.",
        "",
    ]


def render(result: dict[str, Any], args: argparse.Namespace, header: list[str]) -> str:
    fid = result["fidelity"]
    batch = GROUPS * GROUP_SIZE
    lines = [
        "# ImageReward: rewardkit vs the upstream image-reward package (CPU)",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        "",
        *header,
        f"- loadavg (1 / 5 / 15 min) at start: {' / '.join(f'{x:.2f}' for x in result['load_before'])}; "
        f"at end: {' / '.join(f'{x:.2f}' for x in result['load_after'])}; other processes during the timing: "
        f"{result['other_cores']:.2f} cores (from /proc/stat); timing loop {result['wall_s']:.0f} s",
        f"- model size `{args.size}`: {describe(result['config'])}; seeded random weights in the upstream "
        "`ImageReward.pt` layout, loaded by both sides from the same files",
        f"- batch: {GROUPS} prompts x {GROUP_SIZE} images = {batch} images of {IMAGE_SIDE}x{IMAGE_SIDE} "
        "(smooth random RGB; uint8 PIL for the reference and the PIL path, the same pixels / 255 as a float "
        f"tensor for the tensor path); median of {args.repeats} interleaved repeats after one warm-up, under "
        "torch.inference_mode()",
        "",
        "## Speed",
        "",
        "x ref = reference time / mode time (> 1: faster than upstream's own scoring). The reference is how "
        "upstream scores images: `ImageReward.score(prompt, list)` -> `inference_rank`, which runs the ViT and "
        "the BERT once per image; the second row runs the same upstream layers on the whole batch at once.",
        "",
        *bf16_note(result),
        *speed_table(result),
        "",
        "## Fidelity",
        "",
        "Scores of the warm-up call on the benchmark batch (standardised ImageReward scores; exact mean / std "
        f"{fid['exact_mean']:.4g} / {fid['exact_std']:.3g} over the {batch} images).",
        "",
        "| comparison | max abs delta | mean abs delta | Spearman |",
        "|---|---:|---:|---:|",
        f"| rewardkit exact PIL path vs reference | {fid['exact_pil_vs_ref_max']:.2e} | | |",
        f"| upstream batched vs reference (batch-size rounding) | {fid['batched_vs_ref_max']:.2e} | | |",
        f"| rewardkit tensor path vs PIL path (differentiable resize) | {fid['tensor_vs_pil_max']:.2e} | | "
        f"{fid['tensor_vs_pil_spearman']:.4f} |",
        f"| rewardkit bf16 vs exact (tensor path) | {fid['fast_vs_exact_max']:.2e} | "
        f"{fid['fast_vs_exact_mean']:.2e} | {fid['fast_vs_exact_spearman']:.4f} |",
        "",
        "Reference: `image-reward` 1.5 (THUDM/ImageReward) installed `--no-deps`, its `ImageReward.py` and BLIP "
        "`vit.py` / `med.py` unchanged, imported under transformers 5.x by "
        "`rewardkit.testing.imagereward_upstream` (the patches it applies are listed in its docstring; none "
        "touches the computation). Upstream's attention is explicit softmax(QK^T)V, rewardkit's is "
        "`F.scaled_dot_product_attention`.",
        "",
    ]
    return "\n".join(lines)


def raw_results(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Every timing (seconds) and score, for re-analysis without re-running."""
    return {
        "argv": sys.argv, "size": args.size, "config": result["config"].to_dict(), "threads": args.threads,
        "repeats": args.repeats, "times_s": {mode.key: mode.times for mode in result["modes"]},
        "scores": {mode.key: mode.scores.tolist() for mode in result["modes"]}, "fidelity": result["fidelity"],
        "other_cores": result["other_cores"], "loadavg_before": result["load_before"],
        "loadavg_after": result["load_after"], "python": platform.python_version(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="medium", choices=sorted(SIZES),
                        help="random checkpoint size (default: medium; 'tiny' for a smoke run)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per mode (median reported)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "imagereward.md")
    parser.add_argument("--json", type=Path, default=None, help="also write every timing and score here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("REWARDKIT_OFFLINE", "1")
    header = machine_description(args.threads)
    print("\n".join(header), flush=True)
    result = run(args)
    report = render(result, args, header)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    if args.json is not None:
        args.json.write_text(json.dumps(raw_results(result, args), indent=1))
    print(report)
    print(f"written to {args.out}" + (f" and {args.json}" if args.json else ""))


if __name__ == "__main__":
    main()
