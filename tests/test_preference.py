"""Tests of rewardkit.training.preference: pair labelling policy and the Diffusion-DPO loss."""

from __future__ import annotations

import math

import pytest
import torch

from rewardkit.training.preference import diffusion_dpo_loss, label_pairs, per_sample_mse

NAN = float("nan")
LOSS_ATOL = 1e-6  # float32 arithmetic on values of order 1


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))  # -logsigmoid(-x)


def test_pairs_take_the_best_and_worst_image_of_each_prompt():
    scores = torch.tensor([0.2, 0.9, 0.5, 3.0, 1.0, 2.0])
    prompts = ["cat", "cat", "cat", "dog", "dog", "dog"]
    pairs = label_pairs(scores, prompts)
    assert pairs.prompts == ["cat", "dog"]
    assert pairs.chosen.tolist() == [1, 3] and pairs.rejected.tolist() == [0, 4]
    assert pairs.valid.tolist() == [True, True] and pairs.reasons == {}
    torch.testing.assert_close(pairs.margin, torch.tensor([0.7, 2.0]), atol=1e-6, rtol=0)


def test_groups_may_be_interleaved_and_are_ordered_by_first_appearance():
    pairs = label_pairs(torch.tensor([1.0, 5.0, 2.0, 4.0]), ["b", "a", "b", "a"])
    assert pairs.prompts == ["b", "a"]
    assert pairs.chosen.tolist() == [2, 1] and pairs.rejected.tolist() == [0, 3]


def test_nan_rows_never_win_and_are_left_out_by_default():
    scores = torch.tensor([NAN, 0.1, 0.4, NAN, 0.3])
    pairs = label_pairs(scores, ["p"] * 5)
    assert pairs.chosen.tolist() == [2] and pairs.rejected.tolist() == [1] and pairs.valid.tolist() == [True]
    # even a huge-looking NaN neighbour cannot win, and one scored row is not a pair
    lone = label_pairs(torch.tensor([NAN, 7.0]), ["q", "q"])
    assert lone.chosen.tolist() == [1] and lone.valid.tolist() == [False]
    assert "fewer than two scored rows" in lone.reasons[0] and math.isnan(lone.margin[0].item())


def test_nan_loses_lets_an_unscorable_image_be_rejected():
    pairs = label_pairs(torch.tensor([0.4, NAN, 0.9]), ["p"] * 3, nan_loses=True)
    assert pairs.chosen.tolist() == [2] and pairs.rejected.tolist() == [1]
    assert pairs.valid.tolist() == [True] and math.isnan(pairs.margin[0].item())


def test_all_nan_group_is_invalid():
    pairs = label_pairs(torch.tensor([NAN, NAN, 1.0, 2.0]), ["x", "x", "y", "y"], nan_loses=True)
    assert pairs.valid.tolist() == [False, True] and "all NaN" in pairs.reasons[0]


def test_ties_are_invalid_and_first_of_equal_scores_is_taken():
    pairs = label_pairs(torch.tensor([1.0, 1.0, 0.5, 2.0, 2.0]), ["t", "t", "u", "u", "u"])
    assert pairs.valid.tolist() == [False, True] and "tie" in pairs.reasons[0]
    assert pairs.chosen.tolist() == [0, 3] and pairs.rejected.tolist() == [1, 2]
    margin = label_pairs(torch.tensor([1.0, 1.05]), ["m", "m"], min_margin=0.1)
    assert margin.valid.tolist() == [False]


def test_label_pairs_bad_inputs():
    with pytest.raises(ValueError, match=">= 2 images"):
        label_pairs(torch.tensor([1.0, 2.0, 3.0]), ["a", "a", "b"])
    with pytest.raises(ValueError, match=r"scores \(N,\)"):
        label_pairs(torch.tensor([1.0, 2.0]), ["a"])
    with pytest.raises(ValueError, match=r"scores \(N,\)"):
        label_pairs(torch.ones(2, 1), ["a", "a"])
    with pytest.raises(ValueError, match="min_margin"):
        label_pairs(torch.tensor([1.0, 2.0]), ["a", "a"], min_margin=-1.0)


def test_dpo_loss_hand_computed_paper_convention():
    # pair 0: the model fits the chosen image better than the reference does -> inside = +1
    # pair 1: the model drifts towards the rejected image -> inside = -1
    model_w, model_l = torch.tensor([0.10, 0.40]), torch.tensor([0.30, 0.10])
    ref_w, ref_l = torch.tensor([0.20, 0.30]), torch.tensor([0.20, 0.20])
    out = diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, beta=10.0, convention="paper")
    torch.testing.assert_close(out.inside, torch.tensor([1.0, -1.0]), atol=LOSS_ATOL, rtol=0)
    expected = 0.5 * (_softplus(-1.0) + _softplus(1.0))
    assert abs(out.loss.item() - expected) < LOSS_ATOL
    assert out.implicit_acc.item() == 0.5
    torch.testing.assert_close(out.model_margin, torch.tensor([-0.2, 0.3]), atol=LOSS_ATOL, rtol=0)
    torch.testing.assert_close(out.ref_margin, torch.tensor([0.0, 0.1]), atol=LOSS_ATOL, rtol=0)


def test_conventions_agree_when_diffusers_beta_is_half_the_paper_beta():
    generator = torch.Generator().manual_seed(0)
    errors = [torch.rand(6, generator=generator) for _ in range(4)]
    paper = diffusion_dpo_loss(*errors, beta=5000.0, convention="paper")
    diffusers = diffusion_dpo_loss(*errors, beta=2500.0, convention="diffusers")
    torch.testing.assert_close(paper.inside, diffusers.inside, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(paper.loss, diffusers.loss, atol=1e-4, rtol=1e-5)


def test_model_equal_to_reference_gives_ln2_and_convention_specific_accuracy():
    errors = torch.tensor([0.3, 0.7, 0.2])
    other = torch.tensor([0.5, 0.1, 0.2])
    paper = diffusion_dpo_loss(errors, other, errors, other, beta=5000.0, convention="paper")
    diffusers = diffusion_dpo_loss(errors, other, errors, other, beta=2500.0, convention="diffusers")
    assert abs(paper.loss.item() - math.log(2)) < LOSS_ATOL and abs(diffusers.loss.item() - math.log(2)) < LOSS_ATOL
    assert paper.implicit_acc.item() == 0.0  # SalesforceAIResearch/DiffusionDPO: ties are not correct
    assert diffusers.implicit_acc.item() == 0.5  # diffusers example: ties count one half


def test_mask_averages_over_valid_pairs_and_empty_mask_keeps_the_graph():
    model_w = torch.tensor([0.10, 0.40], requires_grad=True)
    model_l, ref_w, ref_l = torch.tensor([0.30, 0.10]), torch.tensor([0.20, 0.30]), torch.tensor([0.20, 0.20])
    only_first = diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, beta=10.0, mask=torch.tensor([True, False]))
    assert abs(only_first.loss.item() - _softplus(-1.0)) < LOSS_ATOL and only_first.implicit_acc.item() == 1.0
    empty = diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, beta=10.0, mask=torch.tensor([False, False]))
    assert empty.loss.item() == 0.0 and math.isnan(empty.implicit_acc.item())
    empty.loss.backward()
    assert model_w.grad is not None and torch.equal(model_w.grad, torch.zeros(2))


def test_gradient_lowers_the_chosen_error_and_never_reaches_the_reference():
    model_w = torch.tensor([0.2], requires_grad=True)
    model_l = torch.tensor([0.2], requires_grad=True)
    ref_w = torch.tensor([0.2], requires_grad=True)
    ref_l = torch.tensor([0.2])
    diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, beta=100.0).loss.backward()
    assert model_w.grad.item() > 0 and model_l.grad.item() < 0  # descent lowers m_w and raises m_l
    assert ref_w.grad is None


def test_per_sample_mse():
    pred = torch.zeros(2, 4, 3, 3)
    target = torch.cat([torch.ones(1, 4, 3, 3), torch.full((1, 4, 3, 3), 2.0)]).half()
    result = per_sample_mse(pred, target)
    assert result.dtype == torch.float32 and result.tolist() == [1.0, 4.0]
    with pytest.raises(ValueError, match="share a"):
        per_sample_mse(pred, target[:1])


def test_dpo_loss_bad_inputs():
    a = torch.rand(3)
    with pytest.raises(ValueError, match=r"must all be \(P,\)"):
        diffusion_dpo_loss(a, a[:2], a, a, beta=1.0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        diffusion_dpo_loss(a, a, a, a, beta=0.0)
    with pytest.raises(ValueError, match="convention"):
        diffusion_dpo_loss(a, a, a, a, beta=1.0, convention="ipo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mask must be bool"):
        diffusion_dpo_loss(a, a, a, a, beta=1.0, mask=torch.ones(3))
