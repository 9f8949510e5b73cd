"""Exact float32 during rewardkit's exact-mode forwards, whatever the caller set for TF32 or bf16 matmuls.

PyTorch lets float32 convolutions and matrix products run in a lower internal precision, process-wide:

* cuDNN convolutions run in TF32 by default on Ampere and newer GPUs (``torch.backends.cudnn.allow_tf32``
  is True out of the box). On an H200 this moved FID-Inception pool3 features by up to 0.105 from CPU
  float32 (6.1e-05 with TF32 off) and PickScore-sized scores by 1.5e-04 (1.9e-06 off): the ViT patch
  embedding is a convolution (``benchmarks/results/gpu.md``);
* ``torch.set_float32_matmul_precision("high" | "medium")`` (training scripts and Lightning set it) turns on
  TF32 matmuls on CUDA and, since torch 2.9, bf16 matmuls through oneDNN on CPUs that have them.

A reward's exact mode promises the reference's float32 numbers on every machine, so
:func:`ieee_float32` pins IEEE float32 for the duration of an exact forward and restores the caller's
settings afterwards. The settings are process-wide, so the pin is reference-counted under a lock: threads
that overlap share one pin, and the last one out restores what the first one in found. While a pin is held,
other float32 work in the process runs in IEEE float32 too (slower, never less precise).

``REWARDKIT_KEEP_FP32_PRECISION=1`` leaves the caller's settings alone (exact mode then inherits TF32 / bf16
matmuls: faster on GPUs, not the reference's numbers).
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Iterator

import torch

__all__ = ["ieee_float32", "KEEP_ENV"]

KEEP_ENV = "REWARDKIT_KEEP_FP32_PRECISION"

# torch >= 2.9 has per-backend ``fp32_precision`` knobs (oneDNN included); older versions only the two
# legacy switches. Each entry: (backend object, attribute, value that means IEEE float32).
_FINE_GRAINED = (("cuda", "matmul"), ("cudnn", "conv"), ("cudnn", "rnn"), ("mkldnn", "matmul"),
                 ("mkldnn", "conv"), ("mkldnn", "rnn"))

_lock = threading.Lock()
_depth = 0
_saved: list[tuple[Any, str, Any]] = []


def _knobs() -> list[tuple[Any, str, Any]]:
    """The (object, attribute, IEEE value) settings this torch has."""
    knobs = []
    for backend, op in _FINE_GRAINED:
        target = getattr(getattr(torch.backends, backend, None), op, None)
        if target is not None and hasattr(target, "fp32_precision"):
            knobs.append((target, "fp32_precision", "ieee"))
    if not knobs:  # torch < 2.9
        knobs = [(torch.backends.cudnn, "allow_tf32", False), (torch.backends.cuda.matmul, "allow_tf32", False)]
    return knobs


def _pin() -> None:
    _saved.clear()
    for target, attribute, ieee in _knobs():
        _saved.append((target, attribute, getattr(target, attribute)))
        setattr(target, attribute, ieee)


def _restore() -> None:
    for target, attribute, value in reversed(_saved):
        setattr(target, attribute, value)
    _saved.clear()


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """Run the block with IEEE float32 convolutions and matmuls on every backend; restore afterwards.

    Re-entrant and thread-safe (reference-counted). A no-op with ``REWARDKIT_KEEP_FP32_PRECISION=1``.
    """
    global _depth
    if os.environ.get(KEEP_ENV, "") not in ("", "0"):
        yield
        return
    with _lock:
        if _depth == 0:
            _pin()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _restore()
