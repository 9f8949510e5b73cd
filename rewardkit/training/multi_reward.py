"""Advantages from several rewards, the three ways the field combines them.

``rewards`` is ``{name: (B,) tensor}`` for this rank's rows, ``prompts`` the ``B`` prompts (a group = equal
prompts across every rank: rows are gathered first, as ``per_prompt_advantages``), ``weights`` ``{name: w}``.
``norm(x)`` below is the group-relative ``(x - mean_group) / (std + eps)`` of ``group_advantages``, with the
given ``std`` mode (``"group"`` / ``"global"`` / ``"none"``), ``unbiased`` and ``eps``.

* ``"reward_aggr"``: ``norm(sum_k w_k r_k)``, a weighted sum of the raw rewards, then one normalisation.
  flow_grpo's ``multi_score`` + ``PerPromptStatTracker`` (population std, ``eps=1e-4``), TRL's
  ``sum_then_normalize``, MixGRPO ``--multi_reward_mix reward_aggr`` (Tencent-Hunyuan/MixGRPO
  ``fastvideo/train_grpo_flux.py`` L458-L481: ``torch.std`` i.e. ``unbiased=True``, ``eps=1e-8``).
* ``"advantage_aggr"``: ``sum_k w_k norm(r_k)``, each reward normalised in its group, then the weighted sum,
  **not** renormalised. MixGRPO ``advantage_aggr`` (same file L429-L456; its ``main`` divides the weights by
  their sum, ``normalize_weights=True``), DanceGRPO ``fastvideo/train_grpo_hunyuan.py`` L370-L396 (vq / mq
  advantages with ``vq_coef`` / ``mq_coef``; upstream weights the two clipped PPO losses, which equals
  weighting the advantages while neither ``adv_clip_max`` nor the ratio clip binds), Pref-GRPO
  ``fastvideo/rewards/dispatcher.py`` ``compute_weighted_advantages`` without ``--apply_gdpo``
  (``unbiased=True``, ``eps=1e-8``).
* ``"gdpo"``: ``bn(sum_k w_k norm(r_k))`` with ``bn(a) = (a - mean_batch(a)) / (std_batch(a) + batch_eps)``
  over the whole gathered batch: GDPO (Liu et al. 2026, arXiv 2601.05242), as implemented in NVlabs/GDPO
  ``trl-GDPO/trl-0.18.0-gdpo/trl/trainer/grpo_trainer.py`` (commit 41f74c5: ``torch.std`` for both steps,
  ``eps=1e-4`` for both) and in Pref-GRPO ``--apply_gdpo`` (``eps=1e-8`` for both).

NaN policy (``nan=``): ``"propagate"`` (default) treats a row with any NaN reward as not applicable: NaN
advantage, and left out of every statistic; ``"skip"`` leaves a reward's NaN rows out of that reward's
statistics and its term out of the sum (``nansum``, TRL's policy), so only rows NaN in every reward are NaN.
GDPO's code replaces NaN by 0 before normalising, which this module never does (a missing score is not a
zero score).
"""

from __future__ import annotations

from typing import Literal, Mapping, Sequence

import torch

from rewardkit.training.advantages import ADVANTAGE_EPS, STD_MODES, Std, gather_rows, group_advantages

__all__ = ["AGGREGATIONS", "multi_reward_advantages"]

Aggregation = Literal["reward_aggr", "advantage_aggr", "gdpo"]
AGGREGATIONS = ("reward_aggr", "advantage_aggr", "gdpo")
NAN_POLICIES = ("propagate", "skip")


def _weighted_sum(terms: torch.Tensor, weights: torch.Tensor, nan: str) -> torch.Tensor:
    """``(N, K)`` terms x ``(K,)`` weights -> ``(N,)``; ``skip`` sums the finite terms (NaN if none is)."""
    weighted = terms * weights
    if nan == "propagate":
        return weighted.sum(dim=1)
    finite = torch.isfinite(terms)
    total = torch.where(finite, weighted, torch.zeros_like(weighted)).sum(dim=1)
    return torch.where(finite.any(dim=1), total, torch.full_like(total, float("nan")))


def _batch_normalise(values: torch.Tensor, unbiased: bool, eps: float) -> torch.Tensor:
    finite = values[torch.isfinite(values)]
    if finite.numel() == 0:
        return values.clone()
    std = finite.std(unbiased=True) if unbiased and finite.numel() > 1 else finite.std(unbiased=False)
    return (values - finite.mean()) / (std + eps)


def _check(rewards: Mapping[str, torch.Tensor], prompts: Sequence[str], weights: Mapping[str, float] | None,
           aggregation: str, std: str, nan: str) -> dict[str, float]:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"multi_reward_advantages: aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if std not in STD_MODES or nan not in NAN_POLICIES:
        raise ValueError(f"multi_reward_advantages: std must be one of {STD_MODES} and nan one of {NAN_POLICIES}, "
                         f"got {std!r} and {nan!r}")
    if not rewards:
        raise ValueError("multi_reward_advantages: rewards is empty; pass {name: (B,) tensor}")
    for name, values in rewards.items():
        if not isinstance(values, torch.Tensor) or values.ndim != 1 or values.shape[0] != len(prompts):
            shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise ValueError(f"multi_reward_advantages: reward {name!r} must be a (B,) tensor for B={len(prompts)} "
                             f"prompts, got {shape}")
    weights = {name: 1.0 for name in rewards} if weights is None else dict(weights)
    if set(weights) != set(rewards):
        raise ValueError(f"multi_reward_advantages: weights name {sorted(weights)} but rewards name "
                         f"{sorted(rewards)}; give one weight per reward (or weights=None for 1.0 each)")
    return {name: float(weights[name]) for name in rewards}


def multi_reward_advantages(
    rewards: Mapping[str, torch.Tensor],
    prompts: Sequence[str],
    weights: Mapping[str, float] | None = None,
    *,
    aggregation: Aggregation = "reward_aggr",
    std: Std = "group",
    unbiased: bool = False,
    eps: float = ADVANTAGE_EPS,
    batch_unbiased: bool = True,
    batch_eps: float = ADVANTAGE_EPS,
    normalize_weights: bool = False,
    nan: Literal["propagate", "skip"] = "propagate",
) -> torch.Tensor:
    """Advantages ``(B,)`` of this rank's rows from several rewards (module docstring for each aggregation).

    Args:
        rewards: ``{name: float (B,) tensor}`` raw rewards of this rank's rows; NaN = not applicable.
        prompts: the ``B`` prompts; equal strings form a group (across ranks too).
        weights: ``{name: weight}`` with one entry per reward; ``None`` = 1.0 each.
        aggregation: ``"reward_aggr"``, ``"advantage_aggr"`` or ``"gdpo"``.
        std: the per-group normalisation's std mode (``"group"``, ``"global"``, ``"none"``).
        unbiased: sample (``True``: ``torch.std``, MixGRPO / DanceGRPO / Pref-GRPO / GDPO) or population
            (``False``: numpy, flow_grpo / ddpo) std in the per-group normalisation.
        eps: added to the per-group std (1e-4 flow_grpo / TRL / GDPO, 1e-8 MixGRPO / DanceGRPO / Pref-GRPO).
        batch_unbiased: ``gdpo`` only; sample std in the batch normalisation (``torch.std`` upstream).
        batch_eps: ``gdpo`` only; added to the batch std.
        normalize_weights: divide the weights by their sum first (MixGRPO).
        nan: ``"propagate"`` or ``"skip"`` (module docstring).

    Returns:
        float ``(B,)`` advantages in the rewards' dtype on their device (no gradient).

    Raises:
        ValueError: an unknown option, no rewards, a reward that is not ``(B,)``, or weights that do not name
            exactly the rewards (or sum to 0 with ``normalize_weights``).
    """
    weight_of = _check(rewards, prompts, weights, aggregation, std, nan)
    names = list(rewards)
    if normalize_weights:
        total = sum(weight_of.values())
        if total == 0:
            raise ValueError(f"multi_reward_advantages: normalize_weights needs weights with a non-zero sum, got "
                             f"{weight_of}")
        weight_of = {name: w / total for name, w in weight_of.items()}
    first = rewards[names[0]]
    local = torch.stack([rewards[name].detach().to(first.device, torch.float64) for name in names], dim=1)
    table, all_prompts, offset = gather_rows(local, prompts)  # one collective for every reward
    w = torch.tensor([weight_of[name] for name in names], dtype=torch.float64, device=table.device)
    norm = dict(std=std, eps=eps, unbiased=unbiased)
    if aggregation == "reward_aggr":
        advantages = group_advantages(_weighted_sum(table, w, nan), all_prompts, **norm)
    else:
        if nan == "propagate":  # a row NaN in one reward is NaN in all: every statistic sees the same rows
            table = torch.where(torch.isfinite(table).all(dim=1, keepdim=True), table, torch.nan)
        per_reward = torch.stack([group_advantages(table[:, k], all_prompts, **norm) for k in range(len(names))], 1)
        advantages = _weighted_sum(per_reward, w, nan)
        if aggregation == "gdpo":
            advantages = _batch_normalise(advantages, batch_unbiased, batch_eps)
    dtype = first.dtype if first.is_floating_point() else torch.float64
    return advantages[offset: offset + local.shape[0]].to(dtype)
