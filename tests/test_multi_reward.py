"""multi_reward_advantages: hand-checked cases, and each aggregation against a reproduction of its upstream.

Reproductions written from (read, not copied):

* MixGRPO: Tencent-Hunyuan/MixGRPO ``fastvideo/train_grpo_flux.py`` at e5cdd6a (L429-L481: contiguous groups of
  ``num_generations`` rows, ``torch.std`` + 1e-8; weights divided by their sum in ``main``, L765-L767).
* GDPO: NVlabs/GDPO ``trl-GDPO/trl-0.18.0-gdpo/trl/trainer/grpo_trainer.py`` at 41f74c5 (group ``view(-1, G)``
  mean / ``std`` + 1e-4 per reward, weighted ``nansum``, batch mean / ``std`` + 1e-4).
* Pref-GRPO: CodeGoat24/Pref-GRPO ``fastvideo/rewards/dispatcher.py`` ``compute_weighted_advantages`` at 3e787f6
  (``use_group``: per reward ``std`` + 1e-8, weighted sum; ``apply_gdpo``: batch mean / ``std`` + 1e-8).
* flow_grpo: yifan123/flow_grpo ``flow_grpo/rewards.py`` ``multi_score`` (weighted sum of raw scores) then
  ``stat_tracking.py`` (population std + 1e-4; ``global_std`` = std of the whole batch).
"""

from __future__ import annotations

import math

import pytest
import torch

from rewardkit.training.multi_reward import multi_reward_advantages

G = 4  # images per prompt
PROMPTS = [p for p in ("cat", "dog", "owl") for _ in range(G)]  # contiguous groups, as the upstream samplers


def _rewards(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"pickscore": 20 + 2 * torch.randn(12, generator=gen, dtype=torch.float64),
            "ocr": torch.rand(12, generator=gen, dtype=torch.float64),
            "aesthetic": 5 + torch.randn(12, generator=gen, dtype=torch.float64)}


def _group_z(values: torch.Tensor, eps: float, unbiased: bool = True) -> torch.Tensor:
    """Upstream's loop over contiguous groups of G rows (torch.std is unbiased)."""
    out = torch.zeros_like(values)
    for start in range(0, len(values), G):
        group = values[start:start + G]
        out[start:start + G] = (group - group.mean()) / (group.std(unbiased=unbiased) + eps)
    return out


def test_hand_checked_two_rewards_one_group() -> None:
    rewards = {"a": torch.tensor([0.0, 2.0]), "b": torch.tensor([10.0, 0.0])}
    common = dict(std="group", eps=0.0)
    # reward_aggr: sums 10 and 2 -> mean 6, population std 4 -> (+1, -1)
    got = multi_reward_advantages(rewards, ["p", "p"], aggregation="reward_aggr", **common)
    torch.testing.assert_close(got, torch.tensor([1.0, -1.0]))
    # advantage_aggr: a -> (-1, +1), b -> (+1, -1); weights 3 and 1 -> (-2, +2)
    got = multi_reward_advantages(rewards, ["p", "p"], {"a": 3.0, "b": 1.0}, aggregation="advantage_aggr", **common)
    torch.testing.assert_close(got, torch.tensor([-2.0, 2.0]))
    # gdpo: the same sum, batch-normalised (population std 2) -> (-1, +1)
    got = multi_reward_advantages(rewards, ["p", "p"], {"a": 3.0, "b": 1.0}, aggregation="gdpo", batch_unbiased=False,
                                  batch_eps=0.0, **common)
    torch.testing.assert_close(got, torch.tensor([-1.0, 1.0]))


def test_advantage_aggr_equals_mixgrpo_with_normalised_weights() -> None:
    rewards, weights = _rewards(), {"pickscore": 2.0, "ocr": 1.0, "aesthetic": 1.0}
    total = sum(weights.values())
    expected = sum(_group_z(rewards[k], 1e-8) * (w / total) for k, w in weights.items())
    got = multi_reward_advantages(rewards, PROMPTS, weights, aggregation="advantage_aggr", unbiased=True, eps=1e-8,
                                  normalize_weights=True)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_reward_aggr_equals_mixgrpo_and_flow_grpo() -> None:
    rewards, weights = _rewards(1), {"pickscore": 1 / 26, "ocr": 1.0, "aesthetic": 0.5}
    summed = sum(rewards[k] * w for k, w in weights.items())
    mix = multi_reward_advantages(rewards, PROMPTS, weights, aggregation="reward_aggr", unbiased=True, eps=1e-8)
    torch.testing.assert_close(mix, _group_z(summed, 1e-8), rtol=1e-12, atol=1e-12)
    flow = multi_reward_advantages(rewards, PROMPTS, weights, aggregation="reward_aggr", std="global")
    means = summed.view(-1, G).mean(dim=1).repeat_interleave(G)
    torch.testing.assert_close(flow, (summed - means) / (summed.std(unbiased=False) + 1e-4), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eps", [1e-4, 1e-8])  # NVlabs GDPO, Pref-GRPO --apply_gdpo
def test_gdpo_equals_the_reference_implementations(eps: float) -> None:
    rewards, weights = _rewards(2), {"pickscore": 1.0, "ocr": 2.0, "aesthetic": 0.5}
    table = torch.stack(list(rewards.values()), dim=1)
    grouped = table.view(-1, G, 3)
    per_reward = (table - grouped.mean(1).repeat_interleave(G, 0)) / (grouped.std(1).repeat_interleave(G, 0) + eps)
    pre = (per_reward * torch.tensor(list(weights.values()), dtype=torch.float64)).nansum(dim=1)
    expected = (pre - pre.mean()) / (pre.std() + eps)
    got = multi_reward_advantages(rewards, PROMPTS, weights, aggregation="gdpo", unbiased=True, eps=eps,
                                  batch_eps=eps)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert abs(float(got.mean())) < 1e-12 and abs(float(got.std()) - 1) < 1e-3  # batch-normalised (up to eps)


def test_gdpo_keeps_combinations_that_reward_aggr_collapses() -> None:
    """GDPO's motivating case (arXiv 2601.05242 §3): two binary rewards, two rollouts per prompt. Totals (0, 1) in
    one group and (0, 2) in another normalise to the same (-1, +1) when summed first; decoupled, they differ."""
    rewards = {"format": torch.tensor([0.0, 0.0, 0.0, 1.0]), "correct": torch.tensor([0.0, 1.0, 0.0, 1.0])}
    prompts = ["q1", "q1", "q2", "q2"]
    close = dict(rtol=0, atol=1e-3)  # eps = 1e-4 (it also keeps q1's zero-std "format" at 0 instead of 0/0)
    summed = multi_reward_advantages(rewards, prompts, aggregation="reward_aggr")
    torch.testing.assert_close(summed, torch.tensor([-1.0, 1.0, -1.0, 1.0]), **close)
    decoupled = multi_reward_advantages(rewards, prompts, aggregation="advantage_aggr")
    torch.testing.assert_close(decoupled, torch.tensor([-1.0, 1.0, -2.0, 2.0]), **close)
    gdpo = multi_reward_advantages(rewards, prompts, aggregation="gdpo", batch_unbiased=False)
    torch.testing.assert_close(gdpo, decoupled / decoupled.std(unbiased=False), **close)


def test_nan_policies() -> None:
    rewards = {"a": torch.tensor([1.0, 2.0, 3.0, float("nan")]), "b": torch.tensor([1.0, 1.0, 4.0, 2.0])}
    propagated = multi_reward_advantages(rewards, ["p"] * 4, aggregation="advantage_aggr")
    assert math.isnan(propagated[3]) and torch.isfinite(propagated[:3]).all()
    skipped = multi_reward_advantages(rewards, ["p"] * 4, aggregation="advantage_aggr", nan="skip")
    b_only = multi_reward_advantages({"b": rewards["b"]}, ["p"] * 4, aggregation="advantage_aggr")
    torch.testing.assert_close(skipped[3], b_only[3])  # row 3 keeps its b term only
    both_nan = {"a": torch.tensor([float("nan"), 1.0]), "b": torch.tensor([float("nan"), 2.0])}
    assert math.isnan(multi_reward_advantages(both_nan, ["p", "p"], nan="skip")[0])


def test_bad_inputs_raise() -> None:
    rewards = {"a": torch.ones(2)}
    with pytest.raises(ValueError, match="aggregation must be"):
        multi_reward_advantages(rewards, ["p", "p"], aggregation="sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one weight per reward"):
        multi_reward_advantages(rewards, ["p", "p"], {"b": 1.0})
    with pytest.raises(ValueError, match=r"must be a \(B,\) tensor"):
        multi_reward_advantages({"a": torch.ones(3)}, ["p", "p"])
    with pytest.raises(ValueError, match="non-zero sum"):
        multi_reward_advantages(rewards, ["p", "p"], {"a": 0.0}, normalize_weights=True)
    with pytest.raises(ValueError, match="rewards is empty"):
        multi_reward_advantages({}, [])
