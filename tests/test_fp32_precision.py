"""Exact mode pins IEEE float32 kernels (rewardkit.fp32_precision), whatever the caller set process-wide.

The GPU check (benchmarks/results/gpu.md) measured the default TF32 convolutions of CUDA moving FID-Inception
features by 0.105 and PickScore-sized scores by 1.5e-04; on CPU, ``torch.set_float32_matmul_precision("medium")``
routes float32 matmuls through oneDNN bf16 where the CPU has it. These tests hold the guard to its contract on
any machine: the settings seen *inside* an exact forward are IEEE, the caller's come back afterwards, overlapping
threads share one pin, and exact scores under a caller's "medium" equal those under "highest" bit for bit.
"""

from __future__ import annotations

import threading

import pytest
import torch

from rewardkit.fp32_precision import KEEP_ENV, _knobs, ieee_float32
from rewardkit.precision import autocast_for


def _settings() -> list:
    return [getattr(target, attribute) for target, attribute, _ in _knobs()]


def _ieee() -> list:
    return [ieee for _, _, ieee in _knobs()]


def _all_knobs() -> list[tuple[object, str]]:
    """Every precision setting the process has, the root one included (restored exactly, with one API)."""
    knobs = [(target, attribute) for target, attribute, _ in _knobs()]
    if hasattr(torch.backends, "fp32_precision"):
        knobs.insert(0, (torch.backends, "fp32_precision"))
    return knobs


@pytest.fixture()
def medium_precision():
    """The caller's process-wide setting a Lightning / diffusers training script often makes. Restored knob by
    knob afterwards: restoring through the legacy calls would leave other knobs than the ones found (torch warns
    against mixing its two APIs), and later tests build checkpoints whose bytes depend on them."""
    saved = [(target, attribute, getattr(target, attribute)) for target, attribute in _all_knobs()]
    torch.set_float32_matmul_precision("medium")
    torch.backends.cudnn.allow_tf32 = True
    yield _settings()
    for target, attribute, value in reversed(saved):
        setattr(target, attribute, value)
    assert [getattr(t, a) for t, a, _ in saved] == [value for _, _, value in saved]


def test_the_guard_pins_ieee_inside_and_restores_the_callers_settings(medium_precision):
    assert medium_precision != _ieee()  # the fixture really set a lower precision
    with ieee_float32():
        assert _settings() == _ieee()
        with ieee_float32():  # re-entrant: the inner exit must not restore early
            pass
        assert _settings() == _ieee()
    assert _settings() == medium_precision
    assert torch.get_float32_matmul_precision() == "medium"


def test_the_guard_restores_after_an_exception(medium_precision):
    with pytest.raises(RuntimeError, match="boom"):
        with ieee_float32():
            raise RuntimeError("boom")
    assert _settings() == medium_precision


def test_overlapping_threads_share_one_pin_and_the_last_one_out_restores(medium_precision):
    first_in, second_in, first_out, second_may_leave = (threading.Event() for _ in range(4))
    seen: dict[str, list] = {}

    def first() -> None:
        with ieee_float32():
            first_in.set()
            second_in.wait(10)
        seen["after first left"] = _settings()  # the second thread is still inside
        first_out.set()

    def second() -> None:
        first_in.wait(10)
        with ieee_float32():
            second_in.set()
            second_may_leave.wait(10)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    assert first_out.wait(10)
    second_may_leave.set()
    for thread in threads:
        thread.join(10)
    assert seen["after first left"] == _ieee()
    assert _settings() == medium_precision


def test_keep_env_leaves_the_callers_settings(medium_precision, monkeypatch):
    monkeypatch.setenv(KEEP_ENV, "1")
    with ieee_float32():
        assert _settings() == medium_precision


def test_exact_mode_autocast_for_pins_and_the_fast_mode_does_not(medium_precision):
    with autocast_for("cpu", None):
        assert _settings() == _ieee()
    with autocast_for("cpu", torch.bfloat16):
        assert _settings() == medium_precision
    assert _settings() == medium_precision


def test_exact_reward_scores_ignore_the_callers_matmul_precision(tmp_path, medium_precision):
    import rewardkit.testing as rkt

    reward = rkt.load_tiny("pickscore", tmp_path)
    images = rkt.random_images(3, 48, 40, seed=1)
    prompts = ["a red fox", "a blue bird", "a green frog"]
    inside: list[list] = []
    linear = next(m for m in reward.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_pre_hook(lambda *_: inside.append(_settings()))
    with torch.inference_mode():
        under_medium = reward(images, prompts)
        reward.prompt_cache.clear()
        torch.backends.mkldnn.matmul.fp32_precision = "ieee"  # what "highest" means for oneDNN
        under_highest = reward(images, prompts)
    assert inside and all(settings == _ieee() for settings in inside)
    assert torch.equal(under_medium, under_highest)


def test_fid_features_run_under_the_pin(tmp_path, medium_precision):
    import rewardkit.testing as rkt

    metric = rkt.load_tiny("fid", tmp_path)
    inside: list[list] = []
    network = next(m for m in metric.modules() if isinstance(m, torch.nn.Conv2d))
    network.register_forward_pre_hook(lambda *_: inside.append(_settings()))
    metric.update(rkt.random_images(2, 64, 64, seed=2), real=True)
    assert inside and all(settings == _ieee() for settings in inside)
    assert _settings() == medium_precision
