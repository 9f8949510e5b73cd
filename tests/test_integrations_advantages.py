"""Group-relative advantages: hand-computed values, NaN rows, options, and two processes = one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rewardkit.training.advantages import group_advantages, per_prompt_advantages

SCORES = [1.0, 2.0, 3.0, 10.0, 20.0, float("nan"), 4.0, 30.0]
PROMPTS = ["a", "a", "a", "b", "b", "b", "a", "b"]


def _reference(std: str) -> list[float]:
    """One batch's group statistics with numpy (population std), NaN rows excluded. No history: this equals
    flow_grpo's tracker cleared after every update, not ddpo-pytorch's (tests/test_trackers.py covers those)."""
    scores, prompts = np.array(SCORES), np.array(PROMPTS)
    finite_all = scores[np.isfinite(scores)]
    out = np.full_like(scores, np.nan)
    for prompt in ("a", "b"):
        rows = prompts == prompt
        group = scores[rows][np.isfinite(scores[rows])]
        scale = {"group": np.std(group), "global": np.std(finite_all), "none": None}[std]
        centred = scores[rows] - np.mean(group)
        out[rows] = centred if scale is None else centred / (scale + 1e-4)
    return out.tolist()


@pytest.mark.parametrize("std", ["group", "global", "none"])
def test_advantages_equal_the_numpy_reference(std: str) -> None:
    ours = per_prompt_advantages(torch.tensor(SCORES), PROMPTS, std=std)
    np.testing.assert_allclose(ours.numpy(), _reference(std), rtol=1e-6)
    assert math.isnan(ours[5])


def test_group_advantages_is_the_single_process_computation() -> None:
    for std in ("group", "global", "none"):
        torch.testing.assert_close(group_advantages(torch.tensor(SCORES), PROMPTS, std=std),
                                   per_prompt_advantages(torch.tensor(SCORES), PROMPTS, std=std), equal_nan=True)
    with pytest.raises(ValueError, match="N prompts"):
        group_advantages(torch.ones(2), ["a"])


def test_unbiased_std_and_clipping() -> None:
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ours = per_prompt_advantages(scores, ["p"] * 4, unbiased=True)
    torch.testing.assert_close(ours, (scores - 2.5) / (scores.std() + 1e-4))  # TRL: torch.std
    clipped = per_prompt_advantages(scores, ["p"] * 4, clip=1.0)
    assert clipped.abs().max() <= 1.0


def test_single_member_group_gets_zero_and_bad_input_raises() -> None:
    assert per_prompt_advantages(torch.tensor([5.0]), ["only"]).item() == 0.0
    with pytest.raises(ValueError, match="B prompts"):
        per_prompt_advantages(torch.tensor([1.0, 2.0]), ["a"])
    with pytest.raises(ValueError, match="std must be"):
        per_prompt_advantages(torch.tensor([1.0]), ["a"], std="batch")  # type: ignore[arg-type]


def test_two_processes_with_uneven_batches_equal_one_process(run_two_processes) -> None:
    ranks = run_two_processes("advantages_worker.py", 29514)
    for std in ("group", "global", "none"):
        combined = ranks[0][std] + ranks[1][std]
        single = per_prompt_advantages(torch.tensor(SCORES), PROMPTS, std=std).tolist()
        np.testing.assert_allclose(combined, single, rtol=1e-6)
