"""Weighted composition: weights, normalisation modes (hand-computed), NaN policies, state, gradients."""

from __future__ import annotations

import pickle

import pytest
import torch

import rewardkit as rk
import rewardkit.testing as rkt
from rewardkit.compose import ComposedReward, compose
from rewardkit.protocols import Reward, RewardOutput


class Table(Reward):
    """Returns fixed per-row values (NaN allowed): a reward whose output we know exactly."""

    requires_prompt = False
    differentiable = False

    def __init__(self, name: str, values: list[float]) -> None:
        super().__init__()
        self.name = name
        self.values = values

    def score(self, images, prompts, **context):
        return RewardOutput(torch.tensor(self.values[: images.shape[0]], dtype=torch.float32))


class Brightness(Reward):
    """Differentiable: mean pixel value."""

    requires_prompt = False
    name = "brightness"

    def score(self, images, prompts, **context):
        return RewardOutput(images.mean(dim=(1, 2, 3)))


IMAGES = torch.full((3, 3, 8, 8), 0.5)


def test_weighted_sum_and_parts() -> None:
    reward = compose({Table("a", [1.0, 2.0, 3.0]): 2.0, Table("b", [10.0, 0.0, -10.0]): 0.5})
    out = reward.evaluate(IMAGES)
    torch.testing.assert_close(out.scores, torch.tensor([7.0, 4.0, 1.0]))
    torch.testing.assert_close(out.details["a"], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(out.details["b/normalized"], torch.tensor([10.0, 0.0, -10.0]))
    assert isinstance(reward, rk.RewardFn) and not reward.differentiable and not reward.requires_prompt


def test_normalized_weights_sum_to_one() -> None:
    reward = compose({Table("a", [1.0, 1.0, 1.0]): 3.0, Table("b", [0.0, 0.0, 0.0]): 1.0}, normalize_weights=True)
    assert reward.weights == {"a": 0.75, "b": 0.25}
    torch.testing.assert_close(reward(IMAGES), torch.full((3,), 0.75))


def test_affine_normalisation() -> None:
    reward = compose({Table("a", [20.0, 22.0, 18.0]): 1.0}, normalize="affine", affine={"a": (20.0, 2.0)})
    torch.testing.assert_close(reward(IMAGES), torch.tensor([0.0, 1.0, -1.0]))


def test_zscore_uses_running_statistics_over_all_batches() -> None:
    part = Table("a", [1.0, 2.0, 3.0])
    reward = compose({part: 1.0}, normalize="zscore")
    first = reward(IMAGES)
    mean, std = 2.0, (2 / 3) ** 0.5  # population statistics of [1, 2, 3]
    torch.testing.assert_close(first, (torch.tensor([1.0, 2.0, 3.0]) - mean) / (std + 1e-6))
    part.values = [5.0, 5.0, 5.0]
    second = reward(IMAGES)
    seen = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0], dtype=torch.float64)
    expected = (5.0 - seen.mean()) / (seen.std(unbiased=False) + 1e-6)
    torch.testing.assert_close(second, torch.full((3,), expected.item()), rtol=1e-6, atol=1e-6)


def test_zscore_state_dict_round_trip_resumes_statistics() -> None:
    reward = compose({Table("a", [1.0, 2.0, 3.0]): 1.0}, normalize="zscore")
    reward(IMAGES)
    resumed = compose({Table("a", [4.0, 4.0, 4.0]): 1.0}, normalize="zscore")
    resumed.load_state_dict(reward.state_dict())
    assert resumed.stats["a"].count.item() == 3
    reward.parts["a"].values = [4.0, 4.0, 4.0]
    torch.testing.assert_close(resumed(IMAGES), reward(IMAGES))


def test_frozen_statistics_do_not_move() -> None:
    reward = compose({Table("a", [1.0, 2.0, 3.0]): 1.0}, normalize="zscore")
    reward(IMAGES)
    reward.update_stats = False
    reward(IMAGES)
    assert reward.stats["a"].count.item() == 3


def test_nan_skip_renormalises_over_the_available_parts() -> None:
    a, b = Table("a", [1.0, float("nan"), float("nan")]), Table("b", [3.0, 4.0, float("nan")])
    reward = compose({a: 1.0, b: 3.0})
    with pytest.warns(UserWarning, match=r"rows \[2\]"):
        total = reward(IMAGES)
    assert total[0].item() == pytest.approx(1.0 + 9.0)
    assert total[1].item() == pytest.approx(3.0 * 4.0 * (4.0 / 3.0))  # weight mass 4 of 4, 3 present
    assert torch.isnan(total[2])


def test_nan_propagate_nans_the_row() -> None:
    reward = compose({Table("a", [1.0, float("nan"), 2.0]): 1.0, Table("b", [1.0, 1.0, 1.0]): 1.0}, nan_policy="propagate")
    total = reward(IMAGES)
    assert total[0].item() == 2.0 and torch.isnan(total[1]) and total[2].item() == 3.0


def test_gradients_flow_through_a_differentiable_composition(tiny_reward) -> None:
    reward = compose({Brightness(): 1.0, tiny_reward("hpsv2"): 2.0})
    assert reward.differentiable and reward.requires_prompt
    images = rkt.random_images(2, 32, 32).requires_grad_(True)
    reward(images, "an owl").sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_names_load_from_the_registry_and_the_result_pickles(tiny_root) -> None:
    options = {"hpsv2": rkt.tiny_hpsv2(tiny_root / "compose")}
    reward = compose({"hpsv2": 1.0, Table("t", [0.5, 0.5, 0.5]): 1.0}, load_options=options)
    images = rkt.random_images(3, 32, 32)
    expected = rk.load("hpsv2", **options["hpsv2"])(images, "a cat") + 0.5
    torch.testing.assert_close(reward(images, "a cat"), expected)
    clone = pickle.loads(pickle.dumps(reward))
    torch.testing.assert_close(clone(images, "a cat"), expected, rtol=1e-6, atol=1e-6)


def test_bad_configurations_raise() -> None:
    with pytest.raises(KeyError, match="did you mean"):
        compose({"pickscor": 1.0})
    with pytest.raises(ValueError, match="finite number"):
        compose({Table("a", [1.0]): "heavy"})
    with pytest.raises(ValueError, match="affine"):
        compose({Table("a", [1.0]): 1.0}, normalize="affine")
    with pytest.raises(ValueError, match="normalize must be"):
        compose({Table("a", [1.0]): 1.0}, normalize="minmax")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="two members"):
        compose({Table("a", [1.0]): 1.0, Table("a", [2.0]): 1.0})
    with pytest.raises(ValueError, match="at least one"):
        ComposedReward({}, {})
    with pytest.raises(ValueError, match="non-zero sum"):
        compose({Table("a", [1.0]): 1.0, Table("b", [1.0]): -1.0}, normalize_weights=True)


@pytest.mark.parametrize("weight", [float("inf"), float("-inf"), float("nan"), True])
def test_weights_must_be_finite_numbers(weight) -> None:
    with pytest.raises(ValueError, match="finite number"):
        compose({Table("a", [1.0]): weight})


@pytest.mark.parametrize("pair", [(float("nan"), 1.0), (0.0, float("inf")), (float("-inf"), 2.0), (1.0,), "a", (1.0, 0)])
def test_affine_constants_must_be_finite_pairs_with_a_non_zero_scale(pair) -> None:
    with pytest.raises(ValueError, match=r"affine\[|non-zero"):
        compose({Table("a", [1.0]): 1.0}, normalize="affine", affine={"a": pair})


def test_affine_options_that_would_be_ignored_raise() -> None:
    with pytest.raises(ValueError, match="only used with normalize='affine'"):
        compose({Table("a", [1.0]): 1.0}, affine={"a": (0.0, 1.0)})
    with pytest.raises(ValueError, match="not parts"):
        compose({Table("a", [1.0]): 1.0}, normalize="affine", affine={"a": (0.0, 1.0), "typo": (0.0, 1.0)})
    with pytest.raises(ValueError, match="every weight is 0"):
        compose({Table("a", [1.0]): 0.0})


def test_infinity_propagates_while_nan_means_not_applicable() -> None:
    inf = float("inf")
    a, b = Table("a", [inf, 1.0, inf, 2.0]), Table("b", [1.0, float("nan"), -inf, -inf])
    images = torch.zeros(4, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"rows \[2\] have parts at \+inf and -inf"):
        total = compose({a: 1.0, b: 2.0}).evaluate(images).scores
    assert total[0].item() == inf  # inf is a value, not "not applicable"
    assert total[1].item() == pytest.approx(1.0 * 3.0)  # b not applicable: a's term rescaled to mass 3
    assert torch.isnan(total[2])  # inf - inf
    assert total[3].item() == -inf
    propagated = compose({a: 1.0, b: 2.0}, nan_policy="propagate")(images[:2])
    assert propagated[0].item() == inf and torch.isnan(propagated[1])


def test_psnr_of_identical_images_makes_the_total_infinite() -> None:
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    psnr = rk.load("psnr")(x, reference=x)
    assert torch.isinf(psnr).all()  # the premise: PSNR of identical images is +inf
    total = rk.compose({"psnr": 1.0, "ssim": 1.0})(x, reference=x)
    assert torch.equal(total, torch.full((2,), float("inf")))


def test_a_zero_weight_part_is_reported_but_never_summed() -> None:
    out = compose({Table("a", [1.0, 2.0]): 1.0, Table("b", [float("inf"), float("nan")]): 0.0}).evaluate(IMAGES[:2])
    torch.testing.assert_close(out.scores, torch.tensor([1.0, 2.0]))
    assert out.details["b"][0].item() == float("inf")


def test_zscore_statistics_refuse_infinite_rows_with_a_warning() -> None:
    reward = compose({Table("a", [1.0, float("inf"), 3.0]): 1.0}, normalize="zscore")
    with pytest.warns(UserWarning, match=r"ignore rows \[1\]"):
        total = reward(IMAGES)
    stats = reward.stats["a"]
    assert stats.count.item() == 2 and stats.mean.item() == 2.0 and stats.std.item() == 1.0
    torch.testing.assert_close(total, torch.tensor([-1.0 / (1 + 1e-6), float("inf"), 1.0 / (1 + 1e-6)]))


def test_update_stats_per_call_and_shallow_copies_share_statistics_and_order() -> None:
    import copy

    reward = compose({Table("a", [1.0, 2.0, 3.0]): 1.0}, normalize="zscore")
    reward(IMAGES)
    before = {k: v.clone() for k, v in reward.state_dict().items()}
    frozen = reward.evaluate(IMAGES, update_stats=False)
    assert reward.update_stats and all(torch.equal(before[k], v) for k, v in reward.state_dict().items())
    torch.testing.assert_close(frozen.scores, reward(IMAGES))  # same statistics read (the batch repeats)
    view = copy.copy(reward)
    view.update_stats = False
    assert reward.update_stats and view.stats is reward.stats and view._turns is reward._turns
    clone = pickle.loads(pickle.dumps(reward))  # a pickled copy has its own call order and statistics
    assert clone._turns is not reward._turns and torch.equal(clone.stats["a"].count, reward.stats["a"].count)
    torch.testing.assert_close(clone(IMAGES), reward(IMAGES))


def test_exact_path_combines_each_parts_own_exact_path(tiny_reward) -> None:
    from image_samples import random_pil_images

    from rewardkit.image_io import to_tensor
    from rewardkit.testing.toy_rewards import MeanBrightness

    pick, brightness = tiny_reward("pickscore"), MeanBrightness()
    assert hasattr(pick, "evaluate_pil") and not hasattr(brightness, "evaluate_pil")
    images = random_pil_images([(40, 32), (24, 48), (40, 32), (33, 33)], seed=3)  # mixed sizes
    prompts = ["a cat", "a dog", "an owl", "a red car"]
    manual_pick = pick.score_pil(images, prompts)
    manual_bright = torch.cat([brightness(to_tensor(image)) for image in images])  # one image at a time
    total = compose({pick: 1.0, brightness: 0.5})
    torch.testing.assert_close(total.score_pil(images, prompts), manual_pick + 0.5 * manual_bright)
    out = total.evaluate_pil(images, prompts)
    assert torch.equal(out.details["pickscore"], manual_pick)
    torch.testing.assert_close(out.details["brightness"], manual_bright)
    with pytest.raises(ValueError, match="one size"):
        total.evaluate_pil(images, prompts, reference=torch.zeros(4, 3, 8, 8))

    zscore = compose({pick: 1.0, brightness: 0.5}, normalize="zscore")
    halves = [(images[:2], prompts[:2]), (images[2:], prompts[2:])]
    got = [zscore.score_pil(batch, texts) for batch, texts in halves]
    seen = {"pick": manual_pick.double(), "bright": manual_bright.double()}
    for k, (start, stop) in enumerate([(0, 2), (2, 4)]):
        expected = torch.zeros(stop - start, dtype=torch.float64)
        for key, weight in (("pick", 1.0), ("bright", 0.5)):
            upto = seen[key][:stop]  # statistics after calls 0..k, this batch included
            expected += weight * (seen[key][start:stop] - upto.mean()) / (upto.std(unbiased=False) + 1e-6)
        torch.testing.assert_close(got[k].double(), expected, rtol=1e-5, atol=1e-5)
    assert zscore.stats["pickscore"].count.item() == 4


def test_weights_that_do_not_sum_exactly_in_float32_keep_complete_rows() -> None:
    reward = compose({Table("a", [1.0, 2.0, 3.0]): 0.1, Table("b", [1.0, 1.0, 1.0]): 0.2}, nan_policy="propagate")
    torch.testing.assert_close(reward(IMAGES), torch.tensor([0.3, 0.4, 0.5]))


def test_parts_sharing_a_tower_run_it_once(tiny_root) -> None:
    weights = rkt.tiny_clip_score(tiny_root / "compose-shared")["weights"]
    paper, hundred = rk.load("clip-score", weights=weights), rk.load("clip-score", weights=weights, scale=100)
    hundred.name = "clip-score-100"
    assert paper.towers is hundred.towers
    calls = []
    original = paper.towers.encode_image

    def counting(pixels):
        calls.append(pixels.shape[0])
        return original(pixels)

    paper.towers.encode_image = counting
    images = rkt.random_images(6, 48, 40, seed=1).requires_grad_(True)
    prompts = ["a photo of a cat", "a red car on a road", "a bowl of fruit", "a cat", "mountains at dawn", "an owl"]
    out = compose({paper: 1.0, hundred: 0.5}).evaluate(images, prompts)
    assert calls == [6], "one image-tower pass for both parts"
    assert (out.details["clip-score"] > 0).any(), "some rows must be above the clamp for the gradient check"
    separate = paper(images, prompts) + 0.5 * hundred(images, prompts)
    torch.testing.assert_close(out.scores, separate, rtol=1e-6, atol=1e-6)
    out.scores.sum().backward()
    assert images.grad.abs().sum() > 0
    del paper.towers.encode_image


def test_zscore_statistics_are_all_reduced_across_two_processes(run_two_processes) -> None:
    import math

    ranks = run_two_processes("compose_zscore_worker.py", 29513)
    seen = torch.tensor([1.0, 2.0, 4.0, 5.0, 6.0], dtype=torch.float64)  # NaN ignored
    for row in ranks:
        assert row["count"] == 5
        assert row["mean"] == pytest.approx(seen.mean().item())
        assert row["std"] == pytest.approx(seen.std(unbiased=False).item())
    expected_rank1 = ((torch.tensor([4.0, 5.0, 6.0], dtype=torch.float64) - seen.mean()) / (seen.std(unbiased=False) + 1e-6))
    assert ranks[1]["scores"] == pytest.approx(expected_rank1.tolist(), rel=1e-6)
    assert math.isnan(ranks[0]["scores"][2])


def test_member_names_with_dots_and_factory_paths_compose() -> None:
    # ModuleDict keys cannot contain "."; "hpsv2.1" and "package.module:factory" members must still work.
    from rewardkit.testing.toy_rewards import MeanBrightness

    dotted = MeanBrightness()
    dotted.name = "hpsv2.1"
    total = rk.compose({dotted: 1.0, "rewardkit.testing.toy_rewards:load_brightness": 2.0})
    images = torch.rand(3, 3, 8, 8)
    out = total.evaluate(images)
    brightness = images.mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.details["hpsv2.1"], brightness)
    torch.testing.assert_close(out.details["rewardkit.testing.toy_rewards:load_brightness"], brightness)
    torch.testing.assert_close(out.scores, 3 * brightness)
