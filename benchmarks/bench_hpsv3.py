"""Speed and fidelity of rewardkit's HPSv3 against upstream's computation, same weights, on CPU.

The ``hpsv3`` package (MizzenAI/HPSv3, ``hpsv3/inference.py`` ``HPSv3RewardInferencer.reward`` and
``hpsv3/model/qwen2vl_trainer.py``) pins transformers 4.45.2 and cannot be installed beside transformers 5.x, so
the reference here is upstream's formula on transformers' own ``Qwen2VLForConditionalGeneration``, the same
independent reproduction as tests/test_hpsv3.py (written once below, not imported from the tests): PIL
``BICUBIC`` resize to the 256-token smart size; ``processor.apply_chat_template`` + ``processor(text, images,
padding=True)`` (right padding, ``<|Reward|>`` added to the tokenizer); token embeddings with the vision tower's
merged features scattered into the ``<|image_pad|>`` slots; the text model on ``inputs_embeds`` with
``position_ids=None`` (``arange(L)`` on all three M-RoPE axes, as upstream's forward on 4.45.2); the ``rm_head``
``nn.Sequential`` in float32 at the ``<|Reward|>`` token. Rotary ``inv_freq`` rounded to bf16 values, as
upstream's ``model.to(torch.bfloat16)`` leaves them (rewardkit's default ``rope_dtype="bf16"``).

The checkpoint is a seeded random Qwen2-VL + HPSv3 head written offline in the upstream ``HPSv3.safetensors``
key layout beside a ``Qwen2-VL-7B-Instruct/`` processor folder (``rewardkit.testing.hpsv3``'s processor: the
HPSv3-trained byte-level BPE, Qwen2-VL-7B's pixel limits). ``--size small`` scales the tiny test architecture
up (text 4 x 128, vision 4 x 64: 1.61M parameters) so that the network, not Python, dominates the time;
``--size tiny`` is ``rewardkit.testing.hpsv3.tiny_hpsv3`` itself (smoke run).

Modes, each on the same N images (smooth random RGB, uint8 PIL; the same pixels / 255 as a float tensor for
the tensor paths) at each of two input sizes, with realistic prompts (benchmarks/bench_clip_rewards.py's):

* reference: the upstream formula above, one batch of N rows;
* rewardkit exact: ``reward.score_pil(images, prompts)`` (PIL bicubic + the processor, as upstream);
* rewardkit tensor: ``reward(images, prompts)`` (differentiable resize and patchify, same trunk);
* rewardkit bf16: ``rk.load("hpsv3", dtype="bf16")``, tensor path (trunk stored in bf16, head float32).

rewardkit is loaded with ``batch_size=N`` so that every mode runs one forward of N rows, as the reference does.
Timed under ``torch.inference_mode()``: one warm-up call per mode (its scores are the fidelity numbers), then
``--repeats`` rounds with all modes of both input sizes interleaved in each round; fastest and median reported.

Usage:
    .venv/bin/python benchmarks/bench_hpsv3.py --size tiny --repeats 1 --out /tmp/rk-hpsv3-smoke.md
    .venv/bin/python benchmarks/bench_hpsv3.py --repeats 3 --threads 1   # ~3 min; results/hpsv3.md
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import rewardkit as rk  # noqa: E402
from bench_clip_rewards import (  # noqa: E402
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
from rewardkit.nets.hpsv3 import HEAD_DROPOUT, HEAD_BOTTLENECK, HEAD_HIDDEN, HEAD_OUTPUTS, HPSv3Net  # noqa: E402
from rewardkit.rewards.hpsv3 import REWARD_TOKEN, build_prompt, smart_resize  # noqa: E402
from rewardkit.testing._common import save_safetensors, spread_weights  # noqa: E402
from rewardkit.testing.hpsv3 import tiny_hpsv3, write_hpsv3_processor  # noqa: E402
from rewardkit.testing.vlm import tiny_qwen_vl_config  # noqa: E402

INPUT_SIZES = ((512, 512), (1024, 768))  # (width, height)
# Overrides of the tiny test architecture (rewardkit.testing.vlm: text 2 x 64, vision 2 x 32). Qwen2-VL's
# mrope_section must sum to head_dim / 2: head_dim 32 -> [4, 6, 6] (the 7B's [16, 24, 24] for head_dim 128, / 4).
SIZES: dict[str, dict[str, dict[str, Any]] | None] = {
    "small": {
        "text": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "rope_parameters": {"rope_type": "default", "type": "mrope",
                                                               "mrope_section": [4, 6, 6], "rope_theta": 1e6}},
        "vision": {"depth": 4, "embed_dim": 64, "num_heads": 4, "mlp_ratio": 4, "hidden_size": 128},
    },
    "tiny": None,  # rewardkit.testing.hpsv3.tiny_hpsv3 unchanged
}
CONTENDED_CORES = 0.25  # other processes' CPU use beyond the cores left free by --threads: warn about the times
_BIAS_SPREAD, _NORM_SPREAD = 0.1, 0.2  # 1-D parameters: biases N(0, 0.1^2), norm scales 1 + N(0, 0.2^2)


# ---------------------------------------------------------------------------------------------------
# Checkpoint (upstream layout)
# ---------------------------------------------------------------------------------------------------
def scaled_config(tokenizer: Any, overrides: dict[str, dict[str, Any]]) -> Any:
    """The tiny Qwen2-VL config for ``tokenizer`` with the text / vision fields of ``overrides`` replaced."""
    from transformers import Qwen2VLConfig

    base = tiny_qwen_vl_config("qwen2_vl", tokenizer).to_dict()
    base["text_config"].pop("layer_types", None)  # derived from num_hidden_layers
    base["text_config"].update(overrides["text"])
    base["vision_config"].update(overrides["vision"])
    return Qwen2VLConfig(**base)


def upstream_state(net: HPSv3Net, seed: int) -> dict[str, torch.Tensor]:
    """Non-degenerate weights under transformers-4.45 ``Qwen2VLRewardModelBT`` key names, plus ``lm_head``."""
    spread_weights(net, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if param.ndim == 1:
                noise = torch.randn(param.shape, generator=generator)
                param.copy_(1.0 + _NORM_SPREAD * noise if name.endswith("weight") else _BIAS_SPREAD * noise)
    state = {}
    for key, value in net.state_dict().items():
        if key.startswith("model.visual."):
            key = key[len("model."):]
        elif key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model."):]
        state[key] = value.contiguous()
    text = net.config.text_config
    lm_head = torch.randn(text.vocab_size, text.hidden_size, generator=generator)
    state["lm_head.weight"] = lm_head / text.hidden_size**0.5
    return state


def write_checkpoint(root: Path, size: str, seed: int) -> dict[str, Any]:
    """``HPSv3.safetensors`` + ``Qwen2-VL-7B-Instruct/``; returns the ``rk.load("hpsv3", ...)`` kwargs."""
    overrides = SIZES[size]
    if overrides is None:
        return tiny_hpsv3(root, "upstream", seed)
    processor = write_hpsv3_processor(root / "Qwen2-VL-7B-Instruct")
    config = scaled_config(processor.tokenizer, overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = HPSv3Net(config).eval()
    path = save_safetensors(upstream_state(net, seed), root / "HPSv3.safetensors")
    return {"weights": str(path), "processor": str(root / "Qwen2-VL-7B-Instruct"), "config": config.to_dict()}


def describe(kwargs: dict[str, Any]) -> str:
    from transformers import Qwen2VLConfig

    config = Qwen2VLConfig(**kwargs["config"])
    with torch.device("meta"):
        params = sum(p.numel() for p in HPSv3Net(config).parameters())
    t, v = config.text_config, config.vision_config
    return (f"Qwen2-VL text {t.num_hidden_layers} layers x {t.hidden_size} ({t.num_attention_heads} heads, "
            f"{t.num_key_value_heads} KV, MLP {t.intermediate_size}, vocabulary {t.vocab_size}); vision "
            f"{v.depth} blocks x {v.embed_dim} ({v.num_heads} heads, patch {v.patch_size}, merge "
            f"{v.spatial_merge_size}); head {t.hidden_size}-{HEAD_HIDDEN}-{HEAD_BOTTLENECK}-{HEAD_OUTPUTS}; "
            f"{params / 1e6:.2f}M parameters without the unused lm_head (HPSv3 itself: Qwen2-VL-7B, 7.7B)")


# ---------------------------------------------------------------------------------------------------
# Reference: upstream's formula on transformers' Qwen2VLForConditionalGeneration
# ---------------------------------------------------------------------------------------------------
def build_reference(kwargs: dict[str, Any]) -> tuple[Any, torch.nn.Sequential, Any]:
    """``(model, rm_head, processor)`` from the upstream-layout file, strict, inv_freq rounded to bf16."""
    from transformers import AutoProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from rewardkit.weights import read_state_dict

    state = read_state_dict(kwargs["weights"])
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**kwargs["config"])).eval()
    trunk = {}
    for key, value in state.items():  # transformers' 4.45 -> 5.x conversion of the key names
        if key.startswith("visual."):
            trunk["model." + key] = value
        elif key.startswith("model."):
            trunk["model.language_model." + key[len("model."):]] = value
        elif not key.startswith("rm_head."):
            trunk[key] = value
    model.load_state_dict(trunk, strict=True)
    for name, buffer in model.named_buffers():
        if name.endswith("inv_freq"):
            buffer.data = buffer.data.to(torch.bfloat16).float()
    hidden = model.config.text_config.hidden_size
    head = torch.nn.Sequential(
        torch.nn.Linear(hidden, HEAD_HIDDEN), torch.nn.ReLU(), torch.nn.Dropout(HEAD_DROPOUT),
        torch.nn.Linear(HEAD_HIDDEN, HEAD_BOTTLENECK), torch.nn.ReLU(), torch.nn.Linear(HEAD_BOTTLENECK, HEAD_OUTPUTS),
    ).eval()
    head.load_state_dict({k[len("rm_head."):]: v for k, v in state.items() if k.startswith("rm_head.")}, strict=True)
    processor = AutoProcessor.from_pretrained(kwargs["processor"], padding_side="right")
    processor.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    return model, head, processor


def reference_scores(reference: tuple[Any, torch.nn.Sequential, Any], images: list[Image.Image],
                     prompts: list[str]) -> torch.Tensor:
    """Upstream ``HPSv3RewardInferencer.reward``: ``mu`` of each row, float32 ``(N,)``."""
    model, head, processor = reference
    resized = []
    for image in images:
        height, width = smart_resize(image.height, image.width)
        resized.append(image.resize((width, height), Image.Resampling.BICUBIC))
    chats = [[{"role": "user", "content": [{"type": "image", "image": image},
                                           {"type": "text", "text": build_prompt(prompt)}]}]
             for image, prompt in zip(resized, prompts)]
    texts = processor.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)
    batch = processor(text=texts, images=resized, padding=True, return_tensors="pt")
    ids = batch["input_ids"]
    embeds = model.model.language_model.embed_tokens(ids)
    visual = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
    slots = (ids == model.config.image_token_id)[..., None].expand_as(embeds)
    embeds = embeds.masked_scatter(slots, visual.to(embeds.dtype))
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                        position_ids=None).last_hidden_state
    logits = head(hidden.float())
    rows = ids == processor.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
    return logits[rows].view(len(images), -1)[:, 0]


# ---------------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------------
def make_inputs(count: int, width: int, height: int, seed: int) -> tuple[list[Image.Image], torch.Tensor]:
    """``count`` smooth random RGB images of ``width`` x ``height`` (crops of square ones) and their tensor."""
    squares = make_images(count, max(width, height), seed)
    pils = [image.crop((0, 0, width, height)) if image.size != (width, height) else image for image in squares]
    return pils, to_float_tensor(pils)


def build_modes(reference: Any, exact: Any, fast: Any, args: argparse.Namespace) -> list[Mode]:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.images)]
    modes = []
    for index, (width, height) in enumerate(INPUT_SIZES):
        pils, tensor = make_inputs(args.images, width, height, args.seed + index)
        tag = f"{width}x{height}"
        modes += [
            Mode(f"{tag}/reference", "reference (upstream formula, transformers Qwen2-VL)",
                 lambda p=pils: reference_scores(reference, p, prompts)),
            Mode(f"{tag}/exact_pil", "rewardkit exact (`score_pil`)", lambda p=pils: exact.score_pil(p, prompts)),
            Mode(f"{tag}/exact_tensor", "rewardkit tensor path", lambda t=tensor: exact(t, prompts)),
            Mode(f"{tag}/bf16_tensor", "rewardkit tensor path, `dtype=\"bf16\"`", lambda t=tensor: fast(t, prompts)),
        ]
    return modes


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="rk-bench-hpsv3-") as tmp:
        kwargs = write_checkpoint(Path(tmp), args.size, args.seed)
        reference = build_reference(kwargs)
        exact = rk.load("hpsv3", batch_size=args.images, **kwargs)
        fast = rk.load("hpsv3", dtype="bf16", batch_size=args.images, **kwargs)
        modes = build_modes(reference, exact, fast, args)
        tokens = int(exact.text_inputs(PROMPTS[:1], torch.tensor([[1, 32, 32]]))["input_ids"].shape[1])
        load_before, start = os.getloadavg(), time.perf_counter()
        with CpuContention() as contention:
            time_modes(modes, args.repeats)
        wall, load_after = time.perf_counter() - start, os.getloadavg()
    return {"description": describe(kwargs), "modes": modes, "tokens": tokens, "load_before": load_before,
            "load_after": load_after, "other_cores": contention.other_cores, "wall_s": wall}


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------
def table(result: dict[str, Any], images: int) -> list[str]:
    lines = ["| input | mode | fastest s | median s | images / s (median) | x ref (median) | max abs delta vs ref |",
             "|---|---|---:|---:|---:|---:|---:|"]
    by_key = {mode.key: mode for mode in result["modes"]}
    for mode in result["modes"]:
        tag = mode.key.split("/")[0]
        ref = by_key[f"{tag}/reference"]
        t = median_s(mode.times)
        delta = "-" if mode is ref else f"{np.max(np.abs(mode.scores - ref.scores)):.2e}"
        lines.append(f"| {tag} | {mode.label} | {min(mode.times):.3f} | {t:.3f} | {images / t:.2f} | "
                     f"{median_s(ref.times) / t:.2f} | {delta} |")
    return lines


def bf16_note(result: dict[str, Any]) -> list[str]:
    if native_bf16():
        return []
    by_key = {mode.key: median_s(mode.times) for mode in result["modes"]}
    slow = [by_key[f"{w}x{h}/bf16_tensor"] / by_key[f"{w}x{h}/exact_tensor"] for w, h in INPUT_SIZES]
    return ["**This CPU has no native bf16 matmul (no AVX512-BF16 / AMX)**: the bf16 trunk runs emulated bf16 "
            f"GEMMs, {min(slow):.1f}-{max(slow):.1f}x slower than float32 here. That row is the cost of the "
            "documented fast mode on such a CPU; its speed-up needs AVX512-BF16 / AMX or a GPU. Its fidelity "
            "number holds.", ""]


def contention_note(result: dict[str, Any], threads: int) -> list[str]:
    if not result["other_cores"] > (os.cpu_count() or 1) - threads + CONTENDED_CORES:
        return []
    return [f"Other processes used {result['other_cores']:.2f} of the {os.cpu_count()} cores during the timing: the "
            "absolute times are inflated by that sharing; the ratios (modes interleaved in every round) are the "
            "comparable numbers.", ""]


def resized_sizes() -> str:
    return ", ".join(f"{w}x{h} -> {smart_resize(h, w)[1]}x{smart_resize(h, w)[0]}" for w, h in INPUT_SIZES)


def render(result: dict[str, Any], args: argparse.Namespace, header: list[str]) -> str:
    spread = {tag: np.std(mode.scores) for mode in result["modes"] if mode.key.endswith("/reference")
              for tag in [mode.key.split("/")[0]]}
    return "\n".join([
        "# HPSv3: rewardkit vs upstream's formula on transformers Qwen2-VL (CPU)",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        "",
        *header,
        f"- loadavg (1 / 5 / 15 min) at start: {' / '.join(f'{x:.2f}' for x in result['load_before'])}; at end: "
        f"{' / '.join(f'{x:.2f}' for x in result['load_after'])}; other processes during the timing: "
        f"{result['other_cores']:.2f} cores (from /proc/stat); timing loop {result['wall_s']:.0f} s",
        f"- model size `{args.size}`: {result['description']}; seeded random weights in the upstream "
        "`HPSv3.safetensors` layout + `Qwen2-VL-7B-Instruct/` processor folder, loaded by both sides from the "
        "same files",
        f"- batch: {args.images} images per call at each input size, smooth random RGB (uint8 PIL for the reference "
        "and `score_pil`, the same pixels / 255 as a float tensor for the tensor paths), resized to the 256-token "
        f"smart size ({resized_sizes()}); "
        f"{len(PROMPTS)} prompts of 9-12 words, cycled; a row is {result['tokens']} tokens (256 visual); rewardkit "
        f"`batch_size={args.images}` (one forward per call, as the reference); {args.repeats} interleaved rounds "
        "after one warm-up, under torch.inference_mode()",
        "",
        "## Speed and fidelity",
        "",
        "x ref = reference median / mode median (> 1: faster than the reference). max abs delta: the warm-up "
        "call's scores (`mu`) against the reference's on the same images; reference score std over the batch: "
        f"{', '.join(f'{tag} {value:.3g}' for tag, value in spread.items())}.",
        "",
        *bf16_note(result),
        *contention_note(result, args.threads),
        *table(result, args.images),
        "",
        "Reference: upstream `hpsv3` (MizzenAI/HPSv3) pins transformers 4.45.2 and cannot be installed here; its "
        "`HPSv3RewardInferencer.reward` + `Qwen2VLRewardModelBT.forward` are reproduced in this script on "
        "transformers' `Qwen2VLForConditionalGeneration` (module docstring), as in tests/test_hpsv3.py. The tensor "
        "path's delta is its differentiable resize skipping PIL's uint8 rounding; bf16's is the bf16 trunk.",
        "",
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", choices=sorted(SIZES), help="model size ('tiny': smoke run)")
    parser.add_argument("--images", type=int, default=16, help="images per call at each input size")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (fastest and median reported)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "hpsv3.md")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.images < 1:
        parser.error("--repeats and --images must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("REWARDKIT_OFFLINE", "1")
    header = machine_description(args.threads)
    print("\n".join(header), flush=True)
    report = render(run(args), args, header)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
