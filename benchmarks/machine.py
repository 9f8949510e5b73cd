"""Facts about this machine that decide whether the fast (bf16) mode can be fast: print them, or import them.

CPU: model name (``lscpu`` / ``/proc/cpuinfo``), the ISA flags that give native bf16/fp16 matmuls
(AVX512-BF16, AMX-BF16/AMX-TILE, AVX512-FP16, AMX-FP16), torch's CPU capability and oneDNN's own probe.
Without AVX512-BF16 or AMX, oneDNN emulates bf16 and autocast runs slower than float32.
GPU: every CUDA device with its name, memory and bf16 support.

Usage: ``python benchmarks/machine.py`` (one fact per line; ``--json`` for a dict).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16", "amx_fp16", "avx512f", "avx2")


def cpu_model() -> str:
    """The CPU model name (``lscpu``'s "Model name", else ``/proc/cpuinfo``, else ``platform``)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        match = re.search(r"^Model name:\s*(.+)$", out, re.MULTILINE)
        if match:
            return match.group(1).strip()
    except (OSError, subprocess.SubprocessError):
        pass
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The bf16/fp16-relevant flags this CPU reports (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return []
    found = re.findall(r"^flags\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
    flags = set(found[0].split()) if found else set()
    return [flag for flag in BF16_FLAGS if flag in flags]


def facts() -> dict[str, Any]:
    """Everything above as a dict."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    gpus = [{"name": torch.cuda.get_device_name(i),
             "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
             "bf16": torch.cuda.is_bf16_supported()} for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_native_bf16": bool(probe()) if probe is not None else None,
        "torch": torch.__version__,
        "gpus": gpus,
    }


def describe() -> list[str]:
    """One line per fact, for the header of a results file."""
    f = facts()
    native = {True: "yes", False: "NO (emulated: bf16 slower than fp32)", None: "unknown"}[f["onednn_native_bf16"]]
    lines = [f"CPU: {f['cpu_model']}, {f['logical_cpus']} logical CPUs; bf16-relevant flags: "
             f"{', '.join(f['cpu_flags']) or 'none'}; torch CPU capability {f['torch_cpu_capability']}; "
             f"native bf16 matmul (oneDNN): {native}", f"torch {f['torch']}"]
    lines += [f"GPU {i}: {g['name']}, {g['memory_gib']} GiB, bf16 {'yes' if g['bf16'] else 'no'}"
              for i, g in enumerate(f["gpus"])] or ["GPU: none"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print a JSON dict instead of lines")
    args = parser.parse_args()
    print(json.dumps(facts(), indent=2) if args.json else "\n".join(describe()))


if __name__ == "__main__":
    main()
