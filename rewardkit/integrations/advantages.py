"""Group-relative advantages for GRPO / DDPO loops: ``(r - mean_group) / (std + eps)``.

A group is every sample of one prompt in the *global* batch: TRL's ``RepeatSampler`` and flow_grpo's
``DistributedKRepeatSampler`` spread a prompt's copies over ranks, so under ``torch.distributed`` the
scores and prompts are gathered first (ranks may hold different numbers of rows), the statistics are
computed on the whole batch, and each rank gets its own rows back (reference/rl_integration.md §2, §4).

* ``std="group"``: per-prompt std (ddpo-pytorch ``PerPromptStatTracker``, TRL ``scale_rewards="group"``);
* ``std="global"``: one std over the whole batch (flow_grpo ``global_std=True``, TRL ``"batch"``);
* ``std="none"``: mean-centring only (TRL ``scale_rewards="none"``).

``unbiased=False`` (default) is numpy's population std as in ddpo-pytorch / flow_grpo; TRL uses
``torch.std`` (``unbiased=True``). ``eps=1e-4`` as flow_grpo and TRL. NaN scores ("not applicable")
are left out of every statistic and get a NaN advantage; the caller decides how to mask them.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.distributed as dist

__all__ = ["per_prompt_advantages"]

Std = Literal["group", "global", "none"]
ADVANTAGE_EPS = 1e-4  # flow_grpo stat_tracking.py, TRL grpo_trainer.py


def _gather(scores: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, list[str], int]:
    """All ranks' scores and prompts (rank order) and this rank's offset; a no-op without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return scores, prompts, 0
    world = dist.get_world_size()
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (scores.shape[0], prompts))
    sizes = [size for size, _ in gathered]
    padded = torch.full((max(sizes),), float("nan"), dtype=scores.dtype, device=scores.device)
    padded[: scores.shape[0]] = scores
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)  # equal shapes: uneven batches are padded, then trimmed
    all_scores = torch.cat([part[:size] for part, size in zip(parts, sizes)])
    all_prompts = [prompt for _, rank_prompts in gathered for prompt in rank_prompts]
    return all_scores, all_prompts, sum(sizes[: dist.get_rank()])


def _stats(values: torch.Tensor, unbiased: bool) -> tuple[torch.Tensor, torch.Tensor]:
    finite = values[torch.isfinite(values)]
    if finite.numel() == 0:
        nan = values.new_tensor(float("nan"))
        return nan, nan
    std = finite.std(unbiased=True) if unbiased and finite.numel() > 1 else finite.std(unbiased=False)
    return finite.mean(), std


def per_prompt_advantages(
    scores: torch.Tensor,
    prompts: Sequence[str],
    *,
    std: Std = "group",
    eps: float = ADVANTAGE_EPS,
    unbiased: bool = False,
    clip: float | None = None,
) -> torch.Tensor:
    """Advantages for this rank's rows.

    Args:
        scores: float ``(B,)`` rewards of this rank's samples (NaN = not applicable).
        prompts: the ``B`` prompts; equal strings form a group (across ranks too).
        std: ``"group"``, ``"global"`` or ``"none"`` (module docstring).
        eps: added to the std.
        unbiased: sample (``True``, TRL) or population (``False``, ddpo / flow_grpo) std.
        clip: clamp advantages to ``[-clip, clip]`` (ddpo ``adv_clip_max``); ``None`` = no clamp.

    Returns:
        float ``(B,)`` advantages on ``scores.device`` (no gradient).

    Raises:
        ValueError: mismatched lengths, a non-1-D ``scores``, or an unknown ``std``.
    """
    if scores.ndim != 1 or scores.shape[0] != len(prompts):
        raise ValueError(f"per_prompt_advantages: expected scores (B,) and B prompts, got {tuple(scores.shape)} "
                         f"and {len(prompts)} prompts")
    if std not in ("group", "global", "none"):
        raise ValueError(f"per_prompt_advantages: std must be 'group', 'global' or 'none', got {std!r}")
    local = scores.detach().double()
    all_scores, all_prompts, offset = _gather(local, list(prompts))
    advantages = torch.full_like(all_scores, float("nan"))
    _, global_std = _stats(all_scores, unbiased)
    for prompt in dict.fromkeys(all_prompts):
        rows = torch.tensor([i for i, p in enumerate(all_prompts) if p == prompt], device=all_scores.device)
        mean, group_std = _stats(all_scores[rows], unbiased)
        scale = {"group": group_std, "global": global_std, "none": None}[std]
        centred = all_scores[rows] - mean
        advantages[rows] = centred if scale is None else centred / (scale + eps)
    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    return advantages[offset : offset + local.shape[0]].to(scores.dtype)
