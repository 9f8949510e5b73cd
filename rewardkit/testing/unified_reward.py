"""Tiny UnifiedReward 2.0 / UnifiedReward Edit checkpoints: seeded random Qwen VLM folders, built offline.

UnifiedReward 2.0's default checkpoint is a Qwen3.5 model (``Qwen3_5ForConditionalGeneration``) and
UnifiedReward Edit's a Qwen3-VL one (``Qwen3VLForConditionalGeneration``), each shipped as a Hugging Face
folder (config, safetensors, tokenizer, processor, chat template): reference/vlm_family.md §4.1, §5.1. The
builders write that folder with ``rewardkit.testing.vlm.tiny_qwen_vl`` and return ``rk.load`` keyword
arguments. A random model writes random text, so its rows are NaN with a reason; tests that need parsed
numbers force the answer with ``rewardkit.testing.vlm.forced_answer_processor``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rewardkit.testing._common import check_layout
from rewardkit.testing.vlm import tiny_qwen_vl

__all__ = ["tiny_unified_reward_2", "tiny_unified_reward_edit", "TINY_JUDGE_NEW_TOKENS"]

# A random model never writes a parseable answer; a short cap keeps CPU tests fast (forced-answer tests
# raise it to the answer's length).
TINY_JUDGE_NEW_TOKENS = 8
_LAYOUTS = ("upstream",)  # the HF folder layout of CodeGoat24/*; DiffSynth's ImageMetrics folders hold the same files


def tiny_unified_reward_2(root: str | Path, layout: str = "upstream", seed: int = 0) -> dict[str, Any]:
    """A tiny UnifiedReward 2.0 folder (Qwen3.5) under ``root``; returns ``rk.load("unified-reward-2", **kwargs)``
    keyword arguments: ``weights`` (the folder) and ``max_new_tokens``."""
    check_layout(layout, _LAYOUTS)
    return {"weights": str(tiny_qwen_vl(root, "qwen3_5", seed=seed)), "max_new_tokens": TINY_JUDGE_NEW_TOKENS}


def tiny_unified_reward_edit(root: str | Path, layout: str = "upstream", seed: int = 0) -> dict[str, Any]:
    """A tiny UnifiedReward Edit folder (Qwen3-VL) under ``root``; returns ``rk.load("unified-reward-edit",
    **kwargs)`` keyword arguments: ``weights`` (the folder) and ``max_new_tokens``."""
    check_layout(layout, _LAYOUTS)
    return {"weights": str(tiny_qwen_vl(root, "qwen3_vl", seed=seed)), "max_new_tokens": TINY_JUDGE_NEW_TOKENS}
