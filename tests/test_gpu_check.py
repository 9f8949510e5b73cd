"""benchmarks/gpu_check.py: its CPU smoke mode (``--device cpu --tiny``) runs every model and dtype and writes
the table. Nothing here is timed or asserted about speed; the GPU rows need a CUDA machine."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_tiny_smoke_mode_covers_every_model(gpu_check, tmp_path):
    # fp16 shares bf16's code path (only the dtype differs); two dtypes keep the run short on 2 cores.
    args = gpu_check.parse_args(["--device", "cpu", "--tiny", "--batch", "2", "--repeats", "1",
                                 "--dtypes", "fp32", "bf16", "--out", str(tmp_path / "gpu.md")])
    rows = gpu_check.run(args)
    assert {(r["model"], r["dtype"]) for r in rows} == {(m, d) for m in gpu_check.MODELS for d in ("fp32", "bf16")}
    for row in rows:
        assert math.isfinite(row["max_abs"]) and row["images_s"] > 0, row
        if row["dtype"] == "fp32":
            assert row["max_abs"] <= 1e-5, row  # the same CPU fp32 computation as the reference
    assert any(r["max_abs"] > 0 for r in rows if r["dtype"] == "bf16")  # low precision really ran
    text = gpu_check.render(rows, args)
    assert "| pickscore | bf16 | sdpa |" in text and "GPU: none" in text


def test_cuda_without_a_gpu_is_refused(gpu_check, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--device", "cuda"])
