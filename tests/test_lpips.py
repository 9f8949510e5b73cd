"""LPIPS: parity with richzhang's ``lpips`` 0.1.4 and torchmetrics on identical tiny random weights.

References run the upstream code (``lpips.LPIPS(version="0.1", pretrained=True, pnet_rand=True)``: random
trunk, no download, then the tiny state loaded strictly; torchmetrics with its backbone built the same way).
Tolerances (measured on CPU, torch 2.14.1, 4 batches x 2 sizes of 4 images, scores ~0.8-1.3):

* rewardkit vs lpips, scores and spatial map: ``PARITY_ATOL = 1e-6``. Measured max |Δ| = 0 for alex, vgg
  and squeeze on both layouts. rewardkit runs images and reference through the trunk as one batch, which
  may round differently from two batches (one row at a time vs the batch: measured 1.2e-7), so the
  tests allow 1e-6 rather than demanding equality.
* vs torchmetrics: ``TORCHMETRICS_ATOL = 1e-6``. It normalises with ``sqrt(norm**2 + 1e-8)`` instead of
  ``norm + 1e-10`` (a relative change of about 1e-8 / norm**2, invisible here: measured 0) and its squeeze
  trunk is keyed ``net.slices.<K-1>`` (renamed below).
* bf16 autocast vs fp32: ``BF16_RTOL = 2e-2`` relative. Measured max 5.4e-4 (alex), 3.6e-3 (squeeze),
  6.3e-4 (vgg).
"""

from __future__ import annotations

import functools
import pickle
import re

import lpips
import pytest
import torch

from rewardkit.metrics.lpips import DIFFSYNTH_FILES, TORCHVISION_TRUNK_URLS, load_lpips, packaged_heads
from rewardkit.nets.lpips import TRUNKS, LPIPSNetwork, unit_normalize
from rewardkit.testing import random_images
from rewardkit.testing.lpips import tiny_lpips, tiny_lpips_state, to_torchvision_trunk
from rewardkit.weights import CheckpointMismatchError, read_state_dict

# lpips builds its trunks with torchvision's deprecated pretrained= argument.
pytestmark = pytest.mark.filterwarnings("ignore:The parameter 'pretrained' is deprecated:UserWarning",
                                        "ignore:Arguments other than a weight enum:UserWarning")

PARITY_ATOL = 1e-6
TORCHMETRICS_ATOL = 1e-6
BF16_RTOL = 2e-2
SIZE = 64
VGG_SIZE = 32  # vgg16 is ~20x alexnet's cost per pixel; 32 px keeps every layer at >= 2x2
PARAMETER_COUNTS = {"alex": 2_470_854, "vgg": 14_716_166, "squeeze": 724_742}  # reference/clip_family.md §11.1
FAST_NETS = ("alex", "squeeze")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("lpips")


@pytest.fixture(scope="module")
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    return random_images(3, SIZE, SIZE, seed=1), random_images(3, SIZE, SIZE, seed=2)


def _with_lins(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our layout + lpips' duplicate ``lins.<K>`` entries = ``lpips.LPIPS().state_dict()``."""
    return {**state, **{re.sub(r"^lin(\d+)", r"lins.\1", k): v for k, v in state.items() if k.startswith("lin")}}


@functools.lru_cache(maxsize=None)
def _reference(net: str, spatial: bool = False) -> torch.nn.Module:
    model = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, spatial=spatial, verbose=False)
    model.load_state_dict(_with_lins(tiny_lpips_state(net)), strict=True)
    return model.eval()


def _upstream_scores(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x * 2 - 1, y * 2 - 1)


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float = PARITY_ATOL) -> None:
    torch.testing.assert_close(actual, expected.reshape(actual.shape), rtol=0, atol=atol)


# --------------------------------------------------------------------------------------- architecture
@pytest.mark.parametrize("net", sorted(TRUNKS))
def test_network_size_and_keys(net):
    state = LPIPSNetwork(net).state_dict()
    assert sum(v.numel() for v in state.values()) == PARAMETER_COUNTS[net]
    assert set(state) == set(tiny_lpips_state(net))
    if net in FAST_NETS:  # upstream's keys minus lins.* (building lpips' vgg costs ~1.5 s; checked below)
        assert set(_with_lins(state)) == set(_reference(net).state_dict())


# --------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("layout", ["upstream", "diffsynth"])
@pytest.mark.parametrize("net", FAST_NETS)
def test_parity_with_lpips(root, pair, net, layout):
    x, y = pair
    metric = load_lpips(**tiny_lpips(root / layout, layout, net=net))
    with torch.no_grad():
        scores = metric(x, reference=y)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert scores.min() > 0.1  # non-degenerate random weights
    _close(scores, _upstream_scores(_reference(net), x, y))


@pytest.mark.parametrize("net", FAST_NETS)
def test_spatial_map_matches_lpips(root, pair, net):
    x, y = pair
    metric = load_lpips(**tiny_lpips(root / "diffsynth", "diffsynth", net=net), spatial=True)
    with torch.no_grad():
        out = metric.evaluate(x, reference=y)
    assert out.details["map"].shape == (3, 1, SIZE, SIZE)
    _close(out.details["map"], _upstream_scores(_reference(net, spatial=True), x, y))
    _close(out.scores, _upstream_scores(_reference(net), x, y))  # the score stays the non-spatial one


def test_parity_vgg(root):
    x, y = random_images(2, VGG_SIZE, VGG_SIZE, seed=3), random_images(2, VGG_SIZE, VGG_SIZE, seed=4)
    reference = _reference("vgg")
    assert set(_with_lins(LPIPSNetwork("vgg").state_dict())) == set(reference.state_dict())
    expected = _upstream_scores(reference, x, y)
    for layout in ("upstream", "diffsynth"):
        with torch.no_grad():
            _close(load_lpips(**tiny_lpips(root / layout, layout, net="vgg"))(x, reference=y), expected)


@pytest.mark.parametrize("net", FAST_NETS)
def test_parity_with_torchmetrics(root, pair, net, monkeypatch):
    # reduction='none' needs torchmetrics >= 1.8 (the dev extra's floor).
    import torchmetrics.functional.image.lpips as tm_functional
    import torchmetrics.image.lpip as tm_module
    from torchmetrics.image import LearnedPerceptualImagePatchSimilarity

    x, y = pair
    # torchmetrics keeps the ScalingLayer constants as non-persistent buffers (not in its state dict).
    state = {k: v for k, v in _with_lins(tiny_lpips_state(net)).items() if not k.startswith("scaling_layer.")}
    if net == "squeeze":  # torchmetrics keeps squeeze slices in a ModuleList: net.slice<K> -> net.slices.<K-1>
        state = {re.sub(r"^net\.slice(\d+)", lambda m: f"net.slices.{int(m[1]) - 1}", k): v for k, v in state.items()}
    # No download: build torchmetrics' network with a random backbone, then load the tiny state strictly.
    reference = tm_functional._NoTrainLpips(net=net, pnet_rand=True)
    reference.load_state_dict(state, strict=True)
    monkeypatch.setattr(tm_module, "_NoTrainLpips", lambda net: reference)
    monkeypatch.setattr(tm_functional, "_NoTrainLpips", lambda net: reference)
    metric = LearnedPerceptualImagePatchSimilarity(net_type=net, reduction="none", normalize=True)
    with torch.no_grad():
        metric.update(x, y)
        from_class = metric.compute()
        from_functional = tm_functional.learned_perceptual_image_patch_similarity(
            x, y, net_type=net, reduction="none", normalize=True)
        ours = load_lpips(**tiny_lpips(root / "diffsynth", "diffsynth", net=net))(x, reference=y)
    _close(ours, from_class, TORCHMETRICS_ATOL)
    _close(ours, from_functional, TORCHMETRICS_ATOL)
    # torchmetrics' own state dict (net.slices.* for squeeze, lins.* duplicates) loads as one file.
    path = root / f"torchmetrics-{net}.pth"
    torch.save(reference.state_dict(), path)
    with torch.no_grad():
        _close(load_lpips(weights=str(path), net=net)(x, reference=y), ours, 0.0)


# ---------------------------------------------------------------------------- upstream weight sources
def test_packaged_heads_and_default_trunk_url(root, pair, monkeypatch, tmp_path):
    x, y = pair
    heads = packaged_heads("alex")
    assert heads.name == "alex.pth" and read_state_dict(heads).keys() == {f"lin{i}.model.1.weight" for i in range(5)}
    trunk = tiny_lpips(root / "upstream", "upstream", net="alex")["weights"]["trunk"]
    # lpips' own pretrained heads on the tiny random trunk.
    reference = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False).eval()
    trunk_state = {k: v for k, v in tiny_lpips_state("alex").items() if k.startswith("net.")}
    reference.load_state_dict({**reference.state_dict(), **trunk_state}, strict=True)
    expected = _upstream_scores(reference, x, y)
    with torch.no_grad():
        _close(load_lpips(weights={"trunk": trunk, "heads": str(heads)})(x, reference=y), expected)
        _close(load_lpips(weights={"trunk": trunk})(x, reference=y), expected)  # heads=None -> packaged
        _close(load_lpips(weights=trunk)(x, reference=y), expected)  # a trunk file alone -> packaged heads
    # weights=None: the torchvision URL resolves through torch.hub's cache (offline here), heads packaged.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="offline"):
        load_lpips()
    cached = tmp_path / "checkpoints" / TORCHVISION_TRUNK_URLS["alex"].rsplit("/", 1)[-1]
    cached.parent.mkdir()
    cached.write_bytes(open(trunk, "rb").read())
    with torch.no_grad():
        _close(load_lpips()(x, reference=y), expected)


def test_folders_and_single_files(root, pair, monkeypatch, tmp_path):
    x, y = pair
    tiny_lpips(root / "upstream", "upstream", net="squeeze")
    tiny_lpips(root / "diffsynth", "diffsynth", net="squeeze")
    expected = _upstream_scores(_reference("squeeze"), x, y)
    with torch.no_grad():
        _close(load_lpips(weights=str(root / "upstream"), net="squeeze")(x, reference=y), expected)
        _close(load_lpips(weights=str(root / "diffsynth"), net="squeeze")(x, reference=y), expected)
        _close(load_lpips(weights=str(root / "diffsynth" / "LPIPS"), net="squeeze")(x, reference=y), expected)
        full = root / "lpips-full-squeeze.pth"  # lpips.LPIPS().state_dict() as saved, lins.* included
        torch.save(_reference("squeeze").state_dict(), full)
        _close(load_lpips(weights=str(full), net="squeeze")(x, reference=y), expected)
        # A torchvision file with its classifier.* (ignored) loads like the features-only tiny file.
        trunk = to_torchvision_trunk(tiny_lpips_state("squeeze"))
        trunk.update({"classifier.1.weight": torch.zeros(1000, 512, 1, 1), "classifier.1.bias": torch.zeros(1000)})
        torch.save(trunk, tmp_path / "squeezenet1_1-b8a52dc0.pth")
        torch.save({k: v for k, v in tiny_lpips_state("squeeze").items() if k.startswith("lin")},
                   tmp_path / "squeeze.pth")
        _close(load_lpips(weights=str(tmp_path), net="squeeze")(x, reference=y), expected)
        # One torchvision-keyed file with the heads beside the features: its own heads are used.
        torch.save({**trunk, **read_state_dict(tmp_path / "squeeze.pth")}, tmp_path / "combined.pth")
        _close(load_lpips(weights=str(tmp_path / "combined.pth"), net="squeeze")(x, reference=y), expected)
    with pytest.raises(ValueError, match="both hold"):
        load_lpips(weights={"trunk": str(tmp_path / "combined.pth"), "heads": str(tmp_path / "squeeze.pth")},
                   net="squeeze")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="offline"):  # a heads file alone needs the default trunk
        load_lpips(weights=str(tmp_path / "squeeze.pth"), net="squeeze")
    with pytest.raises(FileNotFoundError, match="torchvision trunk file"):
        load_lpips(weights=str(tmp_path), net="alex")


# ------------------------------------------------------------------------------------- reward contract
@pytest.fixture(scope="module")
def alex(root):
    return load_lpips(**tiny_lpips(root / "diffsynth", "diffsynth", net="alex"))


def test_contract(alex, pair):
    x, y = pair
    assert (alex.name, alex.higher_is_better, alex.differentiable, alex.requires_prompt) == ("lpips", False, True,
                                                                                               False)
    assert not any(p.requires_grad for p in alex.parameters()) and not alex.training
    with torch.no_grad():
        scores = alex(x, reference=y)
        rows = torch.cat([alex(x[i : i + 1], reference=y[i : i + 1]) for i in range(3)])
        _close(rows, scores)  # batch-size independent (up to the batched trunk's rounding)
        assert torch.equal(alex(x, reference=x), torch.zeros(3))  # LPIPS(x, x) = 0 exactly
        clone = pickle.loads(pickle.dumps(alex))
        assert torch.equal(clone(x, reference=y), scores)


def test_every_layer_and_noise_level_moves_the_score(alex, pair):
    x, y = pair
    network = alex.network
    with torch.no_grad():
        feats_x, feats_y = network.features(x * 2 - 1), network.features(y * 2 - 1)
        for layer in range(len(feats_x)):  # dropping any one layer changes the score
            kept = [k for k in range(len(feats_x)) if k != layer]
            partial = sum(getattr(network, f"lin{k}")(
                (unit_normalize(feats_x[k]) - unit_normalize(feats_y[k])) ** 2).mean(dim=(1, 2, 3)) for k in kept)
            assert (network.distance(feats_x, feats_y) - partial).min() > 1e-3
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
        levels = [alex((x + level * noise).clamp(0, 1), reference=x) for level in (0.01, 0.03, 0.1, 0.3)]
    assert all((low < high).all() for low, high in zip(levels, levels[1:]))


def test_gradients_reach_images_and_reference(alex, pair):
    x, y = (t.clone().requires_grad_(True) for t in pair)
    alex(x, reference=y).sum().backward()
    for grad in (x.grad, y.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("net", FAST_NETS)
def test_bf16_close_to_fp32(root, pair, net):
    x, y = pair
    kwargs = tiny_lpips(root / "diffsynth", "diffsynth", net=net)
    with torch.no_grad():
        exact = load_lpips(**kwargs)(x, reference=y)
        fast = load_lpips(**kwargs, dtype="bf16")(x, reference=y)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # exact mode ignores a caller's autocast region
            inside = load_lpips(**kwargs)(x, reference=y)
    assert fast.dtype == torch.float32 and inside.dtype == torch.float32
    torch.testing.assert_close(fast, exact, rtol=BF16_RTOL, atol=0)
    assert torch.equal(inside, exact)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_inputs(root, alex, pair):
    x, y = pair
    with pytest.raises(ValueError, match="reference"):
        alex(x)
    with pytest.raises(ValueError, match="same shape"):
        alex(x, reference=y[:, :, :32])
    small = TRUNKS["alex"].min_size - 1
    with pytest.raises(ValueError, match="at least 31x31"):
        alex(x[:, :, :small, :small], reference=y[:, :, :small, :small])
    with pytest.raises(ValueError, match="alex.*squeeze.*vgg"):
        load_lpips(weights=str(root), net="resnet")
    with pytest.raises(ValueError, match="'trunk' and/or 'heads'"):
        load_lpips(weights={"backbone": "x.pth"})
    alex_file = root / "diffsynth" / "LPIPS" / DIFFSYNTH_FILES["alex"]
    with pytest.raises(CheckpointMismatchError, match="pass net='alex'"):
        load_lpips(weights=str(alex_file), net="squeeze")
    with pytest.raises(CheckpointMismatchError, match="pass net='alex'"):
        load_lpips(weights=str(alex_file), net="vgg")


def test_checkpoint_with_wrong_heads(root, tmp_path):
    kwargs = tiny_lpips(root / "upstream", "upstream", net="alex")
    with pytest.raises(CheckpointMismatchError, match="pass net='vgg'"):
        load_lpips(weights={"trunk": kwargs["weights"]["trunk"], "heads": str(packaged_heads("vgg"))})
    with pytest.raises(CheckpointMismatchError, match="shape conflicts"):  # the right heads, another trunk
        load_lpips(weights={"trunk": tiny_lpips(root / "upstream", "upstream", net="squeeze")["weights"]["trunk"]})
    state = _with_lins(tiny_lpips_state("alex"))
    state["lins.0.model.1.weight"] = state["lins.0.model.1.weight"] + 1
    torch.save(state, tmp_path / "inconsistent.pth")
    with pytest.raises(ValueError, match="two different tensors"):
        load_lpips(weights=str(tmp_path / "inconsistent.pth"))


@pytest.mark.parametrize("net", sorted(TRUNKS))
def test_real_v0_1_heads_of_every_net(root, pair, net):
    """The real v0.1 heads: lpips' and torchmetrics' copies are byte-identical (rewardkit bundles none), load
    strictly, and LPIPS with them equals ``lpips.LPIPS(pretrained=True, pnet_rand=True)`` (the same real heads,
    read by lpips itself) on the SAME random trunk (the real trunk would be a download)."""
    import importlib.util
    from pathlib import Path

    import rewardkit.metrics.lpips as rk_lpips
    from rewardkit.weights import file_sha256

    copies = []
    for package, folder in (("lpips", "weights/v0.1"), ("torchmetrics", "functional/image/lpips_models")):
        spec = importlib.util.find_spec(package)
        copies.append(Path(spec.submodule_search_locations[0]) / folder / f"{net}.pth")
    assert copies[0].read_bytes() == copies[1].read_bytes()
    assert file_sha256(copies[0]) == rk_lpips.HEADS_SHA256[net] and packaged_heads(net) == copies[0]
    assert not list(Path(rk_lpips.__file__).parent.parent.rglob(f"{net}.pth"))  # nothing bundled to drift
    x, y = pair
    trunk = tiny_lpips(root / "real-heads", "upstream", net=net)["weights"]["trunk"]
    reference = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False).eval()
    real_heads = {k: v for k, v in reference.state_dict().items() if k.startswith("lin")}
    trunk_state = {k: v for k, v in tiny_lpips_state(net).items() if k.startswith("net.")}
    reference.load_state_dict({**reference.state_dict(), **trunk_state}, strict=True)
    ours = load_lpips(weights={"trunk": trunk, "heads": str(copies[1])}, net=net)  # torchmetrics' copy
    ours_state = ours.state_dict()
    for key, value in real_heads.items():
        if key.startswith("lin") and not key.startswith("lins"):
            assert torch.equal(next(v for k, v in ours_state.items() if k.endswith(key)), value), key
    with torch.no_grad():
        _close(ours(x, reference=y), _upstream_scores(reference, x, y))
