"""Precision policy: dtype parsing and device-agnostic autocast."""

from __future__ import annotations

import pytest
import torch

from rewardkit.precision import autocast_for, dtype_name, parse_dtype


@pytest.mark.parametrize(("given", "expected"), [(None, None), ("fp32", None), (torch.float32, None),
                                                  ("bf16", torch.bfloat16), ("BF16", torch.bfloat16),
                                                  ("torch.float16", torch.float16), (torch.float16, torch.float16)])
def test_parse_dtype(given, expected) -> None:
    assert parse_dtype(given) is expected


def test_unknown_dtypes_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("int8")
    with pytest.raises(ValueError, match="unsupported dtype"):
        parse_dtype(torch.float64)


def test_autocast_for_cpu_runs_matmuls_in_bf16() -> None:
    a = torch.randn(4, 4)
    with autocast_for("cpu", torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
    with autocast_for("cpu", None):
        assert (a @ a).dtype == torch.float32
    assert dtype_name(None) == "fp32" and dtype_name(torch.bfloat16) == "bf16"


def test_slow_cpu_autocast_warns_once(monkeypatch) -> None:
    import rewardkit.precision as precision

    monkeypatch.setattr(precision, "cpu_supports", lambda dtype: False)
    monkeypatch.setattr(precision, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="slower than float32"):
        with autocast_for("cpu", torch.bfloat16):
            pass
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with autocast_for("cpu", torch.bfloat16):  # second time: silent
            pass


def test_exact_mode_stays_exact_inside_a_callers_autocast(tiny_root) -> None:
    """A bf16 training step around an exact reward must not turn it (or its prompt cache) into bf16."""
    import rewardkit.testing as rkt

    images = rkt.random_images(3, 32, 32, seed=4)
    reward = rkt.load_tiny("pickscore", tiny_root / "exact-in-autocast")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = reward(images, "a red car")  # fills the prompt cache inside the caller's autocast
    reward.prompt_cache.clear()
    outside = reward(images, "a red car")
    torch.testing.assert_close(inside, outside, rtol=0, atol=0)
