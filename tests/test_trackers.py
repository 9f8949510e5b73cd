"""PerPromptStatTracker: each style equals a numpy reproduction of its upstream tracker over several batches.

Upstream sources the reproductions below were written from (read, not copied):

* ddpo style: kvablack/ddpo-pytorch ``ddpo_pytorch/stat_tracking.py`` at commit 1ce0994 (unchanged at HEAD
  1958463f), identical to trl v0.23.1 ``trl/trainer/utils.py`` ``PerPromptStatTracker`` (lines 548-586).
* flow_grpo style: yifan123/flow_grpo ``flow_grpo/stat_tracking.py`` at HEAD ac4c86e8 (``type='grpo'``), with
  ``clear()`` after every update as ``scripts/train_sd3.py`` (L755-L780) calls it.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch

from rewardkit.training.advantages import per_prompt_advantages
from rewardkit.training.trackers import PerPromptStatTracker


class _DdpoUpstream:
    """ddpo-pytorch / trl 0.23 rule: per-prompt deque(maxlen=buffer_size) extended first; below min_count
    stored values the whole batch's mean and np.std are used; divide by std + 1e-6."""

    def __init__(self, buffer_size: int, min_count: int) -> None:
        self.buffer_size, self.min_count, self.stats = buffer_size, min_count, {}

    def update(self, prompts, rewards):
        prompts, rewards = np.array(prompts), np.array(rewards)
        out = np.empty_like(rewards)
        for prompt in np.unique(prompts):
            mine = rewards[prompts == prompt]
            self.stats.setdefault(prompt, deque(maxlen=self.buffer_size)).extend(mine)
            source = rewards if len(self.stats[prompt]) < self.min_count else self.stats[prompt]
            out[prompts == prompt] = (mine - np.mean(source)) / (np.std(source) + 1e-6)
        return out


class _FlowGrpoUpstream:
    """flow_grpo rule: every reward of a prompt stored (as a list, stacked during update); mean over the
    stored values; std over them or, with global_std, over all rewards of this update; divide by std + 1e-4."""

    def __init__(self, global_std: bool) -> None:
        self.global_std, self.stats = global_std, {}

    def update(self, prompts, rewards):
        prompts, rewards = np.array(prompts), np.array(rewards, dtype=np.float64)
        out = np.empty_like(rewards) * 0.0
        for prompt in np.unique(prompts):
            self.stats.setdefault(prompt, []).extend(rewards[prompts == prompt])
        for prompt in np.unique(prompts):
            self.stats[prompt] = np.stack(self.stats[prompt])
            mine = rewards[prompts == prompt]
            mean = np.mean(self.stats[prompt], axis=0, keepdims=True)
            spread = rewards if self.global_std else self.stats[prompt]
            out[prompts == prompt] = (mine - mean) / (np.std(spread, axis=0, keepdims=True) + 1e-4)
        return out

    def clear(self):
        self.stats = {}


def _batches(n_batches: int, seed: int = 0, group: int = 4, n_prompts: int = 3, pool: int = 5):
    """Batches of ``n_prompts`` groups drawn from a pool of ``pool`` prompts (so prompts recur: history matters)."""
    rng = np.random.default_rng(seed)
    for _ in range(n_batches):
        chosen = rng.choice(pool, size=n_prompts, replace=False)
        prompts = [f"prompt {k}" for k in chosen for _ in range(group)]
        offsets = np.repeat(chosen.astype(np.float64), group)  # prompt-dependent level, as real rewards have
        yield prompts, offsets + rng.normal(size=len(prompts))


@pytest.mark.parametrize("buffer_size, min_count", [(16, 16), (6, 4), (3, 8), (10, 0)])
def test_ddpo_style_equals_upstream_over_many_batches(buffer_size: int, min_count: int) -> None:
    ours, upstream = PerPromptStatTracker("ddpo", buffer_size=buffer_size, min_count=min_count), \
        _DdpoUpstream(buffer_size, min_count)
    for prompts, rewards in _batches(8):
        got = ours.update(prompts, torch.tensor(rewards))
        assert got.dtype == torch.float64
        np.testing.assert_array_equal(got.numpy(), upstream.update(prompts, rewards))  # bit-identical
    assert {p: list(v) for p, v in ours._history.items()} == {p: list(v) for p, v in upstream.stats.items()}


@pytest.mark.parametrize("global_std", [False, True])
def test_flow_grpo_style_equals_upstream_with_clear_after_each_update(global_std: bool) -> None:
    ours, upstream = PerPromptStatTracker("flow_grpo", global_std=global_std), _FlowGrpoUpstream(global_std)
    for prompts, rewards in _batches(6, seed=1):
        np.testing.assert_array_equal(ours.update(prompts, rewards).numpy(), upstream.update(prompts, rewards))
        ours.clear()
        upstream.clear()
    assert ours.num_prompts_seen == 5


@pytest.mark.parametrize("global_std", [False, True])
def test_flow_grpo_style_history_spans_updates_until_clear(global_std: bool) -> None:
    """Without clear(), distinct prompts per update work upstream too; a recurring prompt uses its history."""
    ours, upstream = PerPromptStatTracker("flow_grpo", global_std=global_std), _FlowGrpoUpstream(global_std)
    first = (["a"] * 3 + ["b"] * 3, np.array([1.0, 2.0, 4.0, 10.0, 11.0, 15.0]))
    second = (["c"] * 3, np.array([0.5, 0.0, -1.0]))
    for prompts, rewards in (first, second):  # no recurring prompt: upstream runs without clear()
        np.testing.assert_array_equal(ours.update(prompts, rewards).numpy(), upstream.update(prompts, rewards))
    again = ours.update(["a", "a"], [3.0, 5.0])  # upstream would raise here (its history became an ndarray)
    history = np.array([1.0, 2.0, 4.0, 3.0, 5.0])
    spread = np.std([3.0, 5.0]) if global_std else np.std(history)
    np.testing.assert_allclose(again.numpy(), (np.array([3.0, 5.0]) - history.mean()) / (spread + 1e-4), rtol=1e-15)


def test_stateless_function_differs_from_the_ddpo_tracker_after_the_first_batch() -> None:
    """The issue: per_prompt_advantages(std='group') keeps no history, so a recurring prompt's advantages differ."""
    tracker = PerPromptStatTracker("ddpo", buffer_size=16, min_count=2)
    batches = [(["p"] * 4, [0.0, 1.0, 2.0, 3.0]), (["p"] * 4, [10.0, 11.0, 12.0, 13.0])]
    tracked = [tracker.update(p, torch.tensor(r, dtype=torch.float64)) for p, r in batches]
    stateless = [per_prompt_advantages(torch.tensor(r, dtype=torch.float64), p, eps=1e-6) for p, r in batches]
    torch.testing.assert_close(tracked[0], stateless[0])
    assert (tracked[1] - stateless[1]).abs().max() > 0.5  # history: mean 6.5 over 8 values, not 11.5


def test_ddpo_falls_back_to_batch_statistics_below_min_count() -> None:
    tracker = PerPromptStatTracker("ddpo", buffer_size=16, min_count=3)
    rewards = np.array([1.0, 3.0, 10.0, 20.0, 30.0])
    got = tracker.update(["a", "a", "b", "b", "b"], rewards).numpy()
    batch = (rewards[:2] - rewards.mean()) / (rewards.std() + 1e-6)  # "a" has 2 < 3 values: batch stats
    own = (rewards[2:] - 20.0) / (np.std([10.0, 20.0, 30.0]) + 1e-6)
    np.testing.assert_allclose(got, np.concatenate([batch, own]), rtol=1e-15)


def test_nan_rewards_are_not_stored_and_get_nan() -> None:
    tracker = PerPromptStatTracker("flow_grpo")
    got = tracker.update(["a", "a", "a"], torch.tensor([1.0, float("nan"), 3.0]))
    assert torch.isnan(got[1]) and torch.allclose(got[[0, 2]], torch.tensor([-1.0, 1.0]) / (1 + 1e-4))
    assert tracker.get_stats()["a"]["count"] == 2 and got.dtype == torch.float32


def test_state_dict_round_trips_through_weights_only_load(tmp_path) -> None:
    tracker = PerPromptStatTracker("ddpo", buffer_size=4, min_count=2)
    batches = list(_batches(4, seed=3))
    for prompts, rewards in batches[:2]:
        tracker.update(prompts, rewards)
    torch.save(tracker.state_dict(), tmp_path / "tracker.pt")
    restored = PerPromptStatTracker("ddpo", buffer_size=4, min_count=2)
    restored.load_state_dict(torch.load(tmp_path / "tracker.pt", weights_only=True))
    for prompts, rewards in batches[2:]:  # resumed and uninterrupted trackers continue identically
        torch.testing.assert_close(restored.update(prompts, rewards), tracker.update(prompts, rewards), rtol=0, atol=0)
    with pytest.raises(ValueError, match="differ from this tracker"):
        PerPromptStatTracker("ddpo").load_state_dict(tracker.state_dict())


def test_bad_options_and_inputs_raise() -> None:
    with pytest.raises(ValueError, match="style must be"):
        PerPromptStatTracker("trl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ddpo options"):
        PerPromptStatTracker("flow_grpo", buffer_size=8)
    with pytest.raises(ValueError, match="flow_grpo option"):
        PerPromptStatTracker("ddpo", global_std=True)
    with pytest.raises(ValueError, match="buffer_size >= 1"):
        PerPromptStatTracker("ddpo", buffer_size=0)
    tracker = PerPromptStatTracker()
    with pytest.raises(ValueError, match="one reward per prompt"):
        tracker.update(["a", "b"], [1.0])
    with pytest.raises(TypeError, match="must be strings"):
        tracker.update([1, 2], [1.0, 2.0])


def test_two_processes_update_identically_and_equal_one_process(run_two_processes) -> None:
    """Gather first, then the same update on every rank: equal states on both ranks, and the rows equal one
    process fed the concatenated batch (uneven 5 + 7 rows; several batches so history matters)."""
    ranks = run_two_processes("trackers_worker.py", 29517)
    for style, options in (("ddpo", {"buffer_size": 6, "min_count": 4}), ("flow_grpo", {})):
        rank0, rank1 = (r[style] for r in ranks)
        assert rank0["state"] == rank1["state"]
        single = PerPromptStatTracker(style, **options)
        for step, (prompts, rewards) in enumerate(_batches(4, seed=7)):
            expected = single.update(prompts, rewards).tolist()
            np.testing.assert_array_equal(rank0["advantages"][step] + rank1["advantages"][step], expected)


def test_tracker_for_maps_the_recipe_config_and_refuses_impossible_pairs() -> None:
    from rewardkit.training.trackers import tracker_for

    assert tracker_for("none", "none") is None
    ddpo = tracker_for("ddpo", "group", buffer_size=4, min_count=2)
    assert (ddpo.style, ddpo.buffer_size, ddpo.min_count) == ("ddpo", 4, 2)
    assert tracker_for("flow_grpo", "global").global_std and not tracker_for("flow_grpo", "group").global_std
    with pytest.raises(ValueError, match="advantage_std must be 'group'"):
        tracker_for("ddpo", "global")
    with pytest.raises(ValueError, match="'group' or 'global'"):
        tracker_for("flow_grpo", "none")
    with pytest.raises(ValueError, match="advantage_tracker must be"):
        tracker_for("trl", "group")
