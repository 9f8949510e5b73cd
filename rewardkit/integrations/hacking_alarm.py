"""Reward-hacking monitors for periodic evaluation: a trend alarm and per-part correlations.

``RewardHackingAlarm`` fires when the *optimised* (training) reward rises while a *held-out* evaluation
value worsens over the last ``window`` evaluations: the signature of reward hacking (grid patterns,
over-saturation) that users report in flow_grpo #92 / #233 and DanceGRPO #36
(``reference/rl_integration.md`` section 2.2, ``reference/field_2026.md`` section 2 item 3). It is pure
(no I/O, no collectives): the callbacks feed it values that are already identical on every rank, so
every rank takes the same decision at the same step.

Trend, not endpoints: each series' change over the window is its least-squares slope times
``window - 1`` (the fitted rise from the first to the last evaluation), so one noisy evaluation moves
it far less than a last-minus-first difference would. Changes within the tolerances count as flat.

``part_correlations`` gives the pairwise Pearson and Spearman correlations of a composition's parts
on the evaluation set (rows where either part is NaN are left out of that pair): parts that stop
agreeing while the total rises are the other hacking symptom ("HPS and PickScore conflict", DanceGRPO #85).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["RewardHackingAlarm", "part_correlations", "pearson", "spearman", "trend"]

MIN_WINDOW = 2  # a trend needs two evaluations
MIN_CORRELATION_ROWS = 2  # a correlation needs two rows with non-zero spread


def trend(values: Sequence[float]) -> float:
    """Fitted change of ``values`` (equally spaced) from first to last: least-squares slope x (len - 1).

    NaN when fewer than 2 values or any value is not finite.
    """
    n = len(values)
    if n < MIN_WINDOW or not all(math.isfinite(v) for v in values):
        return math.nan
    t_mean, v_mean = (n - 1) / 2, math.fsum(values) / n
    covariance = math.fsum((t - t_mean) * (v - v_mean) for t, v in enumerate(values))
    spread = math.fsum((t - t_mean) ** 2 for t in range(n))
    return covariance / spread * (n - 1)


class RewardHackingAlarm:
    """Fires when the training reward rises while a held-out evaluation value worsens over ``window`` evaluations.

    Feed one observation per evaluation with :meth:`observe`. For each watched evaluation key the alarm
    fires when, over the last ``window`` observations, ``trend(train) > train_tolerance`` and the
    evaluation value's trend, oriented so that up is better, is ``< -eval_tolerance``. Keys with a
    non-finite value (or a missing one) anywhere in the window, or a non-finite training reward, do not
    decide. The tolerances are absolute, in each series' own units (a reward's score scale, FID units).

    Args:
        window: Evaluations per decision (``>= 2``).
        train_tolerance: A fitted training-reward rise at or below this is flat.
        eval_tolerance: A fitted evaluation drop at or below this is flat (noise of the fixed eval set).
        watch: Evaluation keys (without the log prefix, e.g. ``"pickscore_mean"``, ``"fid"``) to watch;
            ``None`` watches every key the callback offers.
    """

    def __init__(self, window: int = 3, *, train_tolerance: float = 0.0, eval_tolerance: float = 0.0,
                 watch: Sequence[str] | None = None) -> None:
        if int(window) < MIN_WINDOW:
            raise ValueError(f"RewardHackingAlarm: window must be >= {MIN_WINDOW} evaluations, got {window}")
        if not (train_tolerance >= 0 and eval_tolerance >= 0):
            raise ValueError(f"RewardHackingAlarm: tolerances must be >= 0, got train {train_tolerance}, "
                             f"eval {eval_tolerance}")
        self.window, self.train_tolerance, self.eval_tolerance = int(window), float(train_tolerance), float(eval_tolerance)
        self.watch = None if watch is None else [str(k) for k in ([watch] if isinstance(watch, str) else watch)]
        self.history: list[dict[str, Any]] = []  # the last `window` observations, oldest first
        self.fired: list[dict[str, Any]] = []  # every firing: {"step": int, "keys": [str, ...]}
        self.last: list[str] = []  # the keys the latest observation fired on

    @property
    def triggered(self) -> bool:
        """Whether the latest observation fired."""
        return bool(self.last)

    def observe(self, step: int | None, train_reward: float, eval_rewards: Mapping[str, float],
                higher_is_better: Mapping[str, bool] | None = None) -> list[str]:
        """Record one evaluation and decide.

        Args:
            step: The training step of this evaluation (recorded, not used in the maths).
            train_reward: Mean optimised reward since the previous evaluation (NaN: unknown).
            eval_rewards: ``{key: value}`` of the held-out evaluation.
            higher_is_better: Orientation per key (default True; FID is False).

        Returns:
            The watched keys that fired (empty: no alarm).
        """
        orient = dict(higher_is_better or {})
        keys = [k for k in eval_rewards if self.watch is None or k in self.watch]
        good = {k: float(eval_rewards[k]) * (1.0 if orient.get(k, True) else -1.0) for k in keys}
        self.history.append({"step": None if step is None else int(step), "train": float(train_reward), "eval": good})
        del self.history[: -self.window]
        self.last = self._decide(keys)
        if self.last:
            self.fired.append({"step": self.history[-1]["step"], "keys": list(self.last)})
        return list(self.last)

    def _decide(self, keys: list[str]) -> list[str]:
        if len(self.history) < self.window:
            return []
        if not trend([entry["train"] for entry in self.history]) > self.train_tolerance:  # NaN never fires
            return []
        return [k for k in keys if trend([entry["eval"].get(k, math.nan) for entry in self.history])
                < -self.eval_tolerance]

    def state_dict(self) -> dict[str, Any]:
        """Plain Python (JSON- and ``torch.load(weights_only=True)``-safe): settings check + history."""
        return {"window": self.window, "history": [dict(entry, eval=dict(entry["eval"])) for entry in self.history],
                "fired": [dict(entry, keys=list(entry["keys"])) for entry in self.fired], "last": list(self.last)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["window"]) != self.window:
            raise ValueError(f"RewardHackingAlarm: the saved state has window={state['window']}, this alarm "
                             f"window={self.window}; build the alarm with the run's window")
        self.history = [dict(entry, eval=dict(entry["eval"])) for entry in state["history"]]
        self.fired = [dict(entry, keys=list(entry["keys"])) for entry in state["fired"]]
        self.last = list(state["last"])


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two float64 ``(n,)`` vectors; NaN below 2 rows or with zero spread."""
    if x.numel() < MIN_CORRELATION_ROWS:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    denominator = float(torch.sqrt((dx * dx).sum() * (dy * dy).sum()))
    return float((dx * dy).sum()) / denominator if denominator > 0 else math.nan


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks, ties given their average rank (``scipy.stats.rankdata(method="average")``)."""
    _, inverse, counts = torch.unique(values, sorted=True, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts  # 0-based first rank of each distinct value
    return (starts.double() + (counts.double() + 1) / 2)[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation (Pearson of average ranks) of two ``(n,)`` vectors."""
    return pearson(_average_ranks(x), _average_ranks(y)) if x.numel() >= MIN_CORRELATION_ROWS else math.nan


def part_correlations(scores: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Pairwise correlations of the parts' scores over the same rows.

    Args:
        scores: ``{part name: scores (n,)}`` (any float dtype), rows aligned across parts.

    Returns:
        ``{"pearson/<a>~<b>": r, "spearman/<a>~<b>": rho}`` for every pair in the given order; rows where
        either part is not finite are left out of that pair; NaN when fewer than 2 rows remain or a part
        is constant on them.
    """
    names = list(scores)
    columns = {k: torch.as_tensor(scores[k]).detach().double().reshape(-1).cpu() for k in names}
    out: dict[str, float] = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            keep = torch.isfinite(columns[a]) & torch.isfinite(columns[b])
            x, y = columns[a][keep], columns[b][keep]
            out[f"pearson/{a}~{b}"], out[f"spearman/{a}~{b}"] = pearson(x, y), spearman(x, y)
    return out
