"""Groupwise rewards from a pairwise judge (Pref-GRPO): each image's win rate over the pairs of its group.

Pref-GRPO (CodeGoat24/Pref-GRPO ``fastvideo/rewards/unifiedreward_think.py`` and
``unifiedreward_edit_pairwise.py`` ``_pairwise_win_rate``, HEAD 3e787f6) judges every one of the C(G, 2)
pairs of a prompt's G images (``itertools.combinations``, the lower index shown first) and rewards each
image with ``wins / comparisons``, where a win counts 1, a stated tie 0.5 to each image, and the group's
advantages are then computed from these win rates as from any reward.

Here ``judge(images_a, images_b, prompts, **context)`` returns, for each pair, the probability that the
first image is better: 1.0 = first wins, 0.0 = second wins, 0.5 = tie (a winner-style judge returns
exactly these), anything in between a soft preference (the first image earns ``p``, the second ``1 - p``).
It may return a tensor, a numpy array, a list (``None`` = failed) or a ``RewardOutput`` (its
``details["failure"]`` reasons are kept). Ties count 0.5 each, as Pref-GRPO. Deviations, on purpose:

* a pair the judge could not judge (NaN / ``None``) is **not** a tie: it is left out of both images'
  comparisons and counted in ``details["n_failed"]`` (Pref-GRPO counts an unparseable answer as a tie);
* an image none of whose pairs could be judged (or alone in its group) is NaN with its reason in
  ``details["failure"]`` (Pref-GRPO gives 0.0);
* win rates are not rounded (Pref-GRPO rounds to 3 decimals).

Groups must be complete in the call: a group split over processes needs its images gathered first.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Sequence

import numpy as np
import torch

from rewardkit.errors import check_images
from rewardkit.protocols import RewardOutput

__all__ = ["PairwiseJudge", "edit_pairwise_judge", "pairwise_win_rates"]

PairwiseJudge = Callable[..., Any]  # judge(images_a (P,3,H,W), images_b (P,3,H,W), prompts [P], **context) -> (P,)
TIE = 0.5  # Pref-GRPO: a stated tie adds 0.5 to each image's wins


def _preferences(output: Any, count: int) -> tuple[np.ndarray, list[str | None]]:
    """A judge's answer for ``count`` pairs -> float64 ``(count,)`` in [0, 1] or NaN, and per-pair reasons."""
    reasons: list[str | None] = [None] * count
    if hasattr(output, "scores") and hasattr(output, "details"):
        failures = output.details.get("failure")
        reasons = list(failures) if isinstance(failures, (list, tuple)) and len(failures) == count else reasons
        output = output.scores
    if isinstance(output, torch.Tensor):
        values = output.detach().to("cpu", torch.float64).numpy()
    else:
        values = np.array([np.nan if v is None else v for v in output], dtype=np.float64)
    if values.shape != (count,):
        raise ValueError(f"pairwise_win_rates: the judge must return one preference per pair: expected ({count},), "
                         f"got shape {values.shape}")
    bad = np.isfinite(values) & ((values < 0) | (values > 1))
    if bad.any():
        raise ValueError(f"pairwise_win_rates: the judge returned {values[bad][:3].tolist()} outside [0, 1]; return "
                         "P(first image better): 1 = first wins, 0 = second wins, 0.5 = tie, NaN = could not judge")
    return values, reasons


def _pairs(group_keys: Sequence[Any]) -> list[tuple[int, int]]:
    """All ``(i, j)``, ``i < j``, of equal keys: groups in first-appearance order, combinations order inside."""
    rows_of: dict[Any, list[int]] = {}
    for row, key in enumerate(group_keys):
        rows_of.setdefault(key, []).append(row)
    return [pair for rows in rows_of.values() for pair in itertools.combinations(rows, 2)]


def _failure(n_pairs: int, n_failed: int, reason: str | None) -> str | None:
    if n_pairs == 0:
        return "alone in its group: no pair to compare"
    if n_failed == n_pairs:
        return f"all {n_pairs} pairs failed" + (f" ({reason})" if reason else " (the judge returned NaN)")
    return None


def pairwise_win_rates(images: torch.Tensor, prompts: Sequence[str], judge: PairwiseJudge, *,
                       group_ids: Sequence[Any] | None = None, source: torch.Tensor | None = None,
                       pairs_per_call: int | None = None) -> RewardOutput:
    """Each image's win rate against the other images of its group, from a pairwise judge.

    Args:
        images: float ``(B, 3, H, W)`` in ``[0, 1]``.
        prompts: ``B`` prompts (passed to the judge, and the groups unless ``group_ids`` is given).
        judge: ``judge(images_a, images_b, prompts, **context) -> (P,)`` preferences for ``P`` pairs
            (module docstring); called with ``source=`` pairs' source images when ``source`` is given.
        group_ids: ``B`` hashable group keys (default: the prompts).
        source: float ``(B, 3, H, W)`` unedited images for edit judges; equal within a group.
        pairs_per_call: at most this many pairs per judge call (``None`` = all pairs in one call).

    Returns:
        ``RewardOutput``: ``scores`` float32 ``(B,)`` win rates in ``[0, 1]`` (NaN: no judged pair), ``details``
        ``n_pairs`` / ``n_ties`` / ``n_failed`` (int64 ``(B,)``: pairs of the image, ties, pairs the judge
        could not judge), ``wins`` (float32 ``(B,)``), ``failure`` (``B`` reasons or ``None``).

    Raises:
        ValueError / TypeError: bad images, ``B`` mismatches, sources that differ within a group, a
            non-positive ``pairs_per_call``, or a judge answer of the wrong length or outside ``[0, 1]``.
    """
    check_images("pairwise_win_rates", images)
    prompts = [prompts] * images.shape[0] if isinstance(prompts, str) else list(prompts)
    keys = prompts if group_ids is None else list(group_ids)
    if len(prompts) != images.shape[0] or len(keys) != images.shape[0]:
        raise ValueError(f"pairwise_win_rates: need one prompt and group id per image: {images.shape[0]} images, "
                         f"{len(prompts)} prompts, {len(keys)} group ids")
    if pairs_per_call is not None and pairs_per_call < 1:
        raise ValueError(f"pairwise_win_rates: pairs_per_call must be >= 1 or None, got {pairs_per_call}")
    pairs = _pairs(keys)
    if source is not None:
        check_images("pairwise_win_rates (source=)", source)
        if source.shape[0] != images.shape[0] or any(not torch.equal(source[i], source[j]) for i, j in pairs):
            raise ValueError("pairwise_win_rates: source= must hold one image per image, equal within each group "
                             "(the edits of one source); pass group_ids that separate different sources")
    preference, reasons = np.zeros(len(pairs)), [None] * len(pairs)
    step = pairs_per_call or max(len(pairs), 1)
    for start in range(0, len(pairs), step):
        chunk = pairs[start:start + step]
        first = torch.tensor([i for i, _ in chunk], device=images.device)
        second = torch.tensor([j for _, j in chunk], device=images.device)
        context = {} if source is None else {"source": source[first]}
        answer = judge(images[first], images[second], [prompts[i] for i, _ in chunk], **context)
        preference[start:start + len(chunk)], reasons[start:start + len(chunk)] = _preferences(answer, len(chunk))
    return _tally(images.shape[0], pairs, preference, reasons, images.device)


def _tally(count: int, pairs: list[tuple[int, int]], preference: np.ndarray, reasons: list[str | None],
           device: torch.device) -> RewardOutput:
    wins, n_pairs, n_ties, n_failed = np.zeros(count), np.zeros(count, np.int64), np.zeros(count, np.int64), \
        np.zeros(count, np.int64)
    last_reason: list[str | None] = [None] * count
    for (i, j), p, reason in zip(pairs, preference, reasons):
        n_pairs[[i, j]] += 1
        if np.isnan(p):
            n_failed[[i, j]] += 1
            last_reason[i] = last_reason[j] = reason
            continue
        n_ties[[i, j]] += int(p == TIE)
        wins[i] += p
        wins[j] += 1.0 - p
    judged = n_pairs - n_failed
    rates = np.where(judged > 0, wins / np.maximum(judged, 1), np.nan)
    failure = [_failure(int(n_pairs[k]), int(n_failed[k]), last_reason[k]) for k in range(count)]
    as_tensor = lambda a, dtype: torch.as_tensor(a, dtype=dtype, device=device)  # noqa: E731
    details = {"n_pairs": as_tensor(n_pairs, torch.int64), "n_ties": as_tensor(n_ties, torch.int64),
               "n_failed": as_tensor(n_failed, torch.int64), "wins": as_tensor(wins, torch.float32), "failure": failure}
    return RewardOutput(scores=as_tensor(rates, torch.float32), details=details)


def edit_pairwise_judge(reward: Any) -> PairwiseJudge:
    """A pairwise judge from rewardkit's ``unified-reward-edit`` (its ``edit_pairwise_rank`` task).

    ``judge(edits_a, edits_b, instructions, source=...)`` asks UnifiedReward Edit which of two edits of the
    same source follows the instruction better (``[source, edit 1, edit 2]``, as Pref-GRPO's
    ``cal_win_rate_edit_images``): 1.0 / 0.0 / 0.5 (tie) / NaN with the parser's reason.

    Args:
        reward: ``rk.load("unified-reward-edit", ...)`` (any task; the same backend is reused).

    Raises:
        TypeError: ``reward`` has no ``with_task`` (not a UnifiedReward Edit judge).
    """
    if not callable(getattr(reward, "with_task", None)):
        raise TypeError(f"edit_pairwise_judge: expected rk.load('unified-reward-edit', ...), got "
                        f"{type(reward).__name__}; for another judge pass any judge(a, b, prompts) callable")
    ranker = reward.with_task("edit_pairwise_rank")

    def judge(images_a: torch.Tensor, images_b: torch.Tensor, prompts: list[str], *,
              source: torch.Tensor | None = None) -> RewardOutput:
        return ranker.evaluate(images_a, prompts, source=source, other=images_b)

    return judge
