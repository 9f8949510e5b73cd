"""Contract tests over every registered distribution metric (driven by registry metadata, not names)."""

from __future__ import annotations

import pytest
import torch

import rewardkit as rk
import rewardkit.testing as rkt
from rewardkit.registry import get_entry, names

METRICS = names("distribution")
# KID's default subset size (1000) exceeds these test sets; the contract is checked with small subsets.
OPTIONS = {"kid": {"subset_size": 4, "subsets": 10}, "inception-score": {"splits": 2}}


@pytest.fixture(scope="module")
def real() -> torch.Tensor:
    return rkt.random_images(6, 40, 48, seed=21)


@pytest.fixture(scope="module")
def fake() -> torch.Tensor:
    return rkt.random_images(6, 40, 48, seed=22)


def _metric(name: str, tiny_root):
    return rkt.load_tiny(name, tiny_root / "distribution", **OPTIONS.get(name, {}))


def _uses_real(name: str) -> bool:
    return name != "inception-score"


def _fill(metric, name: str, real: torch.Tensor, fake: torch.Tensor) -> None:
    if _uses_real(name):
        metric.update(real, real=True)
    metric.update(fake, real=False)


@pytest.mark.parametrize("name", METRICS)
def test_every_metric_has_a_tiny_builder_and_is_a_distribution_metric(name: str, tiny_root) -> None:
    entry = get_entry(name)
    assert entry.tiny is not None and hasattr(rkt, entry.tiny)
    metric = _metric(name, tiny_root)
    assert isinstance(metric, rk.DistributionMetric)
    assert metric.higher_is_better == entry.higher_is_better
    metric.train()
    assert not any(m.training for m in metric.modules())
    assert not any(p.requires_grad for p in metric.parameters())


@pytest.mark.parametrize("name", METRICS)
def test_compute_is_finite_float64_and_reset_clears(name: str, tiny_root, real, fake) -> None:
    metric = _metric(name, tiny_root)
    _fill(metric, name, real, fake)
    value = metric.compute()
    assert value.dtype == torch.float64 and torch.isfinite(value).all()
    metric.reset()
    with pytest.raises(ValueError, match="at least 2|fewer than 2|N < 2|at least"):
        metric.compute()


@pytest.mark.parametrize("name", METRICS)
def test_batches_and_shards_equal_one_shot(name: str, tiny_root, real, fake) -> None:
    whole = _metric(name, tiny_root)
    _fill(whole, name, real, fake)
    first, second = _metric(name, tiny_root), _metric(name, tiny_root)
    _fill(first, name, real[:2], fake[:3])
    _fill(second, name, real[2:], fake[3:])
    first.merge(second)
    first.sync()  # not distributed: the local state is the global state
    torch.testing.assert_close(first.compute(), whole.compute(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", METRICS)
def test_fewer_than_two_images_on_a_side_is_an_error(name: str, tiny_root, real, fake) -> None:
    metric = _metric(name, tiny_root)
    _fill(metric, name, real, fake[:1])
    with pytest.raises(ValueError, match="at least|N < 2|fewer"):
        metric.compute()


@pytest.mark.parametrize("name", METRICS)
def test_bad_images_raise_with_the_metric_name(name: str, tiny_root, fake) -> None:
    metric = _metric(name, tiny_root)
    for bad, message in ((fake * 2 - 1, r"\[-1, 1\]"), (fake.permute(0, 2, 3, 1), "NHWC"),
                         (fake.masked_fill(fake > 0.9, float("nan")), "NaN")):
        with pytest.raises(ValueError, match=message) as info:
            metric.update(bad, real=False)
        assert metric.name in str(info.value)


@pytest.mark.parametrize("name", METRICS)
def test_uint8_tensors_equal_quantised_floats(name: str, tiny_root, fake) -> None:
    as_uint8 = _metric(name, tiny_root).features((fake * 255).round().byte())
    as_float = _metric(name, tiny_root).features(fake)
    torch.testing.assert_close(as_uint8, as_float, rtol=0, atol=0)


# bf16 autocast on the feature networks: not a parity mode (reference/distribution_metrics.md §4.2: ~0.8 %
# of the feature range on Inception with real weights). Measured on the tiny networks: cosine >= 0.997
# per row, max |delta| 7.7 % of the feature range (the random Inception is far more input-sensitive
# than the real one), 0.35 % (CLIP), 0.27 % (DINOv2).
BF16_MIN_COSINE = 0.99
BF16_FEATURE_FRACTION = 0.15


@pytest.mark.parametrize("name", METRICS)
def test_bf16_autocast_features_are_close_to_fp32(name: str, tiny_root, fake) -> None:
    exact = _metric(name, tiny_root).features(fake[:2])
    fast = rkt.load_tiny(name, tiny_root / "distribution", dtype="bf16", **OPTIONS.get(name, {})).features(fake[:2])
    assert fast.dtype == torch.float32
    assert not torch.equal(fast, exact), "dtype='bf16' must actually autocast the network"
    spread = (exact.max() - exact.min()).item()
    assert (fast - exact).abs().max().item() <= BF16_FEATURE_FRACTION * spread
    assert torch.nn.functional.cosine_similarity(fast, exact).min().item() >= BF16_MIN_COSINE
