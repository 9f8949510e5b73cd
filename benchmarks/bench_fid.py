"""FID end to end and the distance step alone: rewardkit vs pytorch-fid, clean-fid, torchmetrics, torch-fidelity.

Same images, same weights: one seeded random FID-Inception checkpoint in pytorch-fid's layout
(``rewardkit.testing.tiny_fid_inception``, the full-size network, so timings are representative) is
given to every implementation (a private ``TORCH_HOME`` hub cache for pytorch-fid and clean-fid, the
``feature_extractor_weights_path`` argument for torchmetrics and torch-fidelity). Two folders of smooth
random PNGs at ``--size`` px. Each implementation runs in its own subprocess so that its peak resident
memory (``ru_maxrss``) is its own; the time is wall-clock of the whole call (file reading, resize,
network, statistics, distance) after imports, with the same thread count for all.

Implementations and their matching rewardkit preset (for the "FID" column to be comparable):

* pytorch-fid ``calculate_fid_given_paths``                      <-> ``legacy-pytorch``
* clean-fid ``compute_fid(mode="legacy_pytorch")``               <-> ``legacy-pytorch``
* torch-fidelity ``calculate_metrics(fid=True)``                  <-> ``torch-fidelity``
* torchmetrics ``FrechetInceptionDistance`` (uint8 batches, default antialias) <-> ``torchmetrics``

The distance step alone: 2048-d statistics of N=``--stat-samples`` synthetic features; scipy ``sqrtm``
(what pytorch-fid / clean-fid call) vs rewardkit's eigen-form, without and with the reference side's
cached square root (the periodic-evaluation case).

Usage:
    .venv/bin/python benchmarks/bench_fid.py --images 64 --size 512
    .venv/bin/python benchmarks/bench_fid.py --images 8 --size 256 --stat-samples 3000 --out /tmp/smoke.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
PRESET_OF = {"pytorch-fid": "legacy-pytorch", "clean-fid": "legacy-pytorch", "torch-fidelity": "torch-fidelity",
             "torchmetrics": "torchmetrics"}


def make_images(folder: Path, count: int, size: int, seed: int) -> None:
    from PIL import Image

    import rewardkit.testing as rkt

    folder.mkdir(parents=True, exist_ok=True)
    images = (rkt.random_images(count, size, size, seed=seed) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    for index, array in enumerate(images):
        Image.fromarray(array).save(folder / f"{index:05d}.png")


def _uint8_batches(folder: str, batch: int):
    from PIL import Image

    paths = sorted(Path(folder).glob("*.png"))
    for start in range(0, len(paths), batch):
        arrays = [np.asarray(Image.open(p).convert("RGB")) for p in paths[start : start + batch]]
        yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def run_implementation(name: str, real: str, fake: str, weights: str, batch: int) -> float:
    """One FID computation by ``name``; returns the FID (runs inside the timing subprocess)."""
    if name.startswith("rewardkit"):
        import rewardkit as rk

        metric = rk.load("fid", weights=weights, preset=name.split(":")[1], batch_size=batch, progress=False)
        metric.update(real, real=True)
        metric.update(fake, real=False)
        return float(metric.compute())
    if name == "pytorch-fid":
        from pytorch_fid.fid_score import calculate_fid_given_paths

        return float(calculate_fid_given_paths([real, fake], batch, "cpu", 2048, num_workers=0))
    if name == "clean-fid":
        from cleanfid import fid

        return float(fid.compute_fid(real, fake, mode="legacy_pytorch", batch_size=batch, num_workers=0,
                                     device=torch.device("cpu"), verbose=False))
    if name == "torch-fidelity":
        import torch_fidelity

        out = torch_fidelity.calculate_metrics(input1=real, input2=fake, fid=True, cuda=False, batch_size=batch,
                                               feature_extractor_weights_path=weights, verbose=False)
        return float(out["frechet_inception_distance"])
    if name == "torchmetrics":
        from torchmetrics.image.fid import FrechetInceptionDistance

        metric = FrechetInceptionDistance(feature_extractor_weights_path=weights)
        for images in _uint8_batches(real, batch):
            metric.update(images, real=True)
        for images in _uint8_batches(fake, batch):
            metric.update(images, real=False)
        return float(metric.compute())
    raise ValueError(name)


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    value = run_implementation(args.worker, args.real, args.fake, args.weights, args.batch)
    elapsed = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"name": args.worker, "seconds": elapsed, "peak_mib": peak_mib, "fid": value}))


def time_subprocess(name: str, folders: tuple[Path, Path], weights: Path, args: argparse.Namespace, env: dict) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--real", str(folders[0]), "--fake", str(folders[1]),
               "--weights", str(weights), "--batch", str(args.batch), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        return {"name": name, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def distance_step(samples: int, dim: int, repeats: int) -> dict:
    """Seconds of the trace-sqrt step: scipy sqrtm vs rewardkit eigh (cold) vs rewardkit with cached root."""
    import scipy.linalg

    from rewardkit.metrics.frechet import GaussianReference, frechet_distance

    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(dim, dim)) / dim**0.5
    feats = [np.log1p(np.exp(rng.normal(size=(samples, dim)) @ mixing + shift)) for shift in (0.0, 0.2)]
    (mu1, s1), (mu2, s2) = [(f.mean(0), np.cov(f, rowvar=False)) for f in feats]

    def scipy_fid() -> float:
        covmean = scipy.linalg.sqrtm(s1 @ s2).real
        return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))

    t = [torch.from_numpy(a) for a in (mu1, s1, mu2, s2)]
    reference = GaussianReference(t[0], t[1])
    reference.distance(t[2], t[3])  # fills the cache
    timings: dict[str, list[float]] = {"scipy sqrtm": [], "rewardkit eigh": [], "rewardkit eigh, cached reference": []}
    values = {}
    for _ in range(repeats):
        for label, fn in (("scipy sqrtm", scipy_fid), ("rewardkit eigh", lambda: frechet_distance(*t)),
                          ("rewardkit eigh, cached reference", lambda: reference.distance(t[2], t[3]))):
            start = time.perf_counter()
            values[label] = fn()
            timings[label].append(time.perf_counter() - start)
    return {label: {"seconds": min(ts), "fid": values[label]} for label, ts in timings.items()}


def render(results: list[dict], distance: dict, args: argparse.Namespace) -> str:
    lines = [f"# FID benchmark ({datetime.date.today()})", "",
             f"`{' '.join(sys.argv)}` on {platform.processor() or platform.machine()}, {args.threads} threads, "
             f"torch {torch.__version__}; {args.images} + {args.images} PNGs at {args.size} px, random FID-Inception "
             f"weights shared by every implementation; fastest of {args.rounds} interleaved rounds.", "",
             "| implementation | rewardkit preset | seconds | peak RSS MiB | FID | rewardkit seconds | speed ratio (ref / rewardkit) | |ΔFID| |",
             "|---|---|---|---|---|---|---|---|"]
    ours = {r["name"].split(":")[1]: r for r in results if r["name"].startswith("rewardkit") and "error" not in r}
    for r in results:
        if r["name"].startswith("rewardkit"):
            continue
        preset = PRESET_OF[r["name"]]
        mine = ours.get(preset)
        if "error" in r or mine is None:
            lines.append(f"| {r['name']} | {preset} | error: {r.get('error', 'rewardkit failed')} | | | | | |")
            continue
        lines.append(f"| {r['name']} | {preset} | {r['seconds']:.2f} | {r['peak_mib']:.0f} | {r['fid']:.6f} | "
                     f"{mine['seconds']:.2f} (peak {mine['peak_mib']:.0f} MiB) | {r['seconds'] / mine['seconds']:.2f}x | "
                     f"{abs(r['fid'] - mine['fid']):.2e} |")
    if "clean" in ours:
        lines.append(f"| (rewardkit default) | clean | | | {ours['clean']['fid']:.6f} | {ours['clean']['seconds']:.2f} "
                     f"(peak {ours['clean']['peak_mib']:.0f} MiB) | | |")
    base = distance["scipy sqrtm"]
    lines += ["", f"Distance step alone, 2048-d statistics from {args.stat_samples} samples (min of {args.repeats}):", "",
              "| method | seconds | ratio vs sqrtm | |ΔFID| vs sqrtm |", "|---|---|---|---|"]
    for label, row in distance.items():
        lines.append(f"| {label} | {row['seconds']:.3f} | {base['seconds'] / row['seconds']:.1f}x | "
                     f"{abs(row['fid'] - base['fid']):.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--stat-samples", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=2, help="repeats of the distance step")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved end-to-end rounds (fastest kept)")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "fid.md"))
    for name in ("--worker", "--real", "--fake", "--weights"):
        parser.add_argument(name)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    import rewardkit.testing as rkt

    work = Path(tempfile.mkdtemp(prefix="rk-bench-fid-"))
    try:
        weights = Path(rkt.tiny_fid_inception(work / "weights")["weights"])
        hub = work / "torch_home" / "hub" / "checkpoints"
        hub.mkdir(parents=True)
        shutil.copy(weights, hub / WEIGHTS_NAME)  # pytorch-fid and clean-fid find it here, offline
        env = {**os.environ, "TORCH_HOME": str(work / "torch_home"), "HF_HUB_OFFLINE": "1"}
        folders = (work / "real", work / "fake")
        make_images(folders[0], args.images, args.size, seed=1)
        make_images(folders[1], args.images, args.size, seed=2)
        names = [f"rewardkit:{p}" for p in ("legacy-pytorch", "torch-fidelity", "torchmetrics", "clean")] + list(PRESET_OF)
        best: dict[str, dict] = {}
        for _ in range(args.rounds):  # interleaved rounds, fastest kept: load drift hits everyone alike
            for name in names:
                run = time_subprocess(name, folders, weights, args, env)
                print(json.dumps(run), flush=True)
                if name not in best or "error" in best[name] or run.get("seconds", 1e9) < best[name].get("seconds", 1e9):
                    best[name] = run
        results = [best[name] for name in names]
        distance = distance_step(args.stat_samples, 2048, args.repeats)
        report = render(results, distance, args)
        Path(args.out).write_text(report, "utf-8")
        print(report)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
