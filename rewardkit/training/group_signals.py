"""Saturation signals of a GRPO batch: how many groups carry no advantage signal, and how much rewards spread.

* ``zero_std_ratio``: the fraction of groups (rows of one prompt) whose rewards are all equal. Such a group
  has zero advantages: it teaches nothing, and a rising ratio means the reward saturates (or is hacked).
  flow_grpo logs it as ``zero_std_ratio`` (``scripts/train_sd3.py`` ``calculate_zero_std_ratio``), TRL as
  ``frac_reward_zero_std``. flow_grpo tests ``np.std(group) == 0``, which misses some equal groups because
  the mean of equal floats is not always exact (``np.std([0.1] * 3)`` is 1.4e-17); here a group counts when
  ``max - min <= atol`` (default 0: exactly equal).
* ``group_std_mean``: the mean over groups of the population std of their rewards (flow_grpo's
  ``reward_std_mean``).
* ``part_correlations``: Pearson correlation between every two parts of a composed reward over the batch
  (``details`` of ``evaluate()``); parts that move together add no information, parts that move apart
  pull the policy two ways.

These work on the whole (gathered) batch; ``advantages.gather_rows`` gathers every rank's rows first.
NaN rewards are left out; a group with no finite reward is counted in ``num_unscored_groups`` only.
``advantages_with_signals`` is the recipes' one call: gather once, advantages (tracker or stateless), signals.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from rewardkit.training.advantages import gather_rows, group_advantages

if TYPE_CHECKING:
    from rewardkit.training.trackers import PerPromptStatTracker

__all__ = ["GroupSignals", "advantages_with_signals", "group_signals", "part_correlations"]


@dataclass(frozen=True)
class GroupSignals:
    """Saturation signals of one batch (see the module docstring)."""

    zero_std_ratio: float  # groups with all-equal finite rewards / groups with at least one finite reward
    group_std_mean: float  # mean population std of those groups' finite rewards
    num_groups: int  # groups with at least one finite reward
    num_unscored_groups: int  # groups whose rewards are all NaN (in no ratio or mean)

    def as_metrics(self, prefix: str = "train/") -> dict[str, float]:
        """``{prefix + "zero_std_ratio": ..., prefix + "group_std_mean": ...}`` for ``accelerator.log``."""
        return {f"{prefix}{key}": float(value) for key, value in asdict(self).items()
                if key in ("zero_std_ratio", "group_std_mean")}


def group_signals(scores: torch.Tensor, prompts: Sequence[str], *, atol: float = 0.0) -> GroupSignals:
    """Zero-std group ratio and mean group std of a whole batch.

    Args:
        scores: float ``(N,)`` rewards of the whole batch (NaN = not applicable).
        prompts: the ``N`` prompts; equal strings form a group.
        atol: a group is "zero std" when ``max - min <= atol``.

    Returns:
        ``GroupSignals``; both values are NaN when no group has a finite reward.

    Raises:
        ValueError: ``scores`` not ``(N,)`` for ``N`` prompts, or a negative ``atol``.
    """
    if scores.ndim != 1 or scores.shape[0] != len(prompts):
        raise ValueError(f"group_signals: expected scores (N,) and N prompts, got {tuple(scores.shape)} and "
                         f"{len(prompts)} prompts")
    if atol < 0:
        raise ValueError(f"group_signals: atol must be >= 0, got {atol}")
    values = scores.detach().to("cpu", torch.float64)
    rows_of: dict[str, list[int]] = {}
    for row, prompt in enumerate(prompts):
        rows_of.setdefault(prompt, []).append(row)
    flat, spreads, unscored = 0, [], 0
    for rows in rows_of.values():
        group = values[rows]
        group = group[torch.isfinite(group)]
        if group.numel() == 0:
            unscored += 1
            continue
        flat += int(float(group.max() - group.min()) <= atol)
        spreads.append(float(group.std(unbiased=False)))
    if not spreads:
        return GroupSignals(float("nan"), float("nan"), 0, unscored)
    return GroupSignals(flat / len(spreads), sum(spreads) / len(spreads), len(spreads), unscored)


def part_correlations(parts: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, float]:
    """Pearson correlation of every two parts, ``{prefix + "<a>_vs_<b>": r}`` in the parts' order.

    Args:
        parts: ``{name: float (N,) tensor}`` (e.g. a composed reward's ``details`` over the gathered batch).
        prefix: prepended to every key (e.g. ``"train/part_corr/"``).

    Returns:
        ``r`` in ``[-1, 1]`` over the rows where both parts are finite; NaN when fewer than 2 such rows or a
        part is constant on them (the correlation is undefined, not 0). Empty for fewer than 2 parts.

    Raises:
        ValueError: parts of different lengths or not 1-D.
    """
    lengths = {name: tuple(values.shape) for name, values in parts.items()}
    if len(set(lengths.values())) > 1 or any(len(shape) != 1 for shape in lengths.values()):
        raise ValueError(f"part_correlations: every part must be (N,) with the same N, got {lengths}")
    result = {}
    for (a, x), (b, y) in itertools.combinations(parts.items(), 2):
        x, y = x.detach().to("cpu", torch.float64), y.detach().to("cpu", torch.float64)
        both = torch.isfinite(x) & torch.isfinite(y)
        x, y = x[both], y[both]
        x, y = x - x.mean(), y - y.mean()  # empty stays empty when no row has both parts
        denominator = float(torch.sqrt((x * x).sum() * (y * y).sum())) if x.numel() > 1 else 0.0
        result[f"{prefix}{a}_vs_{b}"] = float((x * y).sum()) / denominator if denominator > 0 else float("nan")
    return result


def advantages_with_signals(scores: torch.Tensor, prompts: Sequence[str], parts: Mapping[str, torch.Tensor], *,
                            tracker: PerPromptStatTracker | None, std: str = "group", clip: float | None = None,
                            prefix: str = "train/") -> tuple[torch.Tensor, dict[str, float]]:
    """This rank's advantages and the batch's saturation signals, from one gather of every rank's rows.

    Args:
        scores: float ``(B,)`` total rewards of this rank's rows (NaN = not applicable).
        prompts: the ``B`` prompts (groups span ranks).
        parts: ``{name: (B,)}`` parts of a composed reward (``evaluate().details``); may be empty.
        tracker: a ``PerPromptStatTracker`` (updated with the gathered batch on every rank), or ``None`` for
            the stateless ``group_advantages(std=std)``.
        std: the stateless std mode (ignored with a tracker).
        clip: clamp the advantages to ``[-clip, clip]``; ``None`` = no clamp.
        prefix: prefix of the metric keys.

    Returns:
        ``(advantages (B,) float32 on scores.device, metrics)`` with ``<prefix>zero_std_ratio``,
        ``<prefix>group_std_mean`` and ``<prefix>part_corr/<a>_vs_<b>`` for every two parts.
    """
    names = list(parts)
    local = torch.stack([scores.detach().double(), *(parts[n].detach().to(scores.device).double() for n in names)], 1)
    table, all_prompts, offset = gather_rows(local, prompts)  # a collective: every rank calls this
    total = table[:, 0]
    if tracker is None:
        advantages = group_advantages(total, all_prompts, std=std)  # type: ignore[arg-type]
    else:
        advantages = tracker.update(all_prompts, total, gathered=True)
    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    metrics = group_signals(total, all_prompts).as_metrics(prefix)
    metrics.update(part_correlations({n: table[:, k + 1] for k, n in enumerate(names)}, prefix=f"{prefix}part_corr/"))
    return advantages[offset: offset + scores.shape[0]].to(scores.device, torch.float32), metrics
