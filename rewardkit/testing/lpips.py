"""Tiny-seeded LPIPS checkpoints in the real formats (the architecture is fixed: full-size trunks).

``tiny_lpips(root, layout=...)`` writes random weights exactly as they ship:

* ``layout="upstream"``: the torchvision trunk file under its hub name (``alexnet-owt-7be5be79.pth``,
  ``vgg16-397923af.pth``, ``squeezenet1_1-b8a52dc0.pth``; keys ``features.<i>.*``) and the lpips v0.1 heads
  file ``<net>.pth`` (keys ``lin<K>.model.1.weight``), as richzhang/PerceptualSimilarity loads them.
  The real trunk files also hold ``classifier.*`` (ignored by LPIPS); it is left out to keep files small.
* ``layout="diffsynth"``: DiffSynth-Studio's merged ``LPIPS/{alexnet,vgg,squeezenet}.safetensors``.

Both layouts of one ``(net, seed)`` hold the same weights. Trunk weights are He-normal (activations stay
O(1) through the ReLUs, so every layer moves the score); heads are uniform in ``[0, 1)``, non-negative like
the real v0.1 heads. vgg16 is 14.7M parameters (a 59 MB trunk file): a file this process already wrote
for the same ``(net, seed)`` is reused.

Example:
    >>> import rewardkit as rk, rewardkit.testing as rkt
    >>> metric = rk.load("lpips", **rkt.tiny_lpips("/tmp/rk-tiny"))
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from rewardkit.metrics.lpips import DIFFSYNTH_FILES, TORCHVISION_TRUNK_URLS
from rewardkit.nets.lpips import LPIPSNetwork, trunk_spec
from rewardkit.testing._common import check_layout as _check_layout
from rewardkit.testing._common import save_safetensors as _save_safetensors

__all__ = ["tiny_lpips", "tiny_lpips_state", "to_torchvision_trunk", "to_lpips_heads"]

_HE_GAIN = 2.0  # He et al. 2015: weight variance 2 / fan_in keeps ReLU activations at a constant scale
_BIAS_STD = 0.1
_SLICE_KEY = re.compile(r"^net\.slice\d+\.")
_STATES: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
_WRITTEN: dict[Path, tuple[str, int]] = {}


def tiny_lpips_state(net: str = "alex", seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights in ``LPIPSNetwork``'s (= DiffSynth's) key layout; cached per ``(net, seed)``.

    Raises:
        ValueError: an unknown ``net``.
    """
    trunk_spec(net)
    if (net, seed) not in _STATES:
        network = LPIPSNetwork(net)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in network.named_parameters():
                if name.startswith("lin"):
                    param.copy_(torch.rand(param.shape, generator=generator))
                elif param.ndim > 1:
                    param.copy_(torch.randn(param.shape, generator=generator) * (_HE_GAIN / param[0].numel()) ** 0.5)
                else:
                    param.copy_(torch.randn(param.shape, generator=generator) * _BIAS_STD)
        _STATES[(net, seed)] = {k: v.detach().clone() for k, v in network.state_dict().items()}
    return dict(_STATES[(net, seed)])


def to_torchvision_trunk(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``net.slice<K>.<i>.*`` -> torchvision's ``features.<i>.*`` (the trunk file's keys)."""
    return {_SLICE_KEY.sub("features.", k): v for k, v in state.items() if _SLICE_KEY.match(k)}


def to_lpips_heads(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``lin<K>.model.1.weight`` entries (the lpips v0.1 heads file's keys)."""
    return {k: v for k, v in state.items() if k.startswith("lin")}


def _save_pth(state: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in state.items()}, path)


def _write_once(path: Path, net: str, seed: int, write: Any) -> Path:
    key = path.resolve()
    if _WRITTEN.get(key) != (net, seed) or not path.is_file():
        write(path)
        _WRITTEN[key] = (net, seed)
    return path


def tiny_lpips(root: str | Path, layout: str = "upstream", seed: int = 0, net: str = "alex") -> dict[str, Any]:
    """Write a random LPIPS checkpoint for ``net`` under ``root``; returns ``rk.load("lpips", **kwargs)`` kwargs.

    Returns:
        ``upstream``: ``{"weights": {"trunk": <trunk .pth>, "heads": <net>.pth}, "net": net}``;
        ``diffsynth``: ``{"weights": "<root>/LPIPS/<name>.safetensors", "net": net}``.

    Raises:
        ValueError: an unknown ``layout`` or ``net``.
    """
    _check_layout(layout, ("upstream", "diffsynth"))
    root = Path(root)
    state = tiny_lpips_state(net, seed)
    if layout == "diffsynth":
        path = _write_once(root / "LPIPS" / DIFFSYNTH_FILES[net], net, seed, lambda p: _save_safetensors(state, p))
        return {"weights": str(path), "net": net}
    trunk = _write_once(root / TORCHVISION_TRUNK_URLS[net].rsplit("/", 1)[-1], net, seed,
                        lambda p: _save_pth(to_torchvision_trunk(state), p))
    heads = _write_once(root / f"{net}.pth", net, seed, lambda p: _save_pth(to_lpips_heads(state), p))
    return {"weights": {"trunk": str(trunk), "heads": str(heads)}, "net": net}
