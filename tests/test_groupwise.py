"""pairwise_win_rates with deterministic toy judges, and the unified-reward-edit adapter on a scripted backend.

The expected win rates follow Pref-GRPO's ``_pairwise_win_rate`` (CodeGoat24/Pref-GRPO
``fastvideo/rewards/unifiedreward_think.py`` at 3e787f6: all ``itertools.combinations`` pairs of a group, a win
counts 1, a tie 0.5 to each, rate = wins / comparisons), re-derived by hand below; failed pairs are excluded and
counted instead of Pref-GRPO's 0.5.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import rewardkit as rk
from rewardkit.training.groupwise import edit_pairwise_judge, pairwise_win_rates
from rewardkit.vlm.requests import Completion

BROKEN = 0.0  # images whose first pixel is exactly 0 cannot be judged by the toy judge


def _images(levels: list[float]) -> torch.Tensor:
    """One flat image per level (brightness = level), first pixel set to the level too."""
    return torch.tensor(levels).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).clone()


def brightness_judge(images_a: torch.Tensor, images_b: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """1 if the first image is brighter, 0 if darker, 0.5 if equal, NaN if either is 'broken'."""
    a, b = images_a.mean(dim=(1, 2, 3)), images_b.mean(dim=(1, 2, 3))
    pref = torch.where(a > b, 1.0, torch.where(a < b, 0.0, 0.5))
    broken = (images_a[:, 0, 0, 0] == BROKEN) | (images_b[:, 0, 0, 0] == BROKEN)
    return torch.where(broken, torch.nan, pref)


def test_hand_checked_group_with_a_tie() -> None:
    # one group: 0.2, 0.6, 0.6, 0.9 -> pairs (6): the two 0.6 images tie once
    out = pairwise_win_rates(_images([0.2, 0.6, 0.6, 0.9]), ["p"] * 4, brightness_judge)
    torch.testing.assert_close(out.scores, torch.tensor([0.0, 1.5 / 3, 1.5 / 3, 1.0]))
    assert out.details["n_pairs"].tolist() == [3, 3, 3, 3] and out.details["n_ties"].tolist() == [0, 1, 1, 0]
    assert out.details["n_failed"].tolist() == [0, 0, 0, 0] and out.details["failure"] == [None] * 4


def test_equals_a_pref_grpo_style_count_when_nothing_fails() -> None:
    levels = [0.3, 0.5, 0.5, 0.8, 0.1, 0.7, 0.7, 0.7, 0.4]
    prompts = ["a", "b", "a", "b", "a", "b", "c", "c", "a"]  # interleaved groups; "c" is a 2-way tie
    out = pairwise_win_rates(_images(levels), prompts, brightness_judge)
    wins, compared = [0.0] * 9, [0] * 9
    for prompt in dict.fromkeys(prompts):
        rows = [i for i, p in enumerate(prompts) if p == prompt]
        for i, j in itertools.combinations(rows, 2):
            compared[i] += 1
            compared[j] += 1
            if levels[i] > levels[j]:
                wins[i] += 1
            elif levels[j] > levels[i]:
                wins[j] += 1
            else:
                wins[i] += 0.5
                wins[j] += 0.5
    torch.testing.assert_close(out.scores, torch.tensor([w / c for w, c in zip(wins, compared)]))
    chunked = pairwise_win_rates(_images(levels), prompts, brightness_judge, pairs_per_call=2)
    torch.testing.assert_close(chunked.scores, out.scores)


def test_failed_pairs_are_counted_not_ties_and_all_failed_is_nan() -> None:
    # group "p": 0.4, BROKEN, 0.8 -> only (0.4, 0.8) is judged; group "q": BROKEN, 0.5 -> nothing judged; "r": alone
    levels = [0.4, BROKEN, 0.8, BROKEN, 0.5, 0.6]
    out = pairwise_win_rates(_images(levels), ["p", "p", "p", "q", "q", "r"], brightness_judge)
    assert out.scores[0].item() == 0.0 and out.scores[2].item() == 1.0  # 1 judged pair each, not 0.5-diluted
    assert all(math.isnan(out.scores[k].item()) for k in (1, 3, 4, 5))
    assert out.details["n_pairs"].tolist() == [2, 2, 2, 1, 1, 0]
    assert out.details["n_failed"].tolist() == [1, 2, 1, 1, 1, 0]
    assert out.details["failure"][1].startswith("all 2 pairs failed") and out.details["failure"][0] is None
    assert out.details["failure"][5] == "alone in its group: no pair to compare"


def test_soft_preferences_lists_with_none_and_group_ids() -> None:
    calls = []

    def soft(images_a, images_b, prompts):
        calls.append(len(prompts))
        return [0.75 if k == 0 else None for k in range(len(prompts))]

    out = pairwise_win_rates(_images([0.1, 0.2, 0.3]), "same prompt", soft, group_ids=[0, 0, 0])
    # pairs (0,1): 0.75; (0,2), (1,2): failed -> image 0: 0.75/1, image 1: 0.25/1, image 2: NaN
    assert out.scores[:2].tolist() == [0.75, 0.25] and math.isnan(out.scores[2]) and calls == [3]


def test_bad_judge_answers_and_inputs_raise() -> None:
    images = _images([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="outside"):
        pairwise_win_rates(images, ["p"] * 3, lambda a, b, p: torch.full((len(p),), 2.0))
    with pytest.raises(ValueError, match="one preference per pair"):
        pairwise_win_rates(images, ["p"] * 3, lambda a, b, p: torch.zeros(1))
    with pytest.raises(ValueError, match="one prompt and group id per image"):
        pairwise_win_rates(images, ["p"] * 2, brightness_judge)
    with pytest.raises(ValueError, match="equal within each group"):
        pairwise_win_rates(images, ["p"] * 3, brightness_judge, source=_images([0.1, 0.1, 0.9]))


class _ScriptedBackend:
    """Answers each request with the next scripted text (None = a failed generation)."""

    def __init__(self, answers: list[str | None]) -> None:
        self.answers, self.requests = list(answers), []

    def generate(self, requests):
        self.requests.extend(requests)
        return [Completion(t, None if t is not None else "timeout") for t in (self.answers.pop(0) for _ in requests)]


def test_unified_reward_edit_adapter_turns_rank_answers_into_win_rates() -> None:
    # 3 edits of one source: pairs (0,1), (0,2), (1,2) answered: image 1 wins, image 2 wins, unparseable
    backend = _ScriptedBackend(["Image 1 is better", "Image 2 is better", "I cannot tell"])
    judge = edit_pairwise_judge(rk.load("unified-reward-edit", backend=backend))
    edits, source = _images([0.2, 0.5, 0.7]), _images([0.3, 0.3, 0.3])
    out = pairwise_win_rates(edits, ["make it red"] * 3, judge, source=source)
    # image 0: won (0,1), lost (0,2) -> 0.5; image 1: lost (0,1), (1,2) failed -> 0.0; image 2: won (0,2) -> 1.0
    assert out.scores.tolist() == [0.5, 0.0, 1.0]
    assert out.details["n_failed"].tolist() == [0, 1, 1] and len(backend.requests) == 3
    assert len(backend.requests[0].messages[0]["content"]) == 4  # [source, edit a, edit b, instruction]
    with pytest.raises(TypeError, match="unified-reward-edit"):
        edit_pairwise_judge(brightness_judge)


def test_judge_reasons_reach_the_failure_details() -> None:
    from rewardkit.protocols import RewardOutput

    def failing(images_a, images_b, prompts):
        n = len(prompts)
        return RewardOutput(torch.full((n,), float("nan")), {"failure": ["no verdict in the answer"] * n})

    out = pairwise_win_rates(_images([0.2, 0.4]), ["p", "p"], failing)
    assert out.details["failure"] == ["all 1 pairs failed (no verdict in the answer)"] * 2
    assert out.scores.isnan().all() and out.details["n_failed"].tolist() == [1, 1]
