"""LPIPS v0.1 as a paired reward: ``metric(images, reference=ref) -> (B,)``, a distance (lower = more similar).

Upstream: richzhang/PerceptualSimilarity ``lpips/lpips.py`` ``LPIPS(net=..., version="0.1")`` called on
``[-1, 1]`` inputs; rewardkit's ``[0, 1]`` images are mapped with ``2 * x - 1`` (lpips' ``normalize=True``).
Nothing is resized: images and reference must have the same shape. The network is
``rewardkit.nets.lpips.LPIPSNetwork``; the arithmetic follows lpips exactly (``x / (norm + 1e-10)``).
torchmetrics' LPIPS uses ``x / sqrt(norm**2 + 1e-8)`` instead, a deviation of about 1e-7 on typical images.

Weights (``load_lpips(weights=...)``), always loaded strictly:

* ``None``: upstream's default: the torchvision ImageNet trunk by URL (``alexnet-owt-7be5be79.pth``,
  ``vgg16-397923af.pth``, ``squeezenet1_1-b8a52dc0.pth``, cached in torch.hub's checkpoint folder)
  plus the v0.1 linear heads that ship inside the installed ``lpips`` package (``weights/v0.1/<net>.pth``)
  or torchmetrics (``functional/image/lpips_models/<net>.pth``, byte-identical; sha256 checked).
* ``{"trunk": spec, "heads": spec}``: upstream's two files given explicitly; either may be ``None``
  (= the default above). ``trunk`` holds torchvision keys ``features.<i>.*`` (``classifier.*`` is ignored),
  ``heads`` holds ``lin<K>.model.1.weight``.
* one file (local path, ``hf:``/``ms:`` spec or URL), recognised by its keys: DiffSynth-Studio's merged
  ``LPIPS/{alexnet,vgg,squeezenet}.safetensors`` (= ``lpips.LPIPS().state_dict()`` minus ``lins.*``; a
  full lpips state dict with ``lins.*`` or a torchmetrics one with ``net.slices.<K-1>.*`` and no
  ``scaling_layer.*`` loads too; missing scaling constants are filled in), a
  torchvision trunk file alone (heads = packaged default) or a heads file alone (trunk = default URL).
* a folder holding ``LPIPS/<diffsynth file>`` or ``<diffsynth file>``, or else the torchvision trunk file
  (its hub name, or ``<torchvision name>-*.pth``) with an optional ``<net>.pth`` heads file beside it.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from rewardkit.metrics.paired import PairedReward
from rewardkit.nets.lpips import TRUNKS, LPIPSNetwork, TrunkSpec, trunk_spec
from rewardkit.precision import autocast_for, dtype_name, parse_dtype
from rewardkit.protocols import RewardOutput
from rewardkit.weights import CheckpointMismatchError, load_state_dict_strict, read_state_dict, resolve_weights

__all__ = ["LPIPS", "load_lpips", "TORCHVISION_TRUNK_URLS", "DIFFSYNTH_FILES", "HEADS_SHA256", "packaged_heads"]

# torchvision IMAGENET1K_V1 weights of the trunks (AlexNet_Weights / VGG16_Weights / SqueezeNet1_1_Weights).
TORCHVISION_TRUNK_URLS = {
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "squeeze": "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
}
# DiffSynth-Studio ImageMetrics file names, under LPIPS/.
DIFFSYNTH_FILES = {"alex": "alexnet.safetensors", "vgg": "vgg.safetensors", "squeeze": "squeezenet.safetensors"}
# sha256 of lpips 0.1.4 weights/v0.1/<net>.pth (= torchmetrics 1.9.0 lpips_models/<net>.pth), hashed here.
HEADS_SHA256 = {
    "alex": "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
    "vgg": "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
    "squeeze": "4a5350f23600cb79923ce65bb07cbf57dca461329894153e05a1346bd531cf76",
}
_HEADS_LOCATIONS = (("lpips", "weights/v0.1"), ("torchmetrics", "functional/image/lpips_models"))
_SPEC_KEYS = frozenset({"trunk", "heads"})
_TRUNK_PREFIX, _CLASSIFIER_PREFIX = "features.", "classifier."
_MERGED_PREFIXES = ("net.", "scaling_layer.")
_LINS = re.compile(r"^lins\.(\d+)\.")  # lpips' duplicate ModuleList entries
_TM_SLICES = re.compile(r"^net\.slices\.(\d+)\.")  # torchmetrics' squeeze trunk: slices.{K-1} = slice{K}
_HEAD_KEY = re.compile(r"^(lin\d+|lins\.\d+)\.model\.1\.weight$")
_MIN_SIZES = ", ".join(f"{net} {spec.min_size} px" for net, spec in TRUNKS.items())


class LPIPS(PairedReward):
    """LPIPS distance between each image and its reference, float32 ``(B,)``, ``>= 0`` (0 = identical).

    ``evaluate(...)`` adds ``details["map"]``, lpips' ``spatial=True`` map ``(B, 1, H, W)``, when built with
    ``spatial=True``. The map's mean is not the score (each layer is upsampled before the sum): measured
    2.4e-6 apart with the real alex weights (reference/distribution_metrics.md §3.1).

    Args:
        network: an :class:`~rewardkit.nets.lpips.LPIPSNetwork` with weights loaded.
        dtype: ``None`` (exact float32) or ``"bf16"`` / ``"fp16"``: the trunk runs under autocast, the
            normalisation, heads and sum in float32.
        spatial: also return the spatial map.
    """

    name = "lpips"
    higher_is_better = False
    differentiable = True
    requires_prompt = False

    def __init__(self, network: LPIPSNetwork, dtype: Any = None, spatial: bool = False) -> None:
        super().__init__()
        self.network = network
        self.autocast_dtype = parse_dtype(dtype)
        self.spatial = bool(spatial)

    def score_pairs(self, images: torch.Tensor, reference: torch.Tensor) -> RewardOutput:
        height, width = images.shape[-2:]
        minimum = self.network.spec.min_size
        if min(height, width) < minimum:
            raise ValueError(
                f"lpips (net={self.network.net_name!r}): images must be at least {minimum}x{minimum} px for the "
                f"{self.network.spec.torchvision_name} trunk, got {height}x{width}; upsample both images and "
                f"reference, or use another trunk (minimum sizes: {_MIN_SIZES})"
            )
        param_dtype = self.network.scaling_layer.shift.dtype
        pairs = torch.cat([images, reference]).to(param_dtype) * 2 - 1  # [0, 1] -> lpips' [-1, 1]
        # Exact mode is float32 even inside a caller's autocast region (autocast_for(None) turns it off);
        # fast mode autocasts the trunk only.
        with autocast_for(images.device, self.autocast_dtype):
            feats = self.network.features(pairs)
        with torch.autocast(images.device.type, enabled=False):
            feats = [f.to(param_dtype) for f in feats]
            feats_x, feats_y = [f[: len(images)] for f in feats], [f[len(images):] for f in feats]
            scores = self.network.distance(feats_x, feats_y)
            details = {"map": self.network.distance(feats_x, feats_y, (height, width)).float()} if self.spatial else {}
        return RewardOutput(scores.float(), details)

    def extra_repr(self) -> str:
        return f"net={self.network.net_name!r}, dtype={dtype_name(self.autocast_dtype)!r}, spatial={self.spatial}"


def packaged_heads(net: str) -> Path:
    """The v0.1 linear-head file of ``net`` shipped inside ``lpips`` (else torchmetrics), sha256 checked.

    Raises:
        ImportError: neither package is installed (or neither holds the file).
        ValueError: the file's sha256 differs from the lpips 0.1.4 release.
    """
    for package, folder in _HEADS_LOCATIONS:
        spec = importlib.util.find_spec(package)
        for root in (spec.submodule_search_locations or []) if spec else []:
            path = Path(root) / folder / f"{net}.pth"
            if path.is_file():
                return resolve_weights(path, sha256=HEADS_SHA256[net], what=f"lpips v0.1 heads ({net})")
    raise ImportError(
        f"lpips: the v0.1 linear heads ({net}.pth) ship inside the `lpips` package (weights/v0.1/) or "
        "torchmetrics (functional/image/lpips_models/), and neither is installed; `pip install lpips`, "
        "or pass the heads file explicitly: weights={'trunk': ..., 'heads': 'path/to/" + f"{net}.pth'}}"
    )


def _trunk_key_map(spec: TrunkSpec) -> Callable[[dict], dict]:
    """torchvision ``features.<i>.*`` -> ``net.slice<K>.<i>.*``; ``classifier.*`` dropped; others kept."""
    slice_of = {index: number for number, (start, stop) in enumerate(spec.slices, 1) for index in range(start, stop)}

    def convert(state: dict) -> dict:
        out = {}
        for key, value in state.items():
            if key.startswith(_CLASSIFIER_PREFIX):
                continue
            index, _, tail = key.removeprefix(_TRUNK_PREFIX).partition(".")
            if key.startswith(_TRUNK_PREFIX) and index.isdigit() and int(index) in slice_of:
                key = f"net.slice{slice_of[int(index)]}.{index}.{tail}"
            out[key] = value
        return out

    return convert


def _merged_key_map(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold lpips' duplicate ``lins.<K>.*`` into ``lin<K>.*`` and torchmetrics' ``net.slices.<K-1>.*``
    into ``net.slice<K>.*``; a duplicate that disagrees with its twin raises ``ValueError``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if match := _TM_SLICES.match(key):
            key = f"net.slice{int(match[1]) + 1}.{key[match.end():]}"
        elif match := _LINS.match(key):
            key = f"lin{match[1]}.{key[match.end():]}"
        if key in out and not torch.equal(out[key], value):
            raise ValueError(f"lpips: checkpoint holds two different tensors for {key!r} (lin<K> vs lins.<K>); "
                             "re-save it from one consistent model")
        out[key] = value
    return out


def _guess_net(state: Mapping[str, torch.Tensor]) -> str | None:
    """The trunk a state's heads were trained for, from the heads' channel counts (None if unknown)."""
    heads = _merged_key_map({k: v for k, v in state.items() if _HEAD_KEY.match(k)})
    channels = tuple(heads[f"lin{i}.model.1.weight"].shape[1] for i in range(len(heads))
                     if f"lin{i}.model.1.weight" in heads)
    return next((net for net, spec in TRUNKS.items() if spec.channels == channels), None)


def _read(spec: Any, what: str) -> dict[str, torch.Tensor]:
    return read_state_dict(resolve_weights(spec, what=what))


def _upstream_state(net: str, trunk: dict | None, heads: dict | None, scaling: dict) -> dict[str, torch.Tensor]:
    """Assemble the network's state from a torchvision trunk and a v0.1 heads state (None = default)."""
    if trunk is None:
        trunk = _read(TORCHVISION_TRUNK_URLS[net], f"lpips trunk (torchvision {trunk_spec(net).torchvision_name})")
    if heads is None:
        heads = read_state_dict(packaged_heads(net))
    trunk, heads = _trunk_key_map(trunk_spec(net))(trunk), _merged_key_map(heads)
    if clash := sorted(trunk.keys() & heads.keys()):
        raise ValueError(f"lpips: the trunk and the heads checkpoints both hold {clash[:5]}; give each tensor once "
                         "(trunk = torchvision features.*, heads = lin<K>.model.1.weight)")
    return {**scaling, **trunk, **heads}


def _kind_of(state: Mapping[str, torch.Tensor]) -> str:
    if any(key.startswith(_MERGED_PREFIXES) for key in state):
        return "merged"
    if any(key.startswith(_TRUNK_PREFIX) for key in state):
        return "trunk"
    return "heads" if state and all(_HEAD_KEY.match(key) for key in state) else "merged"


def _from_folder(folder: Path, net: str, scaling: dict) -> dict[str, torch.Tensor]:
    diffsynth = DIFFSYNTH_FILES[net]
    for candidate in (folder / "LPIPS" / diffsynth, folder / diffsynth):
        if candidate.is_file():
            return {**scaling, **_merged_key_map(read_state_dict(candidate))}
    tv_name = trunk_spec(net).torchvision_name
    hub_name = TORCHVISION_TRUNK_URLS[net].rsplit("/", 1)[-1]
    trunks = [folder / hub_name] if (folder / hub_name).is_file() else sorted(folder.glob(f"{tv_name}-*.pth"))
    if len(trunks) != 1:
        found = sorted(p.name for p in folder.iterdir())
        raise FileNotFoundError(
            f"lpips (net={net!r}): folder {str(folder)!r} must hold DiffSynth's LPIPS/{diffsynth} or exactly one "
            f"torchvision trunk file ({hub_name} or {tv_name}-*.pth) with an optional {net}.pth heads file; "
            f"found {found[:20]}; pass weights={{'trunk': ..., 'heads': ...}} to name the files"
        )
    heads = folder / f"{net}.pth"
    return _upstream_state(net, read_state_dict(trunks[0]), read_state_dict(heads) if heads.is_file() else None,
                           scaling)


def _state_for(weights: Any, net: str, scaling: dict) -> dict[str, torch.Tensor]:
    """Every accepted ``weights`` form -> a state dict in ``LPIPSNetwork``'s key layout (before strict loading)."""
    if weights is None:
        return _upstream_state(net, None, None, scaling)
    if isinstance(weights, Mapping):
        if not weights or set(weights) - _SPEC_KEYS:
            raise ValueError(f"lpips: a dict weights= takes the keys 'trunk' and/or 'heads' (upstream's torchvision "
                             f"trunk file and v0.1 heads file), got {sorted(map(str, weights))}")
        trunk, heads = weights.get("trunk"), weights.get("heads")
        return _upstream_state(net, None if trunk is None else _read(trunk, "lpips trunk"),
                               None if heads is None else _read(heads, "lpips heads"), scaling)
    patterns = [f"LPIPS/{DIFFSYNTH_FILES[net]}", DIFFSYNTH_FILES[net], f"{trunk_spec(net).torchvision_name}-*.pth",
                f"{net}.pth"]
    path = resolve_weights(weights, allow_patterns=patterns, what=f"lpips (net={net!r})")
    if path.is_dir():
        return _from_folder(path, net, scaling)
    state = read_state_dict(path)
    kind = _kind_of(state)
    if kind == "trunk":  # heads saved beside the torchvision keys are used, else the packaged ones
        heads = {k: v for k, v in state.items() if _HEAD_KEY.match(k)}
        trunk = {k: v for k, v in state.items() if k not in heads}
        return _upstream_state(net, trunk, heads or None, scaling)
    if kind == "heads":
        return _upstream_state(net, None, state, scaling)
    # torchmetrics registers the ScalingLayer constants as non-persistent buffers: its state dicts lack them.
    return {**scaling, **_merged_key_map(state)}


def load_lpips(weights: Any = None, device: Any = None, dtype: Any = None, net: str = "alex",
               spatial: bool = False) -> LPIPS:
    """Build the LPIPS v0.1 paired reward (frozen, eval mode).

    Args:
        weights: ``None`` (torchvision trunk by URL + the packaged v0.1 heads), ``{"trunk": spec,
            "heads": spec}``, one file (DiffSynth merged safetensors, trunk alone or heads alone), or a
            folder; see the module docstring.
        device: where the model lives (``None`` = CPU).
        dtype: ``None``/``"fp32"`` (exact) or ``"bf16"``/``"fp16"`` (trunk under autocast).
        net: ``"alex"`` (upstream default), ``"vgg"`` or ``"squeeze"``.
        spatial: also return lpips' spatial map in ``evaluate(...).details["map"]``.

    Raises:
        ValueError: an unknown ``net`` or ``dtype``, a malformed ``weights`` dict.
        CheckpointMismatchError: a checkpoint whose keys or shapes do not match ``net``'s network.
        FileNotFoundError / ImportError: weights that cannot be found (see ``resolve_weights``).
    """
    trunk_spec(net)
    parse_dtype(dtype)
    network = LPIPSNetwork(net)
    scaling = {k: v for k, v in network.state_dict().items() if k.startswith("scaling_layer.")}
    state = _state_for(weights, net, scaling)
    guess = _guess_net(state)
    if guess not in (None, net):  # clearer than the generic key listing (and LPIPS takes no config=)
        raise CheckpointMismatchError(
            f"lpips (net={net!r}): the checkpoint's linear heads have the channel counts of the {guess!r} trunk "
            f"{TRUNKS[guess].channels}, not {TRUNKS[net].channels}; pass net={guess!r}, or weights for net={net!r}")
    load_state_dict_strict(network, state, name=f"lpips (net={net!r})")
    reward = LPIPS(network, dtype=dtype, spatial=spatial).freeze()
    return reward.to(torch.device("cpu") if device is None else torch.device(device))
