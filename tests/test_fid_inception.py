"""FID Inception-v3 and its presets against pytorch-fid, torch-fidelity, torchmetrics and clean-fid.

One random checkpoint (``rewardkit.testing.fid``) is loaded into rewardkit and into every reference, so
the references' own code computes the expected values (``reference/distribution_metrics.md`` 1.7).
Measured on torch 2.14.1 CPU, Pillow 13.0.0, numpy 2.4; pool3 features of the test images have a
mean of ~0.1 and a max of ~0.8-2.3. "Input" gaps are on the network input scale (about [-1, 1]).
Full forward passes are few (CPU cost): features are compared end to end at 299 and 512 px; at the
other sizes the reference's own network input is captured at its first convolution and compared,
which with the network proven identical implies identical features.
"""

from __future__ import annotations

import functools
import pickle
from typing import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.module import register_module_forward_pre_hook

from rewardkit.metrics.extractor import ImagePrep
from rewardkit.metrics.fid_presets import DEFAULT_PRESET, PRESETS, get_preset
from rewardkit.metrics.inception import EXTRACTOR_NAME, PYTORCH_FID_WEIGHTS_URL, InceptionExtractor, load_inception
from rewardkit.nets.fid_inception import FIDInceptionV3
from rewardkit.testing.fid import UPSTREAM_FILENAME, tiny_fid_inception
from rewardkit.weights import CheckpointMismatchError, file_sha256

SIZES = (256, 512, 1024)  # square test images, resized to 299
PREP_SIZES = (*SIZES, (200, 320))  # prepared-input comparisons also cover a non-square upsample
N_IMAGES = 2
END_TO_END_SIZE = 512  # full forward passes are costly on CPU: other sizes compare the network input
# clean-fid legacy_pytorch resizes 0-255 values, then divides by 255; pytorch-fid divides first.
CLEANFID_LEGACY_INPUT_TOL = 1e-6  # measured 3.6e-7 at every size
# Tensor path vs exact path, network input. 0.0 = the same float32 operations (integer-valued input).
TENSOR_PATH_INPUT_TOL = {
    "clean": 5e-7,  # measured 1.2e-7 at every size (1.5e-5 on 0-255): float64 bicubic-AA F.interpolate vs PIL
    "torch-fidelity": 0.0,
    "torchmetrics": 0.0,
    "legacy-pytorch": 0.0,
    # measured 1.6e-2 / 9.9e-3 / 7.4e-3 at 256 / 512 / 1024, 1.7e-2 at 200x320 (~2 uint8 levels): no uint8 rounding
    # in the tensor path; the random net turns this into pool3 gaps of 0.23-0.28 (feature max 0.8-2.3)
    "diffsynth": 0.03,
}
CLEAN_TENSOR_FEATURE_TOL = 1e-4  # measured 2.4e-5 at 512 (3.4e-5 / 2.2e-5 at 256 / 1024; feature max 0.8-2.3)


@functools.lru_cache(maxsize=None)
def _images(size: int | tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Smooth random uint8 images (N, 3, H, W) with mild noise."""
    height, width = (size, size) if isinstance(size, int) else size
    generator = torch.Generator().manual_seed(seed + height * 10007 + width)
    coarse = torch.rand(N_IMAGES, 3, 6, 6, generator=generator) * 255
    smooth = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    noisy = smooth + 8 * torch.randn(smooth.shape, generator=generator)
    return noisy.clamp(0, 255).round().to(torch.uint8)


def _pils(images: torch.Tensor) -> list:
    from PIL import Image

    return [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]


def _exact(preset: str, images: torch.Tensor) -> torch.Tensor:
    return torch.stack([PRESETS[preset].pil(image) for image in _pils(images)])


class _Captured(Exception):
    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__("network input captured")
        self.tensor = tensor


def _network_input(run: Callable[[], object]) -> torch.Tensor:
    """The input of the first convolution that ``run`` (a reference's forward) calls: its exact network input.

    The reference's own code resizes and scales; the network itself is skipped (proven identical at 299).
    """
    def hook(module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, torch.nn.Conv2d):
            raise _Captured(args[0].detach().clone())

    handle = register_module_forward_pre_hook(hook)
    try:
        run()
    except _Captured as captured:
        return captured.tensor
    finally:
        handle.remove()
    raise AssertionError("the reference ran no convolution")


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fid-inception")
    return {layout: tiny_fid_inception(root / layout, layout)["weights"] for layout in ("upstream", "diffsynth")}


@pytest.fixture(scope="module")
def ours(weights: dict[str, str]) -> InceptionExtractor:
    return load_inception(weights["upstream"])


def _with(extractor: InceptionExtractor, preset: str) -> InceptionExtractor:
    return InceptionExtractor(extractor.net, preset, extractor.weights_sha256)


@pytest.fixture(scope="module")
def fidelity(weights: dict[str, str]):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                       feature_extractor_weights_path=weights["upstream"])


@pytest.fixture(scope="module")
def torchmetrics_net(weights: dict[str, str]):
    from torchmetrics.image.fid import NoTrainInceptionV3

    return NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights["upstream"])


def _torchmetrics(net, images: torch.Tensor, antialias: bool) -> torch.Tensor:
    net.use_antialias = antialias  # the attribute NoTrainInceptionV3(antialias=...) sets
    return net(images)


@pytest.fixture(scope="module")
def pytorch_fid_net(weights: dict[str, str]):
    import pytorch_fid.inception as pfi

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pfi, "load_state_dict_from_url", lambda url, **_: torch.load(weights["upstream"]))
        return pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()


def _pytorch_fid(net, unit_images: torch.Tensor, resize_input: bool = True) -> torch.Tensor:
    net.resize_input = resize_input
    return net(unit_images)[0].flatten(1)


def test_architecture_matches_torchvision_keys_and_fid_patches():
    import torchvision

    ours_state = FIDInceptionV3().state_dict()
    tv_state = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008,
                                               init_weights=False).state_dict()
    assert len(ours_state) == 566
    assert [(k, v.shape) for k, v in ours_state.items()] == [(k, v.shape) for k, v in tv_state.items()]
    net = FIDInceptionV3()
    assert not net.Mixed_7b.max_pool and net.Mixed_7c.max_pool


@torch.no_grad()
def test_features_at_299_equal_torch_fidelity_and_torchmetrics(ours, fidelity, torchmetrics_net):
    images = _images(299)
    prepared = {name: _exact(name, images) for name in ("clean", "torch-fidelity", "torchmetrics")}
    assert all(torch.equal(p, prepared["clean"]) for p in prepared.values())  # no resize at 299
    features = ours(prepared["clean"])
    reference, logits = fidelity(images)
    assert torch.equal(features, reference)  # bit-identical
    assert torch.equal(ours.logits_unbiased(features), logits)
    assert torch.equal(features, _torchmetrics(torchmetrics_net, images, antialias=True))
    no_antialias = _network_input(lambda: _torchmetrics(torchmetrics_net, images, antialias=False))
    assert torch.equal(prepared["clean"], no_antialias)
    assert features.dtype == torch.float32 and features.shape == (N_IMAGES, 2048)


@torch.no_grad()
@pytest.mark.parametrize("size", (299, END_TO_END_SIZE))
def test_legacy_pytorch_features_equal_pytorch_fid(ours, pytorch_fid_net, size):
    images = _images(size)[: N_IMAGES if size == 299 else 1]
    features = _with(ours, "legacy-pytorch")(_exact("legacy-pytorch", images))
    assert torch.equal(features, _pytorch_fid(pytorch_fid_net, images.float() / 255))  # ToTensor scaling


@torch.no_grad()
def test_torch_fidelity_and_torchmetrics_features_end_to_end(ours, fidelity, torchmetrics_net):
    images = _images(END_TO_END_SIZE)[:1]
    features = _with(ours, "torch-fidelity")(_exact("torch-fidelity", images))
    assert torch.equal(features, fidelity(images)[0])
    features = _with(ours, "torchmetrics")(_exact("torchmetrics", images))
    assert torch.equal(features, _torchmetrics(torchmetrics_net, images, antialias=True))


@pytest.mark.parametrize("size", SIZES)
def test_network_input_equals_torch_fidelity_and_torchmetrics(fidelity, torchmetrics_net, size):
    images = _images(size)
    tf1 = _exact("torch-fidelity", images)
    assert torch.equal(tf1, _network_input(lambda: fidelity(images)))
    assert torch.equal(tf1, _network_input(lambda: _torchmetrics(torchmetrics_net, images, antialias=False)))
    antialiased = _network_input(lambda: _torchmetrics(torchmetrics_net, images, antialias=True))
    assert torch.equal(_exact("torchmetrics", images), antialiased)


@pytest.mark.parametrize("size", SIZES)
def test_network_input_equals_pytorch_fid(pytorch_fid_net, size):
    images = _images(size)
    reference = _network_input(lambda: _pytorch_fid(pytorch_fid_net, images.float() / 255))
    assert torch.equal(_exact("legacy-pytorch", images), reference)


@pytest.mark.parametrize("size", PREP_SIZES)
def test_tf1_resize_equals_torch_fidelity_interpolation(size):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    images = _images(size).float()
    expected = (interpolate_bilinear_2d_like_tensorflow1x(images, (299, 299), align_corners=False) - 128) / 128
    assert torch.equal(PRESETS["torch-fidelity"].tensor(images), expected)


@pytest.mark.parametrize("size", PREP_SIZES)
def test_clean_preset_equals_cleanfid_resize(size):
    from cleanfid.resize import make_resizer

    resize = make_resizer("PIL", False, "bicubic", (299, 299))  # cleanfid.resize.build_resizer("clean")
    images = _images(size)
    expected = torch.stack([torch.from_numpy(resize(image.permute(1, 2, 0).numpy()).transpose(2, 0, 1).copy())
                            for image in images])
    assert torch.equal(_exact("clean", images), (expected - 128) / 128)  # InceptionV3W.forward scaling


@pytest.mark.parametrize("size", PREP_SIZES)
def test_diffsynth_preset_equals_torchvision_pipeline(size):
    import torchvision.transforms as T

    transform = T.Compose([T.Resize((299, 299), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor()])
    expected = torch.stack([2 * transform(image) - 1 for image in _pils(_images(size))])  # FIDInceptionModel: 2x-1
    assert torch.equal(_exact("diffsynth", _images(size)), expected)


@pytest.fixture(scope="module")
def cleanfid_legacy(weights: dict[str, str]):
    import cleanfid.features
    import cleanfid.inception_pytorch

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cleanfid.inception_pytorch, "load_state_dict_from_url",
                      lambda url, **_: torch.load(weights["upstream"]))
        return cleanfid.features.build_feature_extractor("legacy_pytorch", torch.device("cpu"), use_dataparallel=False)


@pytest.mark.parametrize("size", PREP_SIZES)
def test_legacy_pytorch_vs_cleanfid_legacy_pytorch(cleanfid_legacy, size):
    from cleanfid.resize import build_resizer

    resize = build_resizer("legacy_pytorch")
    resized = np.stack([resize(image.permute(1, 2, 0).numpy()).transpose(2, 0, 1) for image in _images(size)])
    reference = _network_input(lambda: cleanfid_legacy(torch.from_numpy(resized)))
    assert _max_abs(_exact("legacy-pytorch", _images(size)), reference) <= CLEANFID_LEGACY_INPUT_TOL


@pytest.mark.parametrize("size", PREP_SIZES)
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_tensor_path_vs_exact_path(preset, size):
    images = _images(size)
    gap = _max_abs(PRESETS[preset].tensor(images.float()), _exact(preset, images))
    assert gap <= TENSOR_PATH_INPUT_TOL[preset]


@torch.no_grad()
def test_clean_tensor_path_feature_gap(ours):
    images = _images(512)[:1]
    clean = _with(ours, "clean")
    gap = _max_abs(clean(PRESETS["clean"].tensor(images.float())), clean(_exact("clean", images)))
    assert gap <= CLEAN_TENSOR_FEATURE_TOL


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_no_resize_at_299(preset):
    images = _images(299).float()
    scaled = 2 * (images / 255) - 1 if preset in ("legacy-pytorch", "diffsynth") else (images - 128) / 128
    assert torch.equal(PRESETS[preset].tensor(images), scaled)
    assert torch.equal(_exact(preset, _images(299)), scaled)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_tensor_path_is_differentiable(preset):
    images = _images(256).float().requires_grad_(True)
    PRESETS[preset].tensor(images).square().sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


@torch.no_grad()
def test_both_layouts_load_identically(ours, weights):
    snapshot_root = Path(weights["diffsynth"]).parent.parent  # an ImageMetrics snapshot folder: FID/model.safetensors
    diffsynth = load_inception(snapshot_root, preset="diffsynth")
    assert diffsynth.weights_sha256 == file_sha256(weights["diffsynth"])
    for key, value in ours.net.state_dict().items():
        assert torch.equal(value, diffsynth.net.state_dict()[key]), key
    prepared = _exact("diffsynth", _images(256)[:1])
    assert torch.equal(diffsynth(prepared), ours(prepared))


def test_tiny_builder_caches_and_checks_layout(weights):
    path = Path(weights["upstream"])
    before = path.stat().st_mtime_ns
    assert tiny_fid_inception(path.parent, "upstream") == {"weights": str(path)}
    assert path.stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="layout"):
        tiny_fid_inception(path.parent, "torchscript")


def test_torch_fidelity_layout_without_bn_counters_loads(ours, tmp_path):
    state = {k: v for k, v in ours.net.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(state) == 566 - 94
    torch.save(state, tmp_path / "weights-inception-2015-12-05-6726825d.pth")
    loaded = load_inception(tmp_path / "weights-inception-2015-12-05-6726825d.pth")
    for key, value in state.items():
        assert torch.equal(value, loaded.net.state_dict()[key]), key


def test_wrong_checkpoints_raise_with_keys(ours, tmp_path):
    state = dict(ours.net.state_dict())
    del state["fc.bias"], state["Mixed_7c.branch_pool.bn.num_batches_tracked"]  # counters partly missing
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointMismatchError) as info:
        load_inception(tmp_path / "partial.pth")
    assert set(info.value.missing) == {"fc.bias", "Mixed_7c.branch_pool.bn.num_batches_tracked"}
    torch.save({"blocks.0.0.conv.weight": torch.zeros(32, 3, 3, 3)}, tmp_path / "wrapper.pth")  # pytorch-fid wrapper
    with pytest.raises(CheckpointMismatchError, match="Conv2d_1a_3x3.conv.weight") as info:
        load_inception(tmp_path / "wrapper.pth")
    assert info.value.unexpected == ["blocks.0.0.conv.weight"] and "pytorch-fid" in str(info.value)
    with pytest.raises(FileNotFoundError):
        load_inception(tmp_path / "missing.pth")


def test_default_weights_come_from_the_torch_hub_cache(weights, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="offline"):  # conftest: REWARDKIT_OFFLINE=1, never downloads
        load_inception()
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    assert PYTORCH_FID_WEIGHTS_URL.endswith(UPSTREAM_FILENAME)
    (checkpoints / UPSTREAM_FILENAME).symlink_to(weights["upstream"])
    assert load_inception().weights_sha256 == file_sha256(weights["upstream"])


def test_extractor_stays_frozen_and_identity(ours, weights):
    ours.train()
    assert not ours.training and not ours.net.training
    assert not any(p.requires_grad for p in ours.parameters())
    assert ours.identity() == {"extractor": EXTRACTOR_NAME, "preset": DEFAULT_PRESET, "resolution": "299x299",
                               "weights_sha256": file_sha256(weights["upstream"])}
    assert ours.feature_dim == 2048 and EXTRACTOR_NAME == "fid-inception-v3-2015-12-05"
    assert _with(ours, "torchmetrics").identity()["preset"] == "torchmetrics"


def test_presets_api():
    assert DEFAULT_PRESET == "clean"
    assert sorted(PRESETS) == ["clean", "diffsynth", "legacy-pytorch", "torch-fidelity", "torchmetrics"]
    for name, prep in PRESETS.items():
        assert isinstance(prep, ImagePrep) and prep.preset == name and prep.size == (299, 299)
        assert pickle.loads(pickle.dumps(prep)) == prep
        assert get_preset(name) is prep
    with pytest.raises(ValueError, match="torch-fidelity"):
        get_preset("tensorflow")
    with pytest.raises(ValueError, match="unknown FID preset"):
        load_inception("unused-path", preset="bicubic")


def test_bad_inputs_raise(ours):
    prep = PRESETS["clean"]
    with pytest.raises(TypeError, match="float"):
        prep.tensor(_images(256))  # uint8
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        prep.tensor(torch.zeros(2, 64, 64, 3))
    with pytest.raises(TypeError, match="PIL"):
        prep.pil(np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="prep.tensor"):
        ours(torch.zeros(1, 3, 256, 256))


def test_pil_converts_other_modes_to_rgb():
    image = _pils(_images(256))[0]
    for mode in ("RGBA", "L"):
        converted = image.convert(mode)
        for prep in PRESETS.values():
            assert torch.equal(prep.pil(converted), prep.pil(converted.convert("RGB")))
