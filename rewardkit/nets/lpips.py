"""LPIPS v0.1 network (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric").

Upstream: richzhang/PerceptualSimilarity, ``lpips/pretrained_networks.py`` (trunk slices) and
``lpips/lpips.py`` (``ScalingLayer``, ``NetLinLayer``, ``LPIPS.forward``), as released in ``lpips`` 0.1.4.

The module and parameter names equal upstream's ``lpips.LPIPS(version="0.1").state_dict()`` minus its
duplicate ``lins.*`` entries, which is exactly the layout of DiffSynth-Studio's merged
``LPIPS/{alexnet,vgg,squeezenet}.safetensors``:

* ``scaling_layer.shift`` / ``scaling_layer.scale``: ``(1, 3, 1, 1)`` buffers;
* ``net.slice{K}.{i}.*``: torchvision ``features[i]`` of the trunk, grouped into upstream's slices;
* ``lin{K}.model.1.weight``: ``(1, C_K, 1, 1)`` linear heads (``model.0`` is a Dropout).

The distance between ``x`` and ``y`` in ``[-1, 1]`` is, summed over the tapped layers ``K``,
``mean_hw(lin_K((n(f_K(x)) - n(f_K(y)))**2))`` with ``n(f) = f / (sqrt(sum_c f**2) + 1e-10)``.
Architecture only: no file paths, no downloads. Freshly built trunks have PyTorch's default conv
initialisation (not ImageNet weights); load a checkpoint with ``rewardkit.metrics.lpips.load_lpips``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LPIPS_SHIFT", "LPIPS_SCALE", "NORMALIZE_EPS", "TRUNKS", "TrunkSpec", "LPIPSNetwork", "trunk_spec",
           "unit_normalize"]

# ImageNet mean / std written in [-1, 1] units (lpips/lpips.py ScalingLayer, v0.1).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
# Added to the channel L2 norm before dividing (lpips/__init__.py normalize_tensor). torchmetrics
# instead uses sqrt(sum x**2 + 1e-8) (functional/image/lpips.py _normalize_tensor).
NORMALIZE_EPS = 1e-10


@dataclass(frozen=True)
class TrunkSpec:
    """One LPIPS trunk.

    Attributes:
        torchvision_name: the ``torchvision.models`` builder whose ``features`` are the trunk.
        slices: half-open ``features`` index ranges; the output of each slice is one tapped layer.
        channels: channel count of each tapped layer (= input channels of its linear head).
        min_size: smallest input height / width the slices accept (smaller inputs pool to nothing).
    """

    torchvision_name: str
    slices: tuple[tuple[int, int], ...]
    channels: tuple[int, ...]
    min_size: int


# lpips/pretrained_networks.py: alexnet relu1..relu5, vgg16 relu1_2..relu5_3, squeezenet1_1 relu1..relu7.
TRUNKS: dict[str, TrunkSpec] = {
    "alex": TrunkSpec("alexnet", ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12)), (64, 192, 384, 256, 256), 31),
    "vgg": TrunkSpec("vgg16", ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30)), (64, 128, 256, 512, 512), 16),
    "squeeze": TrunkSpec(
        "squeezenet1_1",
        ((0, 2), (2, 5), (5, 8), (8, 10), (10, 11), (11, 12), (12, 13)),
        (64, 128, 256, 384, 384, 512, 512),
        17,
    ),
}


def trunk_spec(net: str) -> TrunkSpec:
    """The :class:`TrunkSpec` of ``net``.

    Raises:
        ValueError: ``net`` is not one of ``alex``, ``vgg``, ``squeeze``.
    """
    if net not in TRUNKS:
        raise ValueError(f"unknown LPIPS net {net!r}; choose one of {sorted(TRUNKS)} (lpips' net= names)")
    return TRUNKS[net]


def unit_normalize(features: torch.Tensor, eps: float = NORMALIZE_EPS) -> torch.Tensor:
    """Divide ``(B, C, H, W)`` features by their channel L2 norm plus ``eps`` (lpips ``normalize_tensor``)."""
    return features / (features.square().sum(dim=1, keepdim=True).sqrt() + eps)


def _torchvision_features(name: str) -> nn.Sequential:
    """``torchvision.models.<name>(weights=None).features`` without initialising the classifier.

    The model is built on the meta device (vgg16's 120M-parameter classifier would take over a second
    to initialise), then only ``features`` is materialised with PyTorch's default layer initialisation.
    """
    import torchvision

    with torch.device("meta"):
        features = getattr(torchvision.models, name)(weights=None).features
    features = features.to_empty(device="cpu")
    with torch.no_grad():
        for module in features.modules():
            if isinstance(module, nn.Conv2d):
                module.reset_parameters()
    return features


class ScalingLayer(nn.Module):
    """``(x - shift) / scale`` with the v0.1 constants; ``x`` is ``(B, 3, H, W)`` in ``[-1, 1]``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT)[None, :, None, None])
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE)[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class Trunk(nn.Module):
    """The torchvision trunk split into ``slice1..sliceN``; keeps torchvision's ``features`` indices as names."""

    def __init__(self, spec: TrunkSpec) -> None:
        super().__init__()
        features = _torchvision_features(spec.torchvision_name)
        self.num_slices = len(spec.slices)
        for number, (start, stop) in enumerate(spec.slices, start=1):
            block = nn.Sequential()
            for index in range(start, stop):
                block.add_module(str(index), features[index])
            self.add_module(f"slice{number}", block)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, 3, H, W)`` scaled input -> the output of every slice, ``(B, C_K, H_K, W_K)`` each."""
        taps = []
        for number in range(1, self.num_slices + 1):
            x = getattr(self, f"slice{number}")(x)
            taps.append(x)
        return taps


class LinearHead(nn.Module):
    """lpips ``NetLinLayer``: ``Dropout`` then a bias-free 1x1 conv ``C -> 1`` (key ``model.1.weight``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPSNetwork(nn.Module):
    """LPIPS v0.1 with an ``alex``, ``vgg`` or ``squeeze`` trunk (lpips ``LPIPS(version="0.1")``).

    Args:
        net: ``"alex"`` (default upstream), ``"vgg"`` or ``"squeeze"``.

    Raises:
        ValueError: an unknown ``net``.
    """

    def __init__(self, net: str = "alex") -> None:
        super().__init__()
        self.spec = trunk_spec(net)
        self.net_name = net
        self.scaling_layer = ScalingLayer()
        self.net = Trunk(self.spec)
        for index, channels in enumerate(self.spec.channels):
            self.add_module(f"lin{index}", LinearHead(channels))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Trunk activations of ``x`` ``(B, 3, H, W)`` in ``[-1, 1]``, one ``(B, C_K, H_K, W_K)`` per layer."""
        return self.net(self.scaling_layer(x))

    def distance(self, feats_x: list[torch.Tensor], feats_y: list[torch.Tensor],
                 size: tuple[int, int] | None = None) -> torch.Tensor:
        """LPIPS from two lists of trunk activations (see :meth:`features`).

        Args:
            feats_x: activations of the first images.
            feats_y: activations of the second images, same shapes.
            size: ``None`` for the score; ``(H, W)`` for lpips' ``spatial=True`` map, each layer's map
                upsampled bilinearly (``align_corners=False``) to ``(H, W)`` before the sum.

        Returns:
            ``(B,)`` distances (``size=None``) or a ``(B, 1, H, W)`` map, in the activations' dtype.
        """
        total: torch.Tensor | None = None
        for index, (fx, fy) in enumerate(zip(feats_x, feats_y)):
            layer = getattr(self, f"lin{index}")((unit_normalize(fx) - unit_normalize(fy)) ** 2)
            if size is None:
                layer = layer.mean(dim=(2, 3), keepdim=True)
            else:
                layer = F.interpolate(layer, size=tuple(size), mode="bilinear", align_corners=False)
            total = layer if total is None else total + layer
        assert total is not None  # every trunk has at least one layer
        return total.flatten() if size is None else total

    def forward(self, x: torch.Tensor, y: torch.Tensor, spatial: bool = False) -> torch.Tensor:
        """LPIPS between ``x`` and ``y``, both ``(B, 3, H, W)`` in ``[-1, 1]``.

        Returns:
            ``(B,)`` distances, or the ``(B, 1, H, W)`` map when ``spatial`` is True.
        """
        size = (x.shape[-2], x.shape[-1]) if spatial else None
        return self.distance(self.features(x), self.features(y), size)
