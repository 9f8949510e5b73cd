"""The LAION improved-aesthetic-predictor MLP head.

Architecture from ``christophschuhmann/improved-aesthetic-predictor`` ``simple_inference.py`` ``MLP``:
Linear(D, 1024) -> Dropout(0.2) -> Linear(1024, 128) -> Dropout(0.2) -> Linear(128, 64) ->
Dropout(0.1) -> Linear(64, 16) -> Linear(16, 1), with **no activations** (the released
``sac+logos+ava1-l14-linearMSE`` head is therefore one affine map of the embedding). Parameter names
``layers.{0,2,4,6,7}.{weight,bias}`` match the released ``.pth``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AestheticMLP"]

HIDDEN_SIZES = (1024, 128, 64, 16)  # simple_inference.py MLP
DROPOUTS = (0.2, 0.2, 0.1)


class AestheticMLP(nn.Module):
    """``(B, D)`` L2-normalised CLIP image embeddings -> ``(B,)`` aesthetic scores (about 1-10)."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        h1, h2, h3, h4 = HIDDEN_SIZES
        d1, d2, d3 = DROPOUTS
        self.layers = nn.Sequential(
            nn.Linear(input_size, h1), nn.Dropout(d1),
            nn.Linear(h1, h2), nn.Dropout(d2),
            nn.Linear(h2, h3), nn.Dropout(d3),
            nn.Linear(h3, h4),
            nn.Linear(h4, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds).squeeze(-1)
