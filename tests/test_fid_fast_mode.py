"""The FID Inception's fast mode: a BatchNorm-folded, low-precision, channels-last copy of the exact network.

``rk.load("fid" | "kid" | "inception-score", dtype="bf16")`` runs ``InceptionExtractor.forward_low_precision``: the copy is
built once (``rewardkit.nets.fid_inception.low_precision_copy``), the exact network is never touched, and a copy
built before the exact weights changed is never used again. Real-weight numbers: tests/test_real_weights.py.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import rewardkit as rk
from rewardkit.metrics.inception import load_inception
from rewardkit.nets.fid_inception import low_precision_copy
from rewardkit.testing.fid import tiny_fid_inception

# Folding BatchNorm into the conv is exact algebra; in float32 the copy differs from conv -> BN only by rounding
# (measured 2.9e-5 on the random network, features max 1.5).
FOLDED_FP32_ATOL = 1e-4
# Low-precision copy vs exact on the random network (far more input-sensitive than the real one): measured bf16
# max |Δ| 12.1 % of the feature range, cosine >= 0.995 per row; fp16 2.9 %, 0.9998. Folded biases reach |13| on
# the real network, and bf16 keeps 8 bits of them. Real weights: 2.2 % of the features' max
# (tests/test_real_weights.py, docs/speed.md).
BF16_FEATURE_FRACTION = 0.15
BF16_MIN_COSINE = 0.99


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    return tiny_fid_inception(tmp_path_factory.mktemp("fid"))["weights"]


@pytest.fixture(scope="module")
def prepared() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    coarse = torch.rand(2, 3, 8, 8, generator=generator) * 2 - 1
    return nn.functional.interpolate(coarse, size=(299, 299), mode="bilinear", align_corners=False)


def _exact(extractor, prepared: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return extractor(prepared)


def test_folded_copy_has_no_batchnorm_and_leaves_the_exact_network_alone(weights):
    extractor = load_inception(weights)
    before = {key: value.clone() for key, value in extractor.net.state_dict().items()}
    fast = low_precision_copy(extractor.net, torch.bfloat16)
    assert not any(isinstance(module, nn.BatchNorm2d) for module in fast.modules())
    convs = [module for module in fast.modules() if isinstance(module, nn.Conv2d)]
    assert len(convs) == 94 and all(conv.bias is not None for conv in convs)
    assert all(conv.weight.dtype == torch.bfloat16 for conv in convs)
    assert all(conv.weight.is_contiguous(memory_format=torch.channels_last) for conv in convs if conv.kernel_size != (1, 1))
    assert not hasattr(fast, "fc") and not fast.has_classifier
    assert not any(p.requires_grad for p in fast.parameters())
    after = extractor.net.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[key], before[key]) for key in before)
    assert any(isinstance(module, nn.BatchNorm2d) for module in extractor.net.modules())


def test_folding_is_exact_algebra_in_float32(weights, prepared):
    """The fold itself (not the bf16 cast) is checked in float32: conv -> BN == one conv with a bias."""
    extractor = load_inception(weights)
    folded = low_precision_copy(extractor.net, torch.float32)
    exact = _exact(extractor, prepared)
    with torch.inference_mode():
        fast = folded(prepared.contiguous(memory_format=torch.channels_last))
    assert exact.abs().max() > 0.1  # a live network
    torch.testing.assert_close(fast, exact, rtol=0, atol=FOLDED_FP32_ATOL)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_fast_features_are_close_to_exact_and_float32(weights, prepared, dtype):
    exact_metric = rk.load("fid", weights=weights)
    fast_metric = rk.load("fid", weights=weights, dtype=dtype)
    exact = _exact(exact_metric.extractor, prepared)
    fast = torch.cat(list(fast_metric.iter_features(_to_images(prepared))))
    exact_via_metric = torch.cat(list(exact_metric.iter_features(_to_images(prepared))))
    assert fast.dtype == torch.float32 and fast.shape == exact.shape == (2, 2048)
    assert not torch.equal(fast, exact_via_metric)  # the low-precision copy really ran
    spread = (exact_via_metric.max() - exact_via_metric.min()).item()
    assert (fast - exact_via_metric).abs().max().item() <= BF16_FEATURE_FRACTION * spread
    assert nn.functional.cosine_similarity(fast, exact_via_metric).min().item() >= BF16_MIN_COSINE
    assert list(fast_metric.extractor._low_precision) == [torch.bfloat16 if dtype == "bf16" else torch.float16]
    assert set(fast_metric.state_dict()) == set(exact_metric.state_dict())  # the copy is not state


def _to_images(prepared: torch.Tensor) -> torch.Tensor:
    """Prepared ``[-1, 1]`` 299 px input back to ``[0, 1]`` images (the clean preset does not resize 299 px)."""
    return ((prepared + 1) / 2).clamp(0, 1)


def test_a_copy_built_before_new_weights_is_never_used(weights, prepared, tmp_path):
    """load_state_dict in place (another checkpoint) must not leave the fast mode scoring with the old copy."""
    extractor = load_inception(weights)
    other = load_inception(tiny_fid_inception(tmp_path, seed=1)["weights"])
    with torch.inference_mode():
        first = extractor.forward_low_precision(prepared, torch.bfloat16)
        copy_before = extractor._low_precision_net(torch.bfloat16)
        assert extractor._low_precision_net(torch.bfloat16) is copy_before  # cached while nothing changes
    extractor.net.load_state_dict(other.net.state_dict())
    with torch.inference_mode():
        second = extractor.forward_low_precision(prepared, torch.bfloat16)
        expected = other.forward_low_precision(prepared, torch.bfloat16)
    assert extractor._low_precision_net(torch.bfloat16) is not copy_before
    assert not torch.equal(first, second)
    torch.testing.assert_close(second, expected, rtol=0, atol=0)


def test_weights_loaded_under_inference_mode_are_tracked_by_content(weights, prepared, tmp_path):
    """Loaded inside ``torch.inference_mode`` the tensors have no version counter and ``load_state_dict`` keeps
    their storage: the copy must still be rebuilt."""
    other_weights = tiny_fid_inception(tmp_path, seed=1)["weights"]
    with torch.inference_mode():
        extractor = load_inception(weights)
        assert next(extractor.net.parameters()).is_inference()
        first = extractor.forward_low_precision(prepared, torch.bfloat16)
        other = load_inception(other_weights)
        extractor.net.load_state_dict(other.net.state_dict())
        second = extractor.forward_low_precision(prepared, torch.bfloat16)
        expected = other.forward_low_precision(prepared, torch.bfloat16)
    assert not torch.equal(first, second)
    torch.testing.assert_close(second, expected, rtol=0, atol=0)


def test_threads_sharing_a_metric_build_one_copy(weights, prepared):
    extractor = load_inception(weights)
    barrier, results, errors = threading.Barrier(4), [], []

    def work() -> None:
        try:
            barrier.wait(timeout=60)
            with torch.inference_mode():
                results.append((extractor._low_precision_net(torch.bfloat16),
                                extractor.forward_low_precision(prepared, torch.bfloat16)))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors and len(results) == 4
    assert len({id(net) for net, _ in results}) == 1
    for _, features in results[1:]:
        torch.testing.assert_close(features, results[0][1], rtol=0, atol=0)


def test_fast_mode_checks_its_input_before_building_anything(weights):
    extractor = load_inception(weights)
    with pytest.raises(ValueError, match=r"expected prepared input \(B, 3, 299, 299\)"):
        extractor.forward_low_precision(torch.zeros(1, 3, 224, 224), torch.bfloat16)
    assert extractor._low_precision == {}


def test_inception_score_in_fast_mode_uses_the_exact_classifier(weights, prepared):
    """IS's logits come from the float32 ``fc`` on the fast features: only the features are low precision."""
    metric = rk.load("inception-score", weights=weights, dtype="bf16")
    features = torch.cat(list(metric.iter_features(_to_images(prepared))))
    logits = metric.extractor.logits_unbiased(features)
    assert logits.dtype == torch.float32 and logits.shape == (2, 1008)
    assert metric.extractor.net.fc.weight.dtype == torch.float32
