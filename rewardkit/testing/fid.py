"""A seeded random FID Inception-v3 checkpoint in the real formats, built offline.

The FID network's architecture is fixed (full size, ~24M parameters, ~95 MB on disk), so the "tiny"
checkpoint is the real architecture with random weights, made non-degenerate as in
``reference/distribution_metrics.md`` section 1.7: random BatchNorm affine parameters, BatchNorm
running statistics calibrated on random smooth images (so every layer sees unit-scale activations),
and Mixed_7c's BatchNorm scaled down so that pool3 features have a realistic scale (mean about 0.1).

Layouts:

* ``"upstream"``: ``root/pt_inception-2015-12-05-6726825d.pth``, a ``torch.save``'d state dict with
  torchvision key names and the BatchNorm ``num_batches_tracked`` buffers (pytorch-fid's release file;
  torch-fidelity's file has the same keys without ``num_batches_tracked``). The same file loads into
  torch-fidelity / torchmetrics (``feature_extractor_weights_path=``) and pytorch-fid.
* ``"diffsynth"``: ``root/FID/model.safetensors``, the same 566 tensors (DiffSynth-Studio ``ImageMetrics``).

Example:
    >>> from rewardkit.metrics.inception import load_inception
    >>> extractor = load_inception(**tiny_fid_inception("/tmp/rk-tiny"))
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rewardkit.testing._common import check_layout as _check_layout
from rewardkit.testing._common import save_safetensors as _save_safetensors

__all__ = ["UPSTREAM_FILENAME", "DIFFSYNTH_FILENAME", "tiny_fid_inception", "build_random_fid_inception"]

UPSTREAM_FILENAME = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid release asset name
DIFFSYNTH_FILENAME = "FID/model.safetensors"  # DiffSynth-Studio/ImageMetrics path
_LAYOUTS = ("upstream", "diffsynth")
_CALIBRATION_IMAGES = 2  # random smooth images whose batch statistics become the BN running stats
_CALIBRATION_SIZE = 299
_COARSE_SIDE = 6  # smooth images = bicubic upsampling of a coarse random grid ...
_NOISE_STD = 8.0  # ... plus Gaussian pixel noise (0-255 scale), so that every layer sees some texture
_PIXEL_MAX, _PIXEL_CENTER = 255.0, 128.0  # the network input is (x - 128) / 128 of 0-255 pixels
_BN_GAMMA_RANGE = (0.5, 1.5)  # BN weight ~ U(0.5, 1.5)
_BN_BETA_STD = 0.25  # BN bias ~ N(0, 0.25): some units mostly on, some mostly off after ReLU
_FC_GAIN = 24.0  # fc weight std = gain / sqrt(2048): logits std ~4, top softmax prob 0.3-0.6 (a non-trivial IS)
_FC_BIAS_STD = 0.5
_MIXED_7C_BN_SCALE = 0.25  # pool3 mean ~0.1, max ~1-2 on smooth+noise images (section 1.7 used 0.02 on its draws)


def _randomise(model: nn.Module, generator: torch.Generator) -> None:
    """Re-draw every parameter from ``generator`` (He-scaled convs, random BN affine, larger fc)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.weight.normal_(0.0, (2 / module.weight[0].numel()) ** 0.5, generator=generator)
        elif isinstance(module, nn.BatchNorm2d):
            module.weight.uniform_(*_BN_GAMMA_RANGE, generator=generator)
            module.bias.normal_(0.0, _BN_BETA_STD, generator=generator)
        elif isinstance(module, nn.Linear):
            module.weight.normal_(0.0, _FC_GAIN / module.weight.shape[1] ** 0.5, generator=generator)
            module.bias.normal_(0.0, _FC_BIAS_STD, generator=generator)


def _calibration_images(count: int, generator: torch.Generator) -> torch.Tensor:
    """``(count, 3, 299, 299)`` smooth random images plus mild pixel noise, on the ``(x - 128) / 128`` scale."""
    coarse = torch.rand(count, 3, _COARSE_SIDE, _COARSE_SIDE, generator=generator) * _PIXEL_MAX
    size = (_CALIBRATION_SIZE, _CALIBRATION_SIZE)
    smooth = F.interpolate(coarse, size=size, mode="bicubic", align_corners=False)
    noisy = smooth + _NOISE_STD * torch.randn(smooth.shape, generator=generator)
    return (noisy.clamp(0, _PIXEL_MAX) - _PIXEL_CENTER) / _PIXEL_CENTER


def _calibrate(model: nn.Module, generator: torch.Generator) -> None:
    """Set every BN's running stats to its batch statistics on random smooth images (one pass)."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: after one batch, running stats = batch stats
    model.train()
    model(_calibration_images(_CALIBRATION_IMAGES, generator).contiguous(memory_format=torch.channels_last))
    model.eval()
    for norm in norms:
        norm.momentum = 0.1  # torch's default again (not stored in the state dict)


def build_random_fid_inception(seed: int = 0) -> nn.Module:
    """The FID Inception-v3 with seeded, non-degenerate random weights (eval mode, CPU, float32)."""
    from rewardkit.nets.fid_inception import FIDInceptionV3

    generator = torch.Generator().manual_seed(seed)
    model = FIDInceptionV3()
    threads = torch.get_num_threads()
    # The calibration's forward passes reduce in an order that depends on the intra-op thread count: one
    # thread makes the weights (and the checkpoint's sha256, stored with FID statistics) the same in every
    # process, whatever its thread setting.
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            _randomise(model, generator)
            _calibrate(model, generator)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        for norm in model.Mixed_7c.modules():
            if isinstance(norm, nn.BatchNorm2d):
                norm.weight.mul_(_MIXED_7C_BN_SCALE)
                norm.bias.mul_(_MIXED_7C_BN_SCALE)
    return model


@functools.lru_cache(maxsize=1)  # both layouts of one seed are built once per process (~95 MB kept)
def _random_state_dict(seed: int) -> dict[str, torch.Tensor]:
    from rewardkit.fp32_precision import ieee_float32

    # The calibration's forward passes must not follow a caller's set_float32_matmul_precision (bf16 matmuls
    # through oneDNN): the weights, and the sha256 that FID statistics record, would depend on it.
    with ieee_float32():
        return build_random_fid_inception(seed).state_dict()


def tiny_fid_inception(root: str | Path, layout: str = "upstream", seed: int = 0) -> dict[str, str]:
    """Write (once) a random FID Inception checkpoint under ``root``; return ``{"weights": path}``.

    Args:
        root: folder for the checkpoint (created). An existing file is returned as is (cache).
        layout: ``"upstream"`` (pytorch-fid ``.pth``) or ``"diffsynth"`` (``FID/model.safetensors``).
        seed: the weights are a deterministic function of the seed.

    Returns:
        ``{"weights": str(path)}``, the keyword arguments of ``rewardkit.metrics.inception.load_inception``.
    """
    _check_layout(layout, _LAYOUTS)
    path = Path(root) / (UPSTREAM_FILENAME if layout == "upstream" else DIFFSYNTH_FILENAME)
    if path.is_file():
        return {"weights": str(path)}
    state = _random_state_dict(seed)
    partial = path.with_name(path.name + f".{os.getpid()}.partial")  # atomic: no half-written cache hits
    if layout == "upstream":
        path.parent.mkdir(parents=True, exist_ok=True)
        # Through a file object: given a path, torch.save names the zip's records after the file ("<name>.<pid>/
        # data.pkl"), so the bytes (and the sha256 stored with FID statistics) would differ between processes.
        with open(partial, "wb") as handle:
            torch.save(state, handle)
    else:
        _save_safetensors(state, partial)
    os.replace(partial, path)
    return {"weights": str(path)}
