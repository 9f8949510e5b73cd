"""Diffusion-DPO pieces: AI-feedback preference pairs from a reward, and the DPO loss on denoising errors.

**Pair labelling** (SalesforceAIResearch/DiffusionDPO ``--choice_model``, TRL ``OnlineDPOTrainer``: the
higher-scored completion is chosen; reference/rl_integration.md sections 1.5, 2.8). Images are grouped
by prompt (equal strings); each group of ``>= 2`` images gives one pair, its best image (chosen) against
its worst (rejected). Stated policy:

* NaN scores ("could not score") never win. With ``nan_loses=False`` (default) NaN rows are left out;
  with ``nan_loses=True`` an unscorable image ranks below every scored one and can be rejected.
* A pair whose margin (chosen score minus rejected score) is not above ``min_margin`` (default ``0``:
  exact ties) carries no preference and is marked invalid, as is a group with fewer than two usable rows.
* Among equal best (or worst) scores the first row in batch order is taken (deterministic).

Every group yields a pair slot and a ``valid`` flag, so the number of pairs per process is fixed by the
batch shape (distributed training needs the same number of backward passes on every rank); the loss
averages over valid pairs only.

**DPO loss** on per-sample denoising errors ``e = mean_{C,h,w} (pred - target)^2`` of the trained model
(``m``) and the frozen reference (``ref``) on the chosen (``w``) and rejected (``l``) latents, noised with
the same noise and timestep. Two published conventions, which differ only by a factor 2 in beta:

* ``"paper"`` (SalesforceAIResearch/DiffusionDPO ``train.py``, Wallace et al. 2023 eq. 14 with its ``T``
  folded into beta): ``inside = -beta / 2 * ((m_w - m_l) - (ref_w - ref_l))``;
  ``implicit_acc = mean(inside > 0)`` (ties count 0). ``--beta_dpo`` default 5000.
* ``"diffusers"`` (huggingface/diffusers ``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py``
  at 071190d): ``inside = beta * ((ref_w - ref_l) - (m_w - m_l))``; ``implicit_acc`` counts ties as
  0.5. ``--beta_dpo`` default 2500, so both defaults give the same loss.

In both, ``loss = mean(-logsigmoid(inside))`` over pairs (``logsigmoid`` per pair, then the mean, as both
references do). ``inside`` is the implicit reward margin of each pair; at initialisation (model ==
reference) it is 0 and the loss is ``ln 2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

__all__ = ["PreferencePairs", "DPOOutput", "label_pairs", "per_sample_mse", "diffusion_dpo_loss"]

Convention = Literal["paper", "diffusers"]
PAPER_BETA = 5000.0  # SalesforceAIResearch/DiffusionDPO train.py --beta_dpo default
DIFFUSERS_BETA = 2500.0  # diffusers train_diffusion_dpo.py --beta_dpo default


@dataclass
class PreferencePairs:
    """One pair slot per prompt group (``G`` groups, in order of first appearance).

    Attributes:
        chosen: int64 ``(G,)`` row index of the chosen (winning) image.
        rejected: int64 ``(G,)`` row index of the rejected image.
        valid: bool ``(G,)``, whether the slot is a real preference (see the module policy).
        margin: float32 ``(G,)`` chosen score minus rejected score (NaN where invalid or ``nan_loses``
            put an unscorable image on the rejected side: ``inf`` is not a useful log value).
        prompts: the ``G`` group prompts.
        reasons: ``{group index: why it is invalid}`` for invalid slots.
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    valid: torch.Tensor
    margin: torch.Tensor
    prompts: list[str]
    reasons: dict[int, str] = field(default_factory=dict)


@dataclass
class DPOOutput:
    """What ``diffusion_dpo_loss`` returns (scalars are 0-dim float32 tensors).

    Attributes:
        loss: the mean DPO loss over valid pairs (differentiable).
        implicit_acc: fraction of valid pairs with a positive implicit reward margin (NaN with none).
        inside: ``(P,)`` the implicit reward margin per pair (the logsigmoid argument), detached.
        model_margin: ``(P,)`` ``m_w - m_l`` (negative = the model fits the chosen image better), detached.
        ref_margin: ``(P,)`` ``ref_w - ref_l``, detached.
    """

    loss: torch.Tensor
    implicit_acc: torch.Tensor
    inside: torch.Tensor
    model_margin: torch.Tensor
    ref_margin: torch.Tensor


def _pick(rows: list[int], values: list[float], nan_loses: bool) -> tuple[int, int, str | None]:
    """(chosen, rejected, reason-if-invalid) for one group's row indices and scores."""
    finite = [(v, i) for v, i in zip(values, rows) if v == v]
    unscored = [i for v, i in zip(values, rows) if v != v]
    if not finite:
        return rows[0], rows[1], "no row could be scored (all NaN)"
    best = max(finite, key=lambda item: item[0])[1]  # max/min keep the first of equal scores
    if nan_loses and unscored:
        return best, unscored[0], None
    if len(finite) < 2:
        return best, next(i for i in rows if i != best), "fewer than two scored rows"
    others = [item for item in finite if item[1] != best]  # a fully tied group still pairs two rows
    return best, min(others, key=lambda item: item[0])[1], None


def label_pairs(scores: torch.Tensor, prompts: Sequence[str], *, min_margin: float = 0.0,
                nan_loses: bool = False) -> PreferencePairs:
    """Chosen / rejected pairs from reward scores, one per prompt group (module docstring policy).

    Args:
        scores: float ``(N,)`` higher-is-better scores (e.g. a composed reward's total); NaN = unscorable.
        prompts: ``N`` prompts; equal strings form a group, which must hold at least 2 rows.
        min_margin: a pair needs ``chosen - rejected > min_margin`` to be valid (``>= 0``).
        nan_loses: let an unscorable row be the rejected image (default: NaN rows are left out).

    Returns:
        A ``PreferencePairs`` with ``G`` slots (``G`` = distinct prompts).

    Raises:
        ValueError: ``scores`` not ``(N,)`` or not matching ``prompts``, a group with one row, or a
            negative ``min_margin``.
    """
    if scores.ndim != 1 or scores.shape[0] != len(prompts):
        raise ValueError(f"label_pairs: expected scores (N,) and N prompts, got {tuple(scores.shape)} and "
                         f"{len(prompts)} prompts")
    if not min_margin >= 0:
        raise ValueError(f"label_pairs: min_margin must be >= 0, got {min_margin}")
    values = scores.detach().double().cpu().tolist()
    groups: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(index)
    small = [prompt for prompt, rows in groups.items() if len(rows) < 2]
    if small:
        raise ValueError(f"label_pairs: every prompt needs >= 2 images to form a pair; {small[:3]} have one "
                         "(generate several images per prompt, e.g. images_per_prompt=2)")
    chosen, rejected, valid, margin, reasons = [], [], [], [], {}
    for g, rows in enumerate(groups.values()):
        win, lose, reason = _pick(rows, [values[i] for i in rows], nan_loses)
        gap = values[win] - values[lose]  # NaN when the loser is unscorable
        if reason is None and gap == gap and not gap > min_margin:
            reason = f"tie: margin {gap:.3g} is not above min_margin {min_margin:g}"
        if reason is not None:
            reasons[g] = reason
        chosen.append(win)
        rejected.append(lose)
        valid.append(reason is None)
        margin.append(gap if reason is None else float("nan"))
    device = scores.device
    return PreferencePairs(torch.tensor(chosen, device=device), torch.tensor(rejected, device=device),
                           torch.tensor(valid, device=device), torch.tensor(margin, device=device).float(),
                           list(groups), reasons)


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Float32 mean squared error per sample: ``(B, ...)`` x ``(B, ...)`` -> ``(B,)`` (diffusers' DPO MSE)."""
    if pred.shape != target.shape or pred.ndim < 2:
        raise ValueError(f"per_sample_mse: pred and target must share a (B, ...) shape, got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    errors = F.mse_loss(pred.float(), target.float(), reduction="none")
    return errors.mean(dim=tuple(range(1, errors.ndim)))


def diffusion_dpo_loss(model_w: torch.Tensor, model_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, *,
                       beta: float, convention: Convention = "paper",
                       mask: torch.Tensor | None = None) -> DPOOutput:
    """The Diffusion-DPO loss on per-pair denoising errors (module docstring for both conventions).

    Args:
        model_w, model_l: ``(P,)`` the trained model's per-sample MSE on the chosen / rejected latents.
        ref_w, ref_l: ``(P,)`` the reference model's MSE on the same inputs (no gradient needed).
        beta: the KL weight, ``> 0`` (thousands for SD: 5000 ``"paper"``, 2500 ``"diffusers"``).
        convention: ``"paper"`` or ``"diffusers"``.
        mask: optional bool ``(P,)``; only ``True`` pairs count (``PreferencePairs.valid``). With no
            valid pair the loss is ``0 * sum(inside)`` (keeps the graph, so every rank can run backward)
            and ``implicit_acc`` is NaN.

    Returns:
        A ``DPOOutput``.

    Raises:
        ValueError: mismatched shapes, ``beta <= 0`` or an unknown convention.
    """
    shape = model_w.shape
    if model_w.ndim != 1 or any(t.shape != shape for t in (model_l, ref_w, ref_l)):
        raise ValueError("diffusion_dpo_loss: model_w, model_l, ref_w and ref_l must all be (P,), got "
                         f"{[tuple(t.shape) for t in (model_w, model_l, ref_w, ref_l)]}")
    if mask is not None and (mask.shape != shape or mask.dtype != torch.bool):
        raise ValueError(f"diffusion_dpo_loss: mask must be bool ({shape[0]},), got {mask.dtype} {tuple(mask.shape)}")
    if not beta > 0:
        raise ValueError(f"diffusion_dpo_loss: beta must be > 0, got {beta}")
    model_margin = model_w.float() - model_l.float()
    ref_margin = (ref_w.float() - ref_l.float()).detach()
    if convention == "paper":
        inside = -0.5 * beta * (model_margin - ref_margin)
        correct = (inside > 0).float()
    elif convention == "diffusers":
        inside = beta * (ref_margin - model_margin)
        correct = (inside > 0).float() + 0.5 * (inside == 0).float()
    else:
        raise ValueError(f"diffusion_dpo_loss: convention must be 'paper' or 'diffusers', got {convention!r}")
    keep = torch.ones_like(inside, dtype=torch.bool) if mask is None else mask
    losses = -F.logsigmoid(inside)
    count = int(keep.sum())
    if count == 0:
        loss, acc = 0.0 * inside.sum(), inside.new_tensor(float("nan"))
    else:
        loss, acc = losses[keep].mean(), correct[keep].mean()
    return DPOOutput(loss, acc.detach(), inside.detach(), model_margin.detach(), ref_margin)
