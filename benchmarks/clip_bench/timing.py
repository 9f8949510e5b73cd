"""Interleaved timing of several modes, medians, and the CPU load of other processes meanwhile."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


class CpuContention:
    """CPU time used by *other* processes while a block runs, in cores (from /proc/stat)."""

    def __enter__(self) -> CpuContention:
        self._busy0, self._self0, self._wall0 = _system_busy_s(), _self_cpu_s(), time.perf_counter()
        self.other_cores = float("nan")
        return self

    def __exit__(self, *exc: Any) -> None:
        wall = time.perf_counter() - self._wall0
        busy, own = _system_busy_s() - self._busy0, _self_cpu_s() - self._self0
        if wall > 0 and busy == busy:
            self.other_cores = max(0.0, (busy - own) / wall)


def _system_busy_s() -> float:
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class Mode:
    key: str
    label: str
    run: Callable[[], Any]
    setup: Callable[[], None] = lambda: None
    times: list[float] = field(default_factory=list)
    scores: np.ndarray | None = None


def as_numpy(scores: Any) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        return scores.detach().float().cpu().numpy().astype(np.float64)
    return np.asarray(scores, dtype=np.float64)


def time_modes(modes: list[Mode], repeats: int) -> None:
    """One warm-up call per mode (its scores are kept), then ``repeats`` interleaved rounds."""
    with torch.inference_mode():
        for mode in modes:
            mode.setup()
            mode.scores = as_numpy(mode.run())
        for _ in range(repeats):
            for mode in modes:
                mode.setup()
                start = time.perf_counter()
                mode.run()
                mode.times.append(time.perf_counter() - start)


def median_s(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def native_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels here (AVX512-BF16 / AMX); without them bf16 GEMMs are emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
