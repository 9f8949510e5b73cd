"""Checks of a composition: its options (weights, normalisation, affine constants, NaN policy), refused with
one-line errors before anything loads, and each part's output shape.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Mapping

import torch

__all__ = ["check_options", "checked_scores", "takes_context"]


def takes_context(method: Any) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(method).parameters.values())


def checked_scores(name: str, raw: Any, batch: int) -> torch.Tensor:
    if not isinstance(raw, torch.Tensor) or raw.shape != (batch,):
        got = tuple(raw.shape) if isinstance(raw, torch.Tensor) else type(raw).__name__
        raise ValueError(f"compose: part {name!r} returned {got}, expected a tensor of shape ({batch},)")
    return raw.float()


def finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_options(parts, weights, normalize, affine, nan_policy) -> None:
    if not parts:
        raise ValueError("compose: give at least one reward, e.g. {'pickscore': 1.0}")
    if normalize not in ("none", "zscore", "affine"):
        raise ValueError(f"compose: normalize must be 'none', 'zscore' or 'affine', got {normalize!r}")
    if nan_policy not in ("skip", "propagate"):
        raise ValueError(f"compose: nan_policy must be 'skip' or 'propagate', got {nan_policy!r}")
    for name in parts:
        if not finite_number(weights.get(name)):
            raise ValueError(f"compose: the weight of {name!r} must be a finite number, got {weights.get(name)!r}")
    if all(weights[name] == 0 for name in parts):
        raise ValueError("compose: every weight is 0; give at least one part a non-zero weight")
    if affine is not None and normalize != "affine":
        raise ValueError(f"compose: affine= is only used with normalize='affine', got normalize={normalize!r}; "
                         "drop affine= or set normalize='affine'")
    if normalize == "affine":
        check_affine(parts, affine or {})


def check_affine(parts, affine: Mapping[str, Any]) -> None:
    missing = [n for n in parts if n not in affine]
    if missing:
        raise ValueError(f"compose: normalize='affine' needs affine={{name: (shift, scale)}} for {missing}")
    unknown = [n for n in affine if n not in parts]
    if unknown:
        raise ValueError(f"compose: affine names {unknown} are not parts of the composition {list(parts)}")
    for name in parts:
        pair = affine[name]
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(finite_number(v) for v in pair)):
            raise ValueError(f"compose: affine[{name!r}] must be (shift, scale) with finite numbers, got {pair!r}")
        if pair[1] == 0:
            raise ValueError(f"compose: affine scale must be non-zero, got 0 for {name!r}")
