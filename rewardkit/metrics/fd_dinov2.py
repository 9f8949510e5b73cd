"""FD-DINOv2 (Stein et al., NeurIPS 2023, "Exposing flaws of generative model evaluation metrics").

The Fréchet distance of ``rewardkit.metrics.fid`` on DINOv2 ViT-L/14 CLS features (final LayerNorm,
1024-d) with dgm-eval's preprocessing (torchvision ``Resize((224, 224), BICUBIC)`` on PIL, ImageNet
mean/std; ``rewardkit.metrics.dinov2_features``), as layer6ai-labs/dgm-eval computes it. The distance
uses the symmetric eigen-form instead of dgm-eval's ``scipy.linalg.sqrtm`` (equal to ~1e-11 on full-rank
statistics, and it does not fail on rank-deficient ones).
"""

from __future__ import annotations

from typing import Any

from rewardkit.metrics.fid import FrechetDistance

__all__ = ["load_fd_dinov2"]


def load_fd_dinov2(weights: Any = None, device: Any = None, dtype: Any = None, *, reference: Any = None,
                   foreign_reference: bool = False, config: Any = None, **options: Any) -> FrechetDistance:
    """FD-DINOv2 on ``facebook/dinov2-large``.

    ``weights``: an HF ``Dinov2Model`` folder or spec, or a torch.hub ``dinov2_vitl14_pretrain.pth`` file / URL
    (mapped to the HF layout by an explicit key map; ``config=`` overrides the ViT-L/14 architecture).
    """
    from rewardkit.metrics.dinov2_features import load_dinov2_extractor

    # The extractor owns its precision (its forward sets autocast), so it gets the dtype too.
    extractor = load_dinov2_extractor(weights, device=device, dtype=dtype, config=config)
    metric = FrechetDistance(extractor, reference=reference,
                             foreign_reference=foreign_reference, name="fd-dinov2", dtype=dtype, **options)
    return metric.to(device) if device is not None else metric
