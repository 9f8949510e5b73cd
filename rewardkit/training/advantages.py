"""Group-relative advantages for GRPO / DDPO loops: ``(r - mean_group) / (std + eps)``, stateless.

A group is every sample of one prompt in the *global* batch: TRL's ``RepeatSampler`` and flow_grpo's
``DistributedKRepeatSampler`` spread a prompt's copies over ranks, so under ``torch.distributed`` the
scores and prompts are gathered first (ranks may hold different numbers of rows), the statistics are
computed on the whole batch, and each rank gets its own rows back (reference/rl_integration.md §2, §4).

* ``std="group"``: per-prompt std of this batch (TRL ``scale_rewards="group"``);
* ``std="global"``: one std over the whole batch (TRL ``"batch"``);
* ``std="none"``: mean-centring only (TRL ``scale_rewards="none"``).

This function keeps **no history**, so it is *not* the ``PerPromptStatTracker`` of ddpo-pytorch / trl 0.23
(a per-prompt buffer of past rewards, with a batch fallback below ``min_count``): after the first batch
their advantages differ. It equals flow_grpo's tracker only when that one is cleared after every update
(as flow_grpo's ``train_sd3.py`` does), with ``eps=1e-4`` and ``std="global"`` for ``global_std=True``.
The exact upstream trackers are ``rewardkit.training.trackers.PerPromptStatTracker``.

``unbiased=False`` (default) is numpy's population std as in ddpo-pytorch / flow_grpo; TRL uses
``torch.std`` (``unbiased=True``). ``eps=1e-4`` as flow_grpo and TRL. NaN scores ("not applicable")
are left out of every statistic and get a NaN advantage; the caller decides how to mask them.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.distributed as dist

__all__ = ["ADVANTAGE_EPS", "gather_rows", "group_advantages", "per_prompt_advantages"]

Std = Literal["group", "global", "none"]
STD_MODES = ("group", "global", "none")
ADVANTAGE_EPS = 1e-4  # flow_grpo stat_tracking.py, TRL grpo_trainer.py


def gather_rows(values: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, list[str], int]:
    """Every rank's rows (rank order) and prompts, and this rank's offset into them.

    A no-op without an initialised process group (or with one process). Ranks may hold different numbers of
    rows: the rows are padded to the largest count before ``all_gather`` (gloo returns garbage for uneven
    shapes, reference/rl_integration.md §4) and trimmed after. Every rank must call it (a collective).

    Args:
        values: ``(B, ...)`` tensor of this rank's rows.
        prompts: the ``B`` prompts of those rows.

    Returns:
        ``(all_values (N, ...), all_prompts (N), offset)``: this rank's rows are ``all_values[offset:offset + B]``.
    """
    prompts = list(prompts)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values, prompts, 0
    world = dist.get_world_size()
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (values.shape[0], prompts))
    sizes = [size for size, _ in gathered]
    padded = values.new_full((max(sizes), *values.shape[1:]), float("nan"))
    padded[: values.shape[0]] = values
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())  # equal shapes: uneven batches are padded, then trimmed
    all_values = torch.cat([part[:size] for part, size in zip(parts, sizes)])
    all_prompts = [prompt for _, rank_prompts in gathered for prompt in rank_prompts]
    return all_values, all_prompts, sum(sizes[: dist.get_rank()])


def _stats(values: torch.Tensor, unbiased: bool) -> tuple[torch.Tensor, torch.Tensor]:
    finite = values[torch.isfinite(values)]
    if finite.numel() == 0:
        nan = values.new_tensor(float("nan"))
        return nan, nan
    std = finite.std(unbiased=True) if unbiased and finite.numel() > 1 else finite.std(unbiased=False)
    return finite.mean(), std


def group_advantages(scores: torch.Tensor, prompts: Sequence[str], *, std: Std = "group", eps: float = ADVANTAGE_EPS,
                     unbiased: bool = False) -> torch.Tensor:
    """Group-relative advantages of a whole (already gathered) batch; no collective.

    Args:
        scores: float ``(N,)`` rewards (NaN = not applicable: left out of every statistic, NaN advantage).
        prompts: the ``N`` prompts; equal strings form a group.
        std: ``"group"``, ``"global"`` or ``"none"`` (module docstring).
        eps: added to the std.
        unbiased: sample (``True``) or population (``False``) std.

    Returns:
        ``(N,)`` advantages in ``scores.dtype`` on ``scores.device``.
    """
    if scores.ndim != 1 or scores.shape[0] != len(prompts):
        raise ValueError(f"group_advantages: expected scores (N,) and N prompts, got {tuple(scores.shape)} "
                         f"and {len(prompts)} prompts")
    if std not in STD_MODES:
        raise ValueError(f"group_advantages: std must be 'group', 'global' or 'none', got {std!r}")
    values = scores.detach().double()
    advantages = torch.full_like(values, float("nan"))
    _, global_std = _stats(values, unbiased)
    rows_of: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        rows_of.setdefault(prompt, []).append(i)
    for rows_list in rows_of.values():
        rows = torch.tensor(rows_list, device=values.device)
        mean, group_std = _stats(values[rows], unbiased)
        scale = {"group": group_std, "global": global_std, "none": None}[std]
        centred = values[rows] - mean
        advantages[rows] = centred if scale is None else centred / (scale + eps)
    return advantages.to(scores.dtype)


def per_prompt_advantages(
    scores: torch.Tensor,
    prompts: Sequence[str],
    *,
    std: Std = "group",
    eps: float = ADVANTAGE_EPS,
    unbiased: bool = False,
    clip: float | None = None,
) -> torch.Tensor:
    """Stateless group-relative advantages for this rank's rows (gathers across ranks first).

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
    if std not in STD_MODES:
        raise ValueError(f"per_prompt_advantages: std must be 'group', 'global' or 'none', got {std!r}")
    local = scores.detach().double()
    all_scores, all_prompts, offset = gather_rows(local, prompts)
    advantages = group_advantages(all_scores, all_prompts, std=std, eps=eps, unbiased=unbiased)
    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    return advantages[offset : offset + local.shape[0]].to(scores.dtype)
