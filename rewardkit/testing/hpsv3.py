"""Tiny HPSv3 checkpoints in both real layouts, with an offline Qwen2-VL processor that knows ``<|Reward|>``.

``tiny_hpsv3(root, layout)`` writes seeded random weights of a tiny Qwen2-VL (the sizes of
``rewardkit.testing.vlm``: 2 text layers of width 64, a 2-block vision tower of width 32) plus the HPSv3 head:

* ``layout="upstream"``: ``HPSv3.safetensors`` in the transformers-4.45 key layout of ``MizzenAI/HPSv3``
  (``visual.*``, ``model.*``, ``lm_head.weight``, ``rm_head.*``) and a separate processor folder
  ``Qwen2-VL-7B-Instruct/`` (upstream loads its processor from that repo);
* ``layout="diffsynth"``: ``HPSv3/model.safetensors`` in the transformers-5.x layout (``model.visual.*``,
  ``model.language_model.*``, ``lm_head.weight``, ``rm_head.*``) with the processor files in the same ``HPSv3/``
  folder, as DiffSynth-Studio's ``ImageMetrics`` ships them. (Which of the two key layouts the real DiffSynth file
  uses is unverified; its converter accepts both, and so does rewardkit, so the tiny layouts cover both.)

The processor is ``rewardkit.testing.vlm``'s Qwen2-VL processor (its special tokens, ``<|Reward|>`` included, and
chat template with the default system turn) with two changes: the image-processor pixel limits of
Qwen2-VL-7B-Instruct (``min_pixels=3136``, ``max_pixels=12845056``), so HPSv3's own 256-token resize passes through
it unchanged, as with the real processor; and a byte-level BPE whose merges are learnt (deterministically, offline)
from the HPSv3 instruction, so a row is ~950 tokens as with the real tokenizer instead of ~2900 bytes, which keeps
the tests fast. Every string still round-trips. Weights are non-degenerate (``spread_weights``: matrices
~ N(0, 1/fan_in), biases and norm scales perturbed), so the image, the prompt and every layer move the score.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rewardkit.testing._common import check_layout, save_safetensors, spread_weights

__all__ = ["tiny_hpsv3", "tiny_hpsv3_net", "hpsv3_tokenizer", "write_hpsv3_processor", "QWEN2VL_MIN_PIXELS",
           "QWEN2VL_MAX_PIXELS"]

QWEN2VL_MIN_PIXELS = 56 * 56  # Qwen/Qwen2-VL-7B-Instruct preprocessor_config.json min_pixels
QWEN2VL_MAX_PIXELS = 28 * 28 * 16384  # Qwen/Qwen2-VL-7B-Instruct preprocessor_config.json max_pixels (12845056)
_BIAS_SPREAD, _NORM_SPREAD = 0.1, 0.2
_BPE_VOCAB = 768  # 256 byte symbols + 512 merges learnt from the HPSv3 prompt
_BPE_CORPUS_EXTRA = ("You are a helpful assistant.", "a photo of a cat, a red car on a road, mountains at dawn")


def hpsv3_tokenizer() -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` with merges learnt from the HPSv3 prompt, plus the special and
    added tokens of ``rewardkit.testing.vlm.tiny_qwen_tokenizer`` (same roles: eos ``<|im_end|>``, pad
    ``<|endoftext|>``, the vision tokens, ``<|Reward|>``, ``<think>`` / ``</think>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rewardkit.rewards.hpsv3 import HPSV3_INSTRUCTION, HPSV3_SUFFIX
    from rewardkit.testing import vlm

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=_BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator([HPSV3_INSTRUCTION, HPSV3_SUFFIX, *_BPE_CORPUS_EXTRA], trainer)
    specials = [vlm.EOS, vlm.PAD, vlm.IM_START, vlm.VISION_START, vlm.VISION_END, vlm.IMAGE_PAD, vlm.VIDEO_PAD,
                vlm.REWARD_TOKEN]
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=vlm.EOS, pad_token=vlm.PAD,
                                        additional_special_tokens=specials[2:], model_max_length=4096)
    tokenizer.add_tokens([vlm.THINK_OPEN, vlm.THINK_CLOSE])
    return tokenizer


def write_hpsv3_processor(folder: str | Path) -> Any:
    """Save the tiny Qwen2-VL processor (:func:`hpsv3_tokenizer`, Qwen2-VL-7B's pixel limits) into ``folder``."""
    from transformers import Qwen2VLImageProcessor

    from rewardkit.testing.vlm import tiny_qwen_processor

    processor = tiny_qwen_processor("qwen2_vl", hpsv3_tokenizer())
    old = processor.image_processor
    processor.image_processor = Qwen2VLImageProcessor(patch_size=old.patch_size, merge_size=old.merge_size,
                                                      temporal_patch_size=old.temporal_patch_size,
                                                      min_pixels=QWEN2VL_MIN_PIXELS, max_pixels=QWEN2VL_MAX_PIXELS)
    Path(folder).mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(str(folder))
    return processor


def _perturb(net: torch.nn.Module, seed: int) -> None:
    spread_weights(net, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if param.ndim == 1:
                noise = torch.randn(param.shape, generator=generator)
                is_scale = name.endswith("weight")  # RMSNorm / LayerNorm scales; other 1-D tensors are biases
                param.copy_(1.0 + _NORM_SPREAD * noise if is_scale else _BIAS_SPREAD * noise)


def tiny_hpsv3_net(tokenizer: Any, seed: int = 0) -> tuple[Any, dict[str, torch.Tensor]]:
    """A tiny random :class:`rewardkit.nets.hpsv3.HPSv3Net` and an ``lm_head.weight`` for ``tokenizer``.

    Returns:
        ``(net, {"lm_head.weight": ...})``; ``net.config`` is the tiny ``Qwen2VLConfig``.
    """
    from rewardkit.nets.hpsv3 import HPSv3Net
    from rewardkit.testing.vlm import tiny_qwen_vl_config

    config = tiny_qwen_vl_config("qwen2_vl", tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = HPSv3Net(config).eval()
    _perturb(net, seed)
    text = config.text_config
    generator = torch.Generator().manual_seed(seed + 2)
    lm_head = torch.randn(text.vocab_size, text.hidden_size, generator=generator) / text.hidden_size**0.5
    return net, {"lm_head.weight": lm_head}


def _upstream_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HPSv3Net keys -> transformers-4.45 ``Qwen2VLRewardModelBT`` keys."""
    out = {}
    for key, value in state.items():
        if key.startswith("model.visual."):
            key = key[len("model."):]
        elif key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model."):]
        out[key] = value
    return out


def tiny_hpsv3(root: str | Path, layout: str = "upstream", seed: int = 0) -> dict[str, Any]:
    """Write a tiny HPSv3 checkpoint under ``root``; returns ``rk.load("hpsv3", **kwargs)`` kwargs.

    Args:
        root: output folder (created).
        layout: ``"upstream"`` or ``"diffsynth"`` (module docstring).
        seed: weight seed.

    Returns:
        ``{"weights": file, "config": dict}`` plus ``"processor": folder`` for ``upstream``.
    """
    check_layout(layout, ("upstream", "diffsynth"))
    root = Path(root)
    folder = root / ("HPSv3" if layout == "diffsynth" else "Qwen2-VL-7B-Instruct")
    processor = write_hpsv3_processor(folder)
    net, extra = tiny_hpsv3_net(processor.tokenizer, seed)
    state = {**net.state_dict(), **extra}
    config = net.config.to_dict()
    if layout == "diffsynth":
        return {"weights": str(save_safetensors(state, folder / "model.safetensors")), "config": config}
    path = save_safetensors(_upstream_keys(state), root / "HPSv3.safetensors")
    return {"weights": str(path), "processor": str(folder), "config": config}
