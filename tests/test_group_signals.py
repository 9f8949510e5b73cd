"""group_signals and part_correlations: hand-checked values, flow_grpo's definition, NaN handling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rewardkit.training.group_signals import group_signals, part_correlations


def _flow_grpo_signals(prompts: list[str], rewards: np.ndarray) -> tuple[float, float]:
    """yifan123/flow_grpo scripts/train_sd3.py calculate_zero_std_ratio (HEAD ac4c86e), re-derived: group by
    np.unique, population np.std per group, ratio of groups whose std == 0, and the mean of the stds."""
    stds = np.array([np.std(rewards[np.array(prompts) == p]) for p in np.unique(prompts)])
    return float(np.count_nonzero(stds == 0) / len(stds)), float(stds.mean())


def test_hand_checked_values() -> None:
    scores = torch.tensor([1.0, 1.0, 2.0, 4.0, 5.0, 5.0])
    signals = group_signals(scores, ["a", "a", "b", "b", "c", "c"])
    assert signals.zero_std_ratio == pytest.approx(2 / 3) and signals.group_std_mean == pytest.approx(1 / 3)
    assert signals.num_groups == 3 and signals.num_unscored_groups == 0
    assert signals.as_metrics() == {"train/zero_std_ratio": pytest.approx(2 / 3),
                                    "train/group_std_mean": pytest.approx(1 / 3)}


def test_equals_flow_grpo_on_random_groups() -> None:
    rng = np.random.default_rng(0)
    prompts = [f"p{k}" for k in rng.integers(0, 6, size=40)]
    rewards = rng.integers(0, 3, size=40).astype(np.float64) / 4  # ties are frequent; quarters are exact
    ratio, std_mean = _flow_grpo_signals(prompts, rewards)
    signals = group_signals(torch.tensor(rewards), prompts)
    assert signals.zero_std_ratio == ratio and signals.group_std_mean == pytest.approx(std_mean, rel=1e-12)


def test_equal_groups_count_even_where_numpy_std_is_not_zero() -> None:
    assert np.std([0.1] * 3) != 0  # flow_grpo's test would miss this group
    assert group_signals(torch.tensor([0.1] * 3, dtype=torch.float64), ["p"] * 3).zero_std_ratio == 1.0
    assert group_signals(torch.tensor([0.0, 1e-9]), ["p"] * 2, atol=1e-6).zero_std_ratio == 1.0


def test_nan_rows_and_unscored_groups() -> None:
    nan = float("nan")
    signals = group_signals(torch.tensor([1.0, nan, 3.0, nan, nan]), ["a", "a", "a", "b", "b"])
    assert signals.num_groups == 1 and signals.num_unscored_groups == 1 and signals.zero_std_ratio == 0.0
    assert signals.group_std_mean == pytest.approx(1.0)
    empty = group_signals(torch.tensor([nan]), ["a"])
    assert math.isnan(empty.zero_std_ratio) and math.isnan(empty.group_std_mean)
    with pytest.raises(ValueError, match="N prompts"):
        group_signals(torch.ones(2), ["a"])


def test_part_correlations() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    got = part_correlations({"a": x, "b": 2 * x + 1, "c": -x, "d": torch.ones(4)}, prefix="train/part_corr/")
    assert got["train/part_corr/a_vs_b"] == pytest.approx(1.0) and got["train/part_corr/a_vs_c"] == pytest.approx(-1.0)
    assert math.isnan(got["train/part_corr/a_vs_d"])  # a constant part: undefined, not 0
    y = torch.tensor([2.0, 1.0, 4.0, float("nan")])
    assert part_correlations({"x": x, "y": y})["x_vs_y"] == pytest.approx(np.corrcoef([1, 2, 3], [2, 1, 4])[0, 1])
    assert part_correlations({"only": x}) == {}
    with pytest.raises(ValueError, match="same N"):
        part_correlations({"a": x, "b": torch.ones(3)})


def test_advantages_with_signals_is_tracker_or_stateless_plus_signals() -> None:
    from rewardkit.training.advantages import group_advantages
    from rewardkit.training.group_signals import advantages_with_signals
    from rewardkit.training.trackers import PerPromptStatTracker

    scores, prompts = torch.tensor([1.0, 3.0, 2.0, 2.0]), ["a", "a", "b", "b"]
    parts = {"x": torch.tensor([1.0, 2.0, 3.0, 4.0]), "y": torch.tensor([4.0, 3.0, 2.0, 1.0])}
    stateless, metrics = advantages_with_signals(scores, prompts, parts, tracker=None, std="group", clip=0.5)
    torch.testing.assert_close(stateless, group_advantages(scores, prompts).clamp(-0.5, 0.5))
    assert metrics == {"train/zero_std_ratio": 0.5, "train/group_std_mean": 0.5,
                       "train/part_corr/x_vs_y": pytest.approx(-1.0)}
    tracked, _ = advantages_with_signals(scores, prompts, {}, tracker=PerPromptStatTracker("ddpo", min_count=1))
    expected = PerPromptStatTracker("ddpo", min_count=1).update(prompts, scores.double()).float()
    torch.testing.assert_close(tracked, expected)
