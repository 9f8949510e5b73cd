"""A stand-in feature extractor for testing distribution-metric plumbing without a network.

``PixelFeatures`` satisfies the ``FeatureExtractor`` contract (picklable ``ImagePrep``, frozen module,
``identity()``) with a fixed random projection of 8×8 area-averaged pixels, so streaming, merging,
syncing and statistics files can be tested in milliseconds. Parity tests use the real networks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rewardkit.metrics.extractor import FeatureExtractor

__all__ = ["PixelFeatures", "PixelPrep"]

_GRID = 8  # pixels per side after area averaging
_SCALE = 255.0


@dataclass(frozen=True)
class PixelPrep:
    """Area-average to ``_GRID``×``_GRID`` and map the 0-255 scale to [0, 1]."""

    preset: str = "pixels"
    size: tuple[int, int] = (_GRID, _GRID)

    def pil(self, image) -> torch.Tensor:
        array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        tensor = array.reshape(image.height, image.width, 3).permute(2, 0, 1).float()
        return self.tensor(tensor[None])[0]

    def tensor(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images.float(), self.size) / _SCALE


class PixelFeatures(FeatureExtractor):
    """Features ``(B, dim)`` = softplus of a seeded random projection of the 8×8×3 pooled pixels."""

    name = "pixel-features"

    def __init__(self, dim: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.feature_dim = dim
        self.prep = PixelPrep()
        generator = torch.Generator().manual_seed(seed)
        self.projection = torch.nn.Parameter(torch.randn(3 * _GRID * _GRID, dim, generator=generator), requires_grad=False)
        self.weights_sha256 = f"seed-{seed}"

    def forward(self, prepared: torch.Tensor) -> torch.Tensor:
        return F.softplus(prepared.flatten(1) @ self.projection)
