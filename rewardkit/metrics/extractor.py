"""The contract between a distribution metric and the network that embeds its images.

A distribution metric (FID, KID, IS, CMMD, FD-DINOv2) is "embed every image, then compare two sets of
embeddings". The embedding side has two parts with different lifetimes:

* an ``ImagePrep`` (small, picklable, no weights) that turns one PIL image or a batch of tensors into
  the exact network input of the reference implementation. It runs inside ``DataLoader`` workers, so
  it must not hold the model.
* a ``FeatureExtractor`` (an ``nn.Module``, frozen, eval mode) that maps prepared input to features.

Input conventions of ``ImagePrep``:

* ``pil(image)``: one RGB ``PIL.Image`` of any size -> float32 ``(3, S_h, S_w)`` network input.
  This is the *exact* path: it reproduces the reference's resize on PIL/uint8 data.
* ``tensor(images)``: float ``(B, 3, H, W)`` on the **0-255 scale** (already quantised or not, see
  ``FeatureMetric(quantize=...)``) -> float32 ``(B, 3, S_h, S_w)`` network input on ``images.device``.
  This is the batched/GPU path; where it cannot equal ``pil`` bit for bit the gap is documented.

``identity()`` returns the metadata stored with reference statistics (``extractor``, ``preset``,
``resolution``, ``weights_sha256``), so that statistics made with another extractor or preset are
refused on load.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["ImagePrep", "FeatureExtractor"]


@runtime_checkable
class ImagePrep(Protocol):
    """Turns images into network input exactly as one reference implementation does."""

    #: Name of the resize/normalisation preset, stored with statistics (e.g. ``"clean"``).
    preset: str
    #: ``(height, width)`` of the network input.
    size: tuple[int, int]

    def pil(self, image: Any) -> torch.Tensor:
        """One RGB PIL image -> float32 ``(3, *size)`` network input."""
        ...

    def tensor(self, images: torch.Tensor) -> torch.Tensor:
        """Float ``(B, 3, H, W)`` on the 0-255 scale -> float32 ``(B, 3, *size)`` network input."""
        ...


class FeatureExtractor(nn.Module):
    """Base class: a frozen network with its ``ImagePrep``.

    Subclasses set ``name`` and ``feature_dim``, assign ``self.prep`` and implement ``forward``.
    Optional extra heads (e.g. Inception's ``logits_unbiased`` for the Inception Score) are methods
    that take the ``forward`` output.
    """

    name: str = "extractor"
    feature_dim: int = 0
    prep: ImagePrep
    #: sha256 of the weight file the extractor was loaded from ("" when built in memory).
    weights_sha256: str = ""

    def forward(self, prepared: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """Prepared input ``(B, 3, *prep.size)`` -> float32 features ``(B, feature_dim)``."""
        raise NotImplementedError

    def forward_low_precision(self, prepared: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The fast mode's forward (``dtype`` bf16/fp16), called under autocast for ``dtype``.

        By default the exact network under the caller's autocast. Extractors whose network gains from holding its
        weights in ``dtype`` once override this (the FID Inception: ``InceptionExtractor``).

        Returns:
            float32 ``(B, feature_dim)`` features, as :meth:`forward`.
        """
        return self(prepared)

    def train(self, mode: bool = True) -> FeatureExtractor:
        # Feature extractors are always in eval mode: BatchNorm in train mode breaks FID
        # (pytorch-fid #118) and dropout would make features random.
        return super().train(False)

    def freeze(self) -> FeatureExtractor:
        """Eval mode, no parameter requires grad; returns ``self``."""
        self.eval()
        self.requires_grad_(False)
        return self

    def identity(self) -> dict[str, str]:
        """Metadata that must match between statistics files that are compared."""
        height, width = self.prep.size
        return {
            "extractor": self.name,
            "preset": self.prep.preset,
            "resolution": f"{height}x{width}",
            "weights_sha256": self.weights_sha256,
        }
