"""What every ``rewardkit verify`` check shares: the result row, the reference images and prompts, helpers."""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["Check", "reference_images", "reference_pil_images", "REFERENCE_PROMPTS", "version_of", "max_abs_diff",
           "json_option", "UINT8_LEVELS"]

REFERENCE_SEED = 20240517  # fixed: the reference images are the same on every machine
REFERENCE_COUNT, REFERENCE_HEIGHT, REFERENCE_WIDTH = 4, 96, 80  # small, non-square (resize paths run)
UINT8_LEVELS = 255.0


@dataclass
class Check:
    """One row of the verification table.

    Attributes:
        reward: the registry name checked.
        upstream: the reference implementation and its version ("" when not checked).
        max_abs_diff: max |rewardkit - upstream| over the reference images (None when not checked).
        tolerance: the largest accepted difference (None when not checked).
        passed: True / False, or None when the check could not run.
        note: what was compared, or exactly why it could not be checked.
    """

    reward: str
    upstream: str
    max_abs_diff: float | None
    tolerance: float | None
    passed: bool | None
    note: str


def reference_images(count: int = REFERENCE_COUNT, height: int = REFERENCE_HEIGHT,
                     width: int = REFERENCE_WIDTH) -> torch.Tensor:
    """Deterministic, uint8-valued smooth colour images: float32 ``(count, 3, height, width)`` in ``[0, 1]``."""
    generator = torch.Generator().manual_seed(REFERENCE_SEED)
    coarse = torch.rand(count, 3, 5, 4, generator=generator, dtype=torch.float64)
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    return (smooth.clamp(0, 1) * UINT8_LEVELS).round().div(UINT8_LEVELS).to(torch.float32)


# Packages whose pinned dependencies are older than this project's: install them without.
_NO_DEPS = {"image-reward": "image-reward==1.5", "hpsv2": "hpsv2==1.2.0"}


def version_of(package: str) -> str:
    """``"<package> <installed version>"``.

    Raises:
        ImportError: the package is not installed, with the command that installs it.
    """
    try:
        return f"{package} {importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        install = f"pip install --no-deps {_NO_DEPS[package]}" if package in _NO_DEPS else f"pip install {package}"
        raise ImportError(f"the upstream package {package} is not installed ({install}); nothing was compared") from None


def max_abs_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| over all elements, in float64."""
    return float((ours.double().flatten() - theirs.double().flatten()).abs().max())


# One prompt per reference image (the prompt-conditioned rewards score image i against prompt i).
REFERENCE_PROMPTS = ("a photograph of a red fox in the snow", "a bowl of fruit on a wooden table",
                     "a watercolor painting of mountains at dawn", "a close-up of an owl, studio lighting")


def reference_pil_images() -> list:
    """:func:`reference_images` as 8-bit RGB PIL images (what the upstream packages and the exact paths take)."""
    from rewardkit.vlm.judge import tensor_to_pil

    return tensor_to_pil(reference_images())  # exact: the images are k / 255 values


def json_option(value: Any) -> Any:
    """A ``--set`` option that may name a JSON file (``config=cfg.json``): its content; anything else unchanged."""
    return json.loads(Path(value).read_text()) if isinstance(value, (str, Path)) else value
