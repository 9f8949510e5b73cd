"""A tiny, seeded, offline Qwen-Image-Bench judge: a random ``qwen3_5`` folder in the real HF format.

The real Q-Judger (``Qwen/Qwen-Image-Bench``) is a ``Qwen3_5ForConditionalGeneration`` checkpoint folder
(config.json, safetensors shards, tokenizer, processor and chat template; reference/vlm_family.md section
6.1); DiffSynth-Studio reads the same folder, so both ``layout`` values give the same files. The tiny
folder comes from :func:`rewardkit.testing.vlm.tiny_qwen_vl` (section 8.1 sizes; its chat template opens a
``<think>`` block as Qwen3.5's does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rewardkit.testing.vlm import tiny_qwen_vl

__all__ = ["tiny_qwen_image_bench", "TINY_QIB_MAX_NEW_TOKENS", "TINY_QIB_DIMS"]

# A random tiny model never emits EOS on purpose: keep its answers short so that tests stay fast. Tests that
# need whole answers force them with a logits processor (rewardkit.testing.vlm.forced_answer_processor).
TINY_QIB_MAX_NEW_TOKENS = 8
# The tiny tokenizer is byte-level (a token per character): the five prompts are 1.4k-4.2k tokens, Creative
# Generation's beyond the tiny model's 4096 positions. Rows without dims= ask only the shortest checklist.
TINY_QIB_DIMS = "Quality"
_LAYOUTS = ("upstream", "diffsynth")


def tiny_qwen_image_bench(root: str | Path, layout: str = "upstream", seed: int = 0) -> dict[str, Any]:
    """Write a tiny random Q-Judger folder under ``root`` and return ``rk.load("qwen-image-bench", **kwargs)``.

    Args:
        root: parent folder; the checkpoint goes to ``root / "tiny-qwen3_5"``.
        layout: ``"upstream"`` or ``"diffsynth"`` (the same HF folder either way).
        seed: weight seed.

    Returns:
        ``{"weights": <folder>, "max_new_tokens": TINY_QIB_MAX_NEW_TOKENS, "dims": TINY_QIB_DIMS}``; override
        ``dims`` / ``max_new_tokens`` in ``rk.load`` for other dimensions or forced (long) answers.
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"tiny_qwen_image_bench: layout must be one of {_LAYOUTS}, got {layout!r}")
    folder = tiny_qwen_vl(root, "qwen3_5", seed=seed)
    return {"weights": str(folder), "max_new_tokens": TINY_QIB_MAX_NEW_TOKENS, "dims": TINY_QIB_DIMS}
