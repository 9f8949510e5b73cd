"""Contract tests, parametrised over every registered reward (driven by registry metadata, not names)."""

from __future__ import annotations

import pickle

import pytest
import torch

import rewardkit as rk
import rewardkit.testing as rkt
from rewardkit.registry import get_entry, names
from rewardkit.rewards.geneval_rules import GENEVAL_CLASSES

REWARDS = names("reward")
PROMPTS = ["a photo of a cat", "a red car on a road", "a bowl of fruit", "a cat", "mountains at dawn", "an astronaut"]
# bf16 autocast against fp32, on the tiny models: max |delta| as a fraction of the fp32 score spread
# over the batch (scale-free, so one bound serves rewards in [0, 1] and in [0, 100]). Measured:
# 0.3%-2% of the spread; real-size numbers are in the README's speed table.
BF16_SPREAD_FRACTION = 0.10
# Per-entry expectations that registry metadata does not carry: rewards whose tiny model gives every smooth random
# contract image the same score, and why. Their spread is tested on inputs that have it, in their own test files.
SAME_SCORE_ON_RANDOM_IMAGES = {
    "ocr": "the real PP-OCRv4 models find no text in smooth noise, so every row scores 1 - len(target) / len(target) "
           "= 0 (tests/test_ocr.py scores rendered text)",
}
# For rewards with requires_metadata (GenEval): one record asking for exactly one object of every COCO class
# (flow_grpo dataset/geneval/*.jsonl fields). Its partial score, the mean of 1 - |1 - found| over the classes,
# follows whatever the tiny detector finds in each image, so different images score differently.
GENEVAL_RECORD = {"tag": "two_object", "include": [{"class": name, "count": 1} for name in GENEVAL_CLASSES],
                  "exclude": [], "prompt": "one of every COCO object"}


IMAGE_SIZE = (48, 40)
_SIZES: dict[str, tuple[int, int]] = {}  # name -> (H, W) its images were made with (for reference=)


@pytest.fixture
def images(request, tiny_reward) -> torch.Tensor:
    """Six smooth images, 48 x 40 unless the reward declares a larger ``min_size`` (MS-SSIM: 161 px)."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    name = params.get("name")
    height, width = IMAGE_SIZE
    if name is not None:
        side = getattr(tiny_reward(name), "min_size", 0)
        height, width = max(height, side + 8), max(width, side)
        _SIZES[name] = (height, width)
    return rkt.random_images(6, height, width, seed=1)


@pytest.fixture(autouse=True)
def _one_thread_for_generative_judges(request):
    """Tiny VLM judges generate token by token on ~300k-parameter models: with 2 intra-op threads the per-op
    thread hand-off dominates (Qwen3.5's pure-torch conv fallback: 16 s vs 0.6 s for 30 tokens on a loaded
    2-core machine), so their contract tests run on one thread."""
    name = getattr(getattr(request.node, "callspec", None), "params", {}).get("name")
    if name is None or not get_entry(name).generative:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _prompts(name: str):
    """The contract prompts; a reward that reads a particular prompt form (``example_prompt``, e.g. ocr's quoted
    target) gets that prompt on every row."""
    entry = get_entry(name)
    if not entry.requires_prompt:
        return None
    return [entry.example_prompt] * len(PROMPTS) if entry.example_prompt else PROMPTS


def _context(name: str, rows=None) -> dict:
    """``reference=`` images for paired metrics (SSIM, PSNR, LPIPS), ``source=`` images for edit rewards,
    ``metadata=`` records for rewards that need them (GenEval), else nothing; ``rows`` selects rows."""
    entry, context = get_entry(name), {}
    for key, needed, seed in (("reference", entry.requires_reference, 7), ("source", entry.requires_source, 11)):
        if needed:
            extra = rkt.random_images(6, *_SIZES.get(name, IMAGE_SIZE), seed=seed)
            context[key] = extra if rows is None else extra[rows]
    if entry.requires_metadata:
        records = [dict(GENEVAL_RECORD) for _ in range(6)]
        picked = range(6)[rows] if isinstance(rows, slice) else rows.tolist() if rows is not None else range(6)
        context["metadata"] = [records[i] for i in picked]
    return context


def _generative(name: str) -> bool:
    return get_entry(name).generative


def _assert_same_answers(output, expected) -> None:
    """Generative judges: the same raw answers, NaN rows and parsed scores (greedy decoding is deterministic)."""
    assert output.details["raw"] == expected.details["raw"]
    torch.testing.assert_close(output.scores, expected.scores, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("name", REWARDS)
def test_every_reward_has_a_tiny_builder(name: str) -> None:
    entry = get_entry(name)
    if entry.default_weights is None:  # no network (SSIM, PSNR): nothing to build
        assert entry.tiny is None
    else:
        assert entry.tiny is not None and hasattr(rkt, entry.tiny)


@pytest.mark.parametrize("name", REWARDS)
def test_output_is_float32_batch_on_input_device(name: str, tiny_reward, images) -> None:
    reward = tiny_reward(name)
    scores = reward(images, _prompts(name), **_context(name))
    assert scores.shape == (6,)
    assert scores.dtype == torch.float32
    assert scores.device == images.device
    assert isinstance(reward, rk.RewardFn)
    if _generative(name):
        # A random tiny judge writes random text: every row must be a parsed number or NaN *with its reason*.
        output = reward.evaluate(images, _prompts(name), **_context(name))
        assert len(output.details["raw"]) == len(output.details["failure"]) == 6
        for score, failure in zip(output.scores.tolist(), output.details["failure"]):
            assert (failure is None) == (score == score), (score, failure)
            assert failure is None or (isinstance(failure, str) and failure)
        return
    assert torch.isfinite(scores).all()
    if name in SAME_SCORE_ON_RANDOM_IMAGES:
        assert (scores == scores[0]).all(), SAME_SCORE_ON_RANDOM_IMAGES[name]
        return
    assert scores.std() > 0, "random tiny weights must give different scores to different images"


@pytest.mark.parametrize("name", REWARDS)
def test_scores_are_batch_size_independent(name: str, tiny_reward, images) -> None:
    reward = tiny_reward(name)
    prompts = _prompts(name)
    if _generative(name):  # left-padded batched generation answers exactly as one row at a time
        whole = reward.evaluate(images, prompts, **_context(name))
        rows = [reward.evaluate(images[i : i + 1], prompts[i] if prompts else None, **_context(name, slice(i, i + 1)))
                for i in range(6)]
        assert whole.details["raw"] == [raw for row in rows for raw in row.details["raw"]]
        torch.testing.assert_close(whole.scores, torch.cat([row.scores for row in rows]), equal_nan=True)
        return
    whole = reward(images, prompts, **_context(name))
    singles = torch.cat([reward(images[i : i + 1], prompts[i] if prompts else None, **_context(name, slice(i, i + 1)))
                         for i in range(6)])
    torch.testing.assert_close(whole, singles, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", REWARDS)
def test_scores_are_deterministic_and_permutation_equivariant(name: str, tiny_reward, images) -> None:
    reward = tiny_reward(name)
    prompts = _prompts(name)
    order = torch.tensor([5, 3, 1, 0, 2, 4])
    permuted_prompts = [prompts[i] for i in order] if prompts else None
    if _generative(name):
        first = reward.evaluate(images, prompts, **_context(name))
        _assert_same_answers(reward.evaluate(images, prompts, **_context(name)), first)
        permuted = reward.evaluate(images[order], permuted_prompts, **_context(name, order))
        assert permuted.details["raw"] == [first.details["raw"][i] for i in order]
        return
    first = reward(images, prompts, **_context(name))
    torch.testing.assert_close(reward(images, prompts, **_context(name)), first, rtol=0, atol=0)
    permuted = reward(images[order], permuted_prompts, **_context(name, order))
    torch.testing.assert_close(permuted, first[order], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", REWARDS)
def test_gradient_reaches_pixels_iff_differentiable(name: str, tiny_reward, images) -> None:
    reward = tiny_reward(name)
    pixels = images.clone().requires_grad_(True)
    scores = reward(pixels, _prompts(name), **_context(name))
    assert scores.requires_grad == get_entry(name).differentiable == reward.differentiable
    if reward.differentiable:
        scores.sum().backward()
        assert pixels.grad is not None and torch.isfinite(pixels.grad).all()
        assert pixels.grad.abs().sum() > 0
        assert all(p.grad is None for p in reward.parameters()), "reward weights must stay frozen"


@pytest.mark.parametrize("name", REWARDS)
def test_cache_filled_under_inference_mode_serves_a_grad_step(name: str, tiny_root, images) -> None:
    # RL loops score under torch.inference_mode(), reward-backprop loops with grad on: a prompt
    # embedding cached in the first must be usable in the second.
    reward = rkt.load_tiny(name, tiny_root / "cache")
    with torch.inference_mode():
        reference = reward(images, _prompts(name), **_context(name))
    pixels = images.clone().requires_grad_(True)
    scores = reward(pixels, _prompts(name), **_context(name))
    torch.testing.assert_close(scores.detach(), reference.clone(), rtol=1e-5, atol=1e-6, equal_nan=True)
    if reward.differentiable:
        scores.sum().backward()


@pytest.mark.parametrize("name", REWARDS)
def test_bf16_autocast_is_close_to_fp32(name: str, tiny_root, tiny_reward, images) -> None:
    exact = tiny_reward(name)(images, _prompts(name), **_context(name))
    fast = rkt.load_tiny(name, tiny_root / "bf16", dtype="bf16")
    scores = fast(images, _prompts(name), **_context(name))
    assert scores.dtype == torch.float32
    if _generative(name):
        # bf16 changes a random judge's greedy text, so scores are not comparable; the bf16 path must run and
        # keep the NaN-with-reason contract (parsed answers in bf16 are checked per judge with forced answers).
        output = fast.evaluate(images, _prompts(name), **_context(name))
        assert all((f is None) == (s == s) for s, f in zip(output.scores.tolist(), output.details["failure"]))
        return
    spread = (exact.max() - exact.min()).item()
    assert (scores - exact).abs().max().item() <= BF16_SPREAD_FRACTION * spread


@pytest.mark.parametrize("name", REWARDS)
def test_reward_pickles_and_state_dict_round_trips(name: str, tiny_reward, images) -> None:
    reward = tiny_reward(name)
    if _generative(name):
        expected = reward.evaluate(images, _prompts(name), **_context(name))
        clone = pickle.loads(pickle.dumps(reward))
        _assert_same_answers(clone.evaluate(images, _prompts(name), **_context(name)), expected)
        return
    expected = reward(images, _prompts(name), **_context(name))
    clone = pickle.loads(pickle.dumps(reward))
    # The clone starts with an empty prompt cache and encodes the prompts in another batch
    # composition than the original did: equal up to float32 rounding.
    assert len(getattr(clone, "prompt_cache", ())) == 0
    torch.testing.assert_close(clone(images, _prompts(name), **_context(name)), expected, rtol=1e-6, atol=1e-6)
    clone.load_state_dict(reward.state_dict())
    assert not clone.training and not any(p.requires_grad for p in clone.parameters())


@pytest.mark.parametrize("name", REWARDS)
def test_train_mode_cannot_be_switched_on(name: str, tiny_reward) -> None:
    reward = tiny_reward(name)
    reward.train()
    assert not reward.training and not any(m.training for m in reward.modules())


# ----------------------------------------------------------------------------- bad input, one per class
BAD_IMAGES = {
    "uint8": (lambda x: (x * 255).to(torch.uint8), ValueError, "uint8"),
    "nhwc": (lambda x: x.permute(0, 2, 3, 1).contiguous(), ValueError, "NHWC"),
    "above-one": (lambda x: x * 255, ValueError, r"\[0, 255\]"),
    "minus-one-to-one": (lambda x: x * 2 - 1, ValueError, r"\[-1, 1\]"),
    "nan": (lambda x: x.masked_fill(x > 0.9, float("nan")), ValueError, "NaN"),
    "inf": (lambda x: x.masked_fill(x > 0.9, float("inf")), ValueError, "NaN/inf"),
    "empty": (lambda x: x[:0], ValueError, "empty batch"),
    "three-dims": (lambda x: x[0], ValueError, "batch dimension"),
    "numpy": (lambda x: x.numpy(), TypeError, "to_tensor"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
@pytest.mark.parametrize("name", REWARDS)
def test_bad_images_raise_with_a_fix(name: str, case: str, tiny_reward, images) -> None:
    transform, error, message = BAD_IMAGES[case]
    with pytest.raises(error, match=message) as info:
        tiny_reward(name)(transform(images), _prompts(name), **_context(name))
    assert name in str(info.value)


@pytest.mark.parametrize("name", [n for n in REWARDS if get_entry(n).requires_reference])
def test_paired_metrics_need_a_reference_of_the_same_shape(name: str, tiny_reward, images) -> None:
    reward = tiny_reward(name)
    with pytest.raises(ValueError, match="reference="):
        reward(images)
    with pytest.raises(ValueError, match="same shape"):
        reward(images, reference=images[:, :, :-8])
    with pytest.raises(ValueError, match="NaN"):
        reward(images, reference=torch.full_like(images, float("nan")))


@pytest.mark.parametrize("name", [n for n in REWARDS if get_entry(n).requires_source])
def test_edit_rewards_need_source_images_of_the_batch_size(name: str, tiny_reward, images) -> None:
    reward = tiny_reward(name)
    with pytest.raises(ValueError, match="source="):
        reward(images, _prompts(name))
    with pytest.raises(ValueError, match="source="):
        reward(images, _prompts(name), source=_context(name)["source"][:4])


@pytest.mark.parametrize("name", [n for n in REWARDS if get_entry(n).requires_prompt])
def test_wrong_prompt_count_and_missing_prompt_raise(name: str, tiny_reward, images) -> None:
    reward = tiny_reward(name)
    with pytest.raises(ValueError, match="one prompt or 6 prompts"):
        reward(images, PROMPTS[:4], **_context(name))
    with pytest.raises(ValueError, match="needs a prompt"):
        reward(images, **_context(name))
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        reward(images, ["ok", 3, "a", "b", "c", "d"], **_context(name))


def test_one_prompt_is_broadcast(tiny_reward, images) -> None:
    reward = tiny_reward("pickscore")
    torch.testing.assert_close(reward(images, "a cat"), reward(images, ["a cat"] * 6))
