"""Helpers shared by the tiny-checkpoint builders of every family."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["check_layout", "save_hf_model", "save_safetensors", "spread_weights"]


def check_layout(layout: str, allowed: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``layout`` is one of ``allowed``."""
    if layout not in allowed:
        raise ValueError(f"unknown layout {layout!r}; choose one of {allowed}")


def spread_weights(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every matrix with a larger spread so that every input moves the output.

    Library initialisers (std 0.02 and less) make tiny towers nearly input-independent, and a parity
    test on such weights proves little (DESIGN.md: random weights must be non-degenerate).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2 and "embedding" not in name:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``state`` (contiguous, detached) to ``path`` as safetensors, creating parent folders."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def save_hf_model(model: torch.nn.Module, folder: str | Path) -> Path:
    """``model.save_pretrained(folder)`` on every process.

    In transformers 5, ``save_pretrained`` writes nothing on ranks other than 0 once ``torch.distributed``
    is initialised (``should_save_on_this_rank``), but every rank of a multi-process run builds its own
    tiny folder; this instance-level override makes the rank write its files.
    """
    folder = Path(folder)
    model.should_save_on_this_rank = lambda is_main_process: True
    try:
        model.save_pretrained(str(folder))
    finally:
        del model.should_save_on_this_rank
    return folder
