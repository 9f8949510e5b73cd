"""``rewardkit verify``: score reference images with rewardkit and with the upstream code, on real weights.

For users with network access: each check resolves the reward's real default weights (or the ones given),
scores deterministic reference images (generated here from a seed: no image bytes ship in the package)
with rewardkit and with the upstream implementation where it is installed, and reports the largest
absolute difference against a stated tolerance. Anything that cannot be checked (offline and not cached,
upstream package missing) is reported as not checked, with the exact reason; nothing is skipped silently.

Checks (upstream side in brackets):

* ``fid``: FID-Inception pool3 features, ``legacy-pytorch`` preset [pytorch-fid ``InceptionV3`` on the
  same state dict], or for a TorchScript file (NVIDIA's ``inception-2015-12-05.pt``) [the TorchScript
  module's own forward];
* ``aesthetic``: LAION aesthetic scores [transformers ``CLIPModel.get_image_features`` ->
  numpy L2 normalisation -> the improved-aesthetic-predictor ``MLP`` (``simple_inference.py``, reproduced)];
* ``lpips``: LPIPS distances [``lpips.LPIPS(pretrained=True)`` with rewardkit's resolved trunk tensors];
* ``pickscore``, ``clip-score``, ``hpsv2``, ``hpsv2.1``, ``bioclip``: :mod:`rewardkit.verify_clip`;
* ``imagereward``: :mod:`rewardkit.verify_imagereward`.

The row type, the reference images and prompts live in :mod:`rewardkit.verify_common`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from rewardkit.verify_clip import CLIP_CHECKS
from rewardkit.verify_common import UINT8_LEVELS, Check, max_abs_diff, reference_images, version_of
from rewardkit.verify_imagereward import check_imagereward

__all__ = ["Check", "CHECKS", "NO_CHECK", "reference_images", "run_verify", "format_table", "write_table"]

logger = logging.getLogger(__name__)

FID_FEATURE_TOL = 1e-4  # pool3 features (about 0-5): float32 convolutions, different but equal-order kernels
AESTHETIC_TOL = 1e-4  # aesthetic scores (about 1-10)
LPIPS_TOL = 1e-5  # LPIPS distances (about 0-1)


def _check_fid(options: dict[str, Any]) -> Check:
    from rewardkit.metrics.inception import PYTORCH_FID_WEIGHTS_URL, _weight_file, is_torchscript, load_inception
    from rewardkit.weights import read_state_dict, resolve_weights

    path = _weight_file(resolve_weights(options.get("weights") or PYTORCH_FID_WEIGHTS_URL, what="fid"))
    extractor = load_inception(path, preset="legacy-pytorch")
    images = reference_images()
    with torch.inference_mode():
        ours = extractor(extractor.prep.tensor(images * UINT8_LEVELS))
        if is_torchscript(path):  # NVIDIA's module takes the network input as rewardkit prepares it
            module = torch.jit.load(str(path), map_location="cpu").eval()
            theirs = module(extractor.prep.tensor(images * UINT8_LEVELS))
            upstream = f"NVIDIA TorchScript forward (torch {torch.__version__})"
        else:
            import pytorch_fid.inception as pfi

            original = pfi.load_state_dict_from_url
            pfi.load_state_dict_from_url = lambda url, **_: read_state_dict(path)  # the same resolved file
            try:
                net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
            finally:
                pfi.load_state_dict_from_url = original
            theirs = net(images)[0].flatten(1)
            upstream = version_of("pytorch-fid")
    diff = max_abs_diff(ours, theirs)
    return Check("fid", upstream, diff, FID_FEATURE_TOL, diff <= FID_FEATURE_TOL,
                 f"pool3 features of {len(images)} images ({path.name})")


class _UpstreamAestheticMLP(torch.nn.Module):
    """improved-aesthetic-predictor ``simple_inference.py`` ``MLP`` layer stack (a LightningModule upstream)."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _check_aesthetic(options: dict[str, Any]) -> Check:
    import numpy as np
    from transformers import CLIPModel

    import rewardkit as rk
    from rewardkit.preprocess import preprocess
    from rewardkit.rewards.aesthetic import DEFAULT_CLIP, DEFAULT_HEAD
    from rewardkit.rewards.clip_common import HF_FOLDER_PATTERNS
    from rewardkit.weights import resolve_weights

    head = resolve_weights(options.get("weights") or DEFAULT_HEAD, what="aesthetic")
    clip = resolve_weights(options.get("clip_weights") or DEFAULT_CLIP, allow_patterns=HF_FOLDER_PATTERNS,
                           what="aesthetic CLIP")
    reward = rk.load("aesthetic", weights=str(head), clip_weights=str(clip))
    state = torch.load(head, map_location="cpu", weights_only=True)
    mlp = _UpstreamAestheticMLP(state["layers.0.weight"].shape[1])
    mlp.load_state_dict(state, strict=True)
    images = reference_images()
    with torch.inference_mode():
        ours = reward(images)
        model = CLIPModel.from_pretrained(str(clip)).eval()  # the full CLIP class upstream's clip.load mirrors
        embeds = model.get_image_features(pixel_values=preprocess(images, reward.spec))
        embeds = getattr(embeds, "pooler_output", embeds).numpy()  # transformers 5 may wrap the tensor
        norms = np.linalg.norm(embeds, 2, -1, keepdims=True)
        theirs = mlp.eval()(torch.from_numpy(embeds / np.where(norms == 0, 1, norms)).float()).squeeze(-1)
    diff = max_abs_diff(ours, theirs)
    return Check("aesthetic", f"{version_of('transformers')} + improved-aesthetic-predictor MLP", diff, AESTHETIC_TOL,
                 diff <= AESTHETIC_TOL, f"scores of {len(images)} images (head {head.name}, CLIP {clip.name})")


def _check_lpips(options: dict[str, Any]) -> Check:
    import lpips

    from rewardkit.metrics.lpips import load_lpips

    net = options.get("net", "alex")
    ours_metric = load_lpips(weights=options.get("weights"), net=net)
    reference = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True, verbose=False).eval()
    # The same trunk tensors (lpips would otherwise fetch torchvision's file itself); its heads stay lpips' own.
    mapped = {k: v for k, v in ours_metric.network.state_dict().items() if k.startswith("net.")}
    reference.load_state_dict({**reference.state_dict(), **mapped}, strict=True)
    images = reference_images()
    other = reference_images().flip(-1)
    with torch.inference_mode():
        ours = ours_metric(images, reference=other)
        theirs = reference(images * 2 - 1, other * 2 - 1).flatten()
    diff = max_abs_diff(ours, theirs)
    return Check("lpips", version_of("lpips"), diff, LPIPS_TOL, diff <= LPIPS_TOL,
                 f"{net} distances of {len(images)} pairs (lpips' own heads, rewardkit's trunk tensors)")


CHECKS: dict[str, Callable[[dict[str, Any]], Check]] = {
    "fid": _check_fid, "aesthetic": _check_aesthetic, "lpips": _check_lpips, **CLIP_CHECKS,
    "imagereward": check_imagereward,
}
_NOT_CHECKABLE = (OSError, ImportError, RuntimeError)  # offline / not cached, upstream missing, hub errors

_WEIGHTLESS = ("no weights to download: its parity with {} runs in rewardkit's own test suite on any machine "
               "(`pip install -e \".[dev]\" && python -m pytest`)")
_JUDGE = ("a VLM judge: its scores come from the model you serve or load, so there is nothing fixed to compare; "
          "prompt, parsing and score arithmetic are tested against {} in rewardkit's test suite")
#: Registered names that have no upstream comparison here, and why: each gets a "not checked" row saying so.
NO_CHECK: dict[str, str] = {
    "kid": "KID embeds with the FID Inception: `rewardkit verify fid` checks that network; the KID arithmetic is "
           "tested against torch-fidelity in rewardkit's test suite",
    "inception-score": "the Inception Score uses the FID Inception's classifier: `rewardkit verify fid` checks that "
                       "network (with a classifier-bearing file); the IS arithmetic is tested against torch-fidelity "
                       "in rewardkit's test suite",
    "hpsv3": "the upstream package (hpsv3 1.0.0) pins transformers 4.45 and cannot be installed beside rewardkit; "
             "its forward is reproduced on transformers' Qwen2-VL and compared in rewardkit's test suite",
    "cmmd": "upstream (google-research cmmd) is a TensorFlow script, not an installable package; embeddings and MMD "
            "are compared with its pipeline reproduced in rewardkit's test suite",
    "fd-dinov2": "upstream (layer6ai-labs dgm-eval) is not on PyPI; its DINOv2 transform and features are "
                 "reproduced and compared in rewardkit's test suite",
    "geneval": "upstream's detector needs mmdetection 2.x with mmcv-full (a CUDA build); with backend='mmdet' "
               "rewardkit runs that detector itself, and the scoring rules are compared with upstream's in "
               "rewardkit's test suite",
    "ocr": "its real weights (PP-OCRv4 ONNX) ship inside rapidocr-onnxruntime, so its real-model tests run offline "
           "in rewardkit's test suite; the score formula is compared with flow_grpo's there",
    "unified-reward-2": _JUDGE.format("UnifiedReward's inference scripts"),
    "unified-reward-edit": _JUDGE.format("UnifiedReward's inference scripts"),
    "qwen-image-bench": _JUDGE.format("Qwen-Image-Bench's judge.py and score_utils.py"),
    "ssim": _WEIGHTLESS.format("scikit-image and torchmetrics"),
    "ms-ssim": _WEIGHTLESS.format("torchmetrics and pytorch-msssim"),
    "psnr": _WEIGHTLESS.format("scikit-image"),
    "jpeg-compressibility": _WEIGHTLESS.format("ddpo-pytorch"),
    "jpeg-incompressibility": _WEIGHTLESS.format("ddpo-pytorch"),
}


def run_verify(names: list[str] | None = None, options: dict[str, dict[str, Any]] | None = None) -> list[Check]:
    """Run the checks of ``names`` (default: all of :data:`CHECKS`).

    Args:
        names: registry names; those in :data:`NO_CHECK` get a "not checked" row with the reason, a name that is
            in neither table raises before any work.
        options: per-name load options, e.g. ``{"fid": {"weights": "/path/inception-2015-12-05.pt"}}``
            (``weights`` may be a local path, an ``hf:``/``ms:`` spec or an ``http(s)://`` URL).

    Returns:
        One :class:`Check` per name; a check that could not run has ``passed=None`` and the reason in ``note``.
    """
    names = list(names or CHECKS)
    unknown = [n for n in names if n not in CHECKS and n not in NO_CHECK]
    if unknown:
        raise ValueError(f"rewardkit verify: unknown name(s) {unknown}; checks: {sorted(CHECKS)} (these have no "
                         f"upstream comparison and say why: {sorted(NO_CHECK)})")
    options = options or {}
    checks = []
    for name in names:
        if name in NO_CHECK:
            checks.append(Check(name, "", None, None, None, f"not checked: {NO_CHECK[name]}"))
            continue
        try:
            checks.append(CHECKS[name](dict(options.get(name, {}))))
        except _NOT_CHECKABLE as exc:
            logger.info("verify %s: not checked (%s)", name, exc)
            checks.append(Check(name, "", None, None, None, f"not checked: {type(exc).__name__}: {exc}"))
    return checks


def format_table(checks: list[Check]) -> str:
    """A markdown table: reward, upstream and version, max |Δ|, tolerance, pass, note."""
    lines = ["| reward | upstream | max abs diff | tolerance | pass | note |", "|---|---|---|---|---|---|"]
    for c in checks:
        diff = "-" if c.max_abs_diff is None else f"{c.max_abs_diff:.3e}"
        verdict = {True: "yes", False: "NO", None: "not checked"}[c.passed]
        tolerance = "-" if c.tolerance is None else f"{c.tolerance:.0e}"
        lines.append(f"| {c.reward} | {c.upstream or '-'} | {diff} | {tolerance} | {verdict} | {c.note} |")
    return "\n".join(lines)


def write_table(checks: list[Check], path: str | Path) -> Path:
    """Write ``.json`` (a list of rows) or markdown (any other suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        path.write_text(format_table(checks) + "\n")
    return path
