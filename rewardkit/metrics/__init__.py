"""Set-level and paired metrics, plus DiffSynth-Studio's ``diffsynth.metrics`` names.

``from rewardkit.metrics import PickScoreMetric, ModelConfig`` works as ``from diffsynth.metrics import ...``
did (see ``rewardkit.compat.diffsynth``). Every public name is resolved lazily through ``_LAZY``, so
``import rewardkit.metrics`` imports no model library; the defining module is imported on first access.
To add a name, add one ``"Name": "module.path"`` entry to ``_LAZY``.
"""

from __future__ import annotations

import importlib
from typing import Any

_DIFFSYNTH = "rewardkit.compat.diffsynth"

# Public name -> the module that defines it.
_LAZY: dict[str, str] = {
    "ModelConfig": _DIFFSYNTH,
    "Metric": _DIFFSYNTH,
    "PickScoreMetric": _DIFFSYNTH,
    "CLIPMetric": _DIFFSYNTH,
    "HPSv2Metric": _DIFFSYNTH,
    "AestheticMetric": _DIFFSYNTH,
    "BioCLIPMetric": _DIFFSYNTH,
    "FIDMetric": _DIFFSYNTH,
    "LPIPSMetric": _DIFFSYNTH,
    "ImageRewardMetric": "rewardkit.compat.diffsynth_imagereward",
    "HPSv3Metric": "rewardkit.compat.diffsynth_hpsv3",
    "UnifiedReward2Metric": "rewardkit.compat.diffsynth_unified_reward",
    "UnifiedRewardEditMetric": "rewardkit.compat.diffsynth_unified_reward",
    "QwenImageBenchMetric": "rewardkit.compat.diffsynth_qwen_image_bench",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
