"""GPU check: fp32 / bf16 / fp16 agreement with CPU fp32, throughput and peak memory, in a few minutes.

For pickscore, hpsv2, imagereward, aesthetic, the FID-Inception (pool3 features) and LPIPS: the CPU fp32
output of the same weights is the reference; each (device, dtype, variant) row reports max |Δ| against it,
Spearman's rank correlation, images/s (median of ``--repeats`` timed calls after a warm-up) and peak device
memory. Variants on CUDA:

* ``sdpa``: the library default; attention runs through ``F.scaled_dot_product_attention``, which picks the
  fused (flash / memory-efficient / cuDNN) kernels on CUDA;
* ``math``: the same call under ``sdpa_kernel(SDPBackend.MATH)``: the unfused reference attention, so the
  difference to ``sdpa`` is what the fused kernels give. A row equal to ``sdpa`` means the model's attention
  does not go through SDPA (or the fused kernels were not eligible);
* ``strict``: float32 rows with TF32 off (``torch.backends.cudnn.allow_tf32`` / ``cuda.matmul.allow_tf32``
  False). PyTorch runs float32 cuDNN convolutions in TF32 by default on Ampere and newer, so the default
  ``fp32`` rows of the convolutional networks (FID-Inception, LPIPS) are TF32 rows;
* ``compile``: ``torch.compile`` of the whole reward (run last, while ``--budget-s`` lasts; skipped rows say so).

Weights (``--weights``):

* ``real``: each reward's real default weights (network or the hub cache needed);
* ``random``: seeded random weights at the real architectures' sizes, written in each reward's real checkpoint
  format and loaded through ``rk.load``: PickScore / HPSv2 = laion ViT-H/14 towers, the aesthetic tower =
  OpenAI ViT-L/14 (with the real LAION head if ``--aesthetic-head`` names it), ImageReward = BLIP ViT-L/16 +
  BERT-base, FID-Inception = the full InceptionV3, LPIPS = the full AlexNet trunk and v0.1 heads. Offline;
  throughput and memory are those of the real models, agreement is that of random (not trained) weights;
* ``tiny``: tiny seeded random models from ``rewardkit.testing`` (offline smoke run: numbers only show that
  every path runs). ``--tiny`` is short for ``--weights tiny``.

Rows are appended to ``--out`` as they are measured (``benchmarks/results/gpu.md``), so a run stopped by a
time limit keeps what it measured.

Usage: ``python benchmarks/gpu_check.py --weights random`` on a CUDA machine; ``python benchmarks/gpu_check.py
--device cpu --tiny`` for the smoke run the tests do.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import describe  # noqa: E402

MODELS = ("pickscore", "hpsv2", "imagereward", "aesthetic", "fid-inception", "lpips")
DTYPES = ("fp32", "bf16", "fp16")
WEIGHTS = ("real", "random", "tiny")
VARIANTS = ("sdpa", "strict", "math", "compile")
PROMPT = "a photograph of a red fox in the snow"
_CLIP_SIZES = {"pickscore": "vit-h-14", "hpsv2": "vit-h-14", "aesthetic": "vit-l-14"}  # clip_bench.SIZES keys
_IMAGEREWARD_SIZE = "vit-l-16"  # bench_imagereward.SIZES key: ImageReward v1.0's shapes


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [t.double().argsort().argsort().double() for t in (a.flatten(), b.flatten())]
    ra, rb = (r - r.mean() for r in ranks)
    denominator = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denominator) if denominator > 0 else float("nan")


def load_options(name: str, weights: str, root: Path, aesthetic_head: Path | None) -> dict[str, Any]:
    """The ``rk.load`` keyword arguments of ``name`` for the chosen weights (checkpoints written under ``root``)."""
    import rewardkit.testing as rkt

    if weights == "real":
        return {}
    if name == "fid-inception":
        return rkt.tiny_fid_inception(root / name)  # random, but the full InceptionV3 (it has no smaller form)
    if weights == "tiny" or name == "lpips":  # LPIPS' tiny builder is the full AlexNet trunk with random weights
        from rewardkit.registry import get_entry

        return getattr(rkt, get_entry(name).tiny)(root / name)
    if name == "imagereward":
        from bench_imagereward import SIZES, write_checkpoint
        from rewardkit.nets.blip import ImageRewardConfig

        return write_checkpoint(root / name, ImageRewardConfig.coerce(SIZES[_IMAGEREWARD_SIZE]), seed=0)
    from clip_bench.checkpoints import SIZES, write_checkpoint

    options = write_checkpoint(name, root / name, SIZES[_CLIP_SIZES[name]], 0)["rk"]
    if name == "aesthetic" and aesthetic_head is not None:
        options["weights"] = str(aesthetic_head)  # the real LAION head on the random ViT-L/14 tower
    return options


class FastInception(torch.nn.Module):
    """An ``InceptionExtractor``'s fast-mode forward as a module of its own, so that ``.to()`` moves it and the
    ``compile`` variant compiles what rewardkit's FID runs in ``dtype`` (not the exact network)."""

    def __init__(self, extractor: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.extractor, self.dtype, self.prep = extractor, dtype, extractor.prep

    def forward(self, prepared: torch.Tensor) -> torch.Tensor:
        return self.extractor.forward_low_precision(prepared, self.dtype)


class Model:
    """A loaded model plus how to call it: ``images (B,3,H,W) in [0,1] -> float32 (B,)`` or ``(B, D)``."""

    def __init__(self, name: str, dtype: str, options: dict[str, Any]) -> None:
        import rewardkit as rk

        mode = None if dtype == "fp32" else dtype
        self.autocast: str | None = None
        if name == "fid-inception":
            from rewardkit.metrics.inception import load_inception

            from rewardkit.precision import parse_dtype

            # The extractor takes no dtype=: rewardkit's FID runs its forward_low_precision (the BatchNorm-folded
            # copy in the low dtype) under autocast, and so does this check.
            extractor = load_inception(options.get("weights"))
            low = parse_dtype(mode)
            self.module: torch.nn.Module = extractor if low is None else FastInception(extractor, low)
            self.call: Callable[..., torch.Tensor] = lambda m, x: m(m.prep.tensor(x * 255))
            self.autocast = mode
        elif name == "lpips":
            self.module = rk.load("lpips", **options, dtype=mode)
            self.call = lambda m, x: m(x, reference=x.flip(-1))
        else:
            self.module = rk.load(name, **options, dtype=mode)
            self.call = lambda m, x: m(x, PROMPT)
        self.compiled: Any = None

    def to(self, device: str) -> "Model":
        self.module = self.module.to(device)
        return self

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from rewardkit.precision import autocast_for, parse_dtype

        with torch.inference_mode(), autocast_for(images.device, parse_dtype(self.autocast)):
            target = self.compiled if self.compiled is not None else self.module  # a module has no truth value
            return self.call(target, images).float()


@contextlib.contextmanager
def variant_context(variant: str) -> Iterator[None]:
    """``math`` pins SDPA to its unfused math kernel; ``strict`` turns TF32 off for float32 convolutions and
    matmuls (PyTorch's defaults: on for cuDNN convolutions, off for matmuls); the others change nothing."""
    if variant == "math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            yield
    elif variant == "strict":
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    else:
        yield


def measure(model: Model, images: torch.Tensor, reference: torch.Tensor, repeats: int,
            variant: str) -> dict[str, float]:
    """Warm up (and compile), then time ``repeats`` calls; agreement against the CPU fp32 ``reference``."""
    device = images.device
    with variant_context(variant):
        out = model(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = model(images)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    times.sort()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    out = out.cpu()
    return {"max_abs": float((out - reference).abs().max()), "spearman": _spearman(out, reference),
            "images_s": images.shape[0] / times[len(times) // 2], "peak_mib": peak}


def plan(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """The (model, dtype, variant) rows in run order: ``sdpa``, ``strict``, ``math``, then ``compile``."""
    cuda = args.device.startswith("cuda")
    rows = [(m, d, "sdpa") for m in args.models for d in args.dtypes] if "sdpa" in args.variants or not cuda else []
    if cuda and "strict" in args.variants and "fp32" in args.dtypes:
        rows += [(m, "fp32", "strict") for m in args.models]
    if cuda and "math" in args.variants:
        rows += [(m, d, "math") for m in args.models for d in args.dtypes if d != "fp32"]
    if cuda and "compile" in args.variants:
        rows += [(m, d, "compile") for d in ("bf16", "fp32") if d in args.dtypes for m in args.models]
    return rows


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Measure every planned row; rows past ``--budget-s`` are returned as skipped (``images_s`` NaN)."""
    from rewardkit.testing import random_images

    root = Path(tempfile.mkdtemp(prefix="rk-gpu-check-"))
    side = 64 if args.weights == "tiny" else 512
    images = random_images(args.batch, side, side, seed=0)
    started = time.perf_counter()
    options = {name: load_options(name, args.weights, root, args.aesthetic_head) for name in args.models}
    references = {}
    for name in args.models:
        references[name] = Model(name, "fp32", options[name])(images).cpu()
        print(f"{name}: CPU fp32 reference ready ({time.perf_counter() - started:.0f} s)", flush=True)
    rows: list[dict[str, Any]] = []
    loaded: dict[tuple[str, str], Model] = {}
    nan = float("nan")
    for name, dtype, variant in plan(args):
        row: dict[str, Any] = {"model": name, "dtype": dtype, "variant": variant}
        if time.perf_counter() - started > args.budget_s:
            row.update(max_abs=nan, spearman=nan, images_s=nan, peak_mib=nan, note="skipped: --budget-s spent")
        else:
            try:
                key = (name, dtype)
                if key not in loaded:
                    loaded.clear()  # one model on the device at a time: peak memory is that model's
                    if args.device.startswith("cuda"):
                        torch.cuda.empty_cache()
                    loaded[key] = Model(name, dtype, options[name]).to(args.device)
                model = loaded[key]
                model.compiled = torch.compile(model.module) if variant == "compile" else None
                row.update(measure(model, images.to(args.device), references[name], args.repeats, variant), note="")
            except Exception as exc:  # noqa: BLE001 - a row that fails is reported, the others still run
                row.update(max_abs=nan, spearman=nan, images_s=nan, peak_mib=nan,
                           note=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        rows.append(row)
        print(row, flush=True)
        if args.out:
            args.out.write_text(render(rows, args))
    return rows


def render(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = ["# GPU check: agreement with CPU fp32, throughput, peak memory", "",
             *[f"- {line}" for line in describe()],
             f"- device {args.device}, batch {args.batch} of {64 if args.weights == 'tiny' else 512}px images, "
             f"weights: {WEIGHT_NOTES[args.weights]}", "",
             "| model | dtype | variant | max abs Δ vs CPU fp32 | Spearman | images / s | peak MiB | note |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r['model']} | {r['dtype']} | {r['variant']} | {r['max_abs']:.3e} | {r['spearman']:.4f} | "
              f"{r['images_s']:.1f} | {r['peak_mib']:.0f} | {r.get('note', '')} |" for r in rows]
    return "\n".join(lines) + "\n"


WEIGHT_NOTES = {
    "real": "the real default weights",
    "random": "seeded random weights at the real architectures' sizes (ViT-H/14, ViT-L/14, BLIP ViT-L/16 + "
              "BERT-base, InceptionV3, AlexNet): real speed and memory, agreement of untrained weights",
    "tiny": "tiny random models (smoke run: the numbers only show that every path runs)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--weights", default="real", choices=WEIGHTS)
    parser.add_argument("--tiny", action="store_true", help="short for --weights tiny (offline smoke run)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="the CUDA variants to run (CPU runs the sdpa rows only)")
    parser.add_argument("--aesthetic-head", type=Path, help="the real LAION head (.pth) for --weights random")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="start no new row after this many seconds (the rest are listed as skipped)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu.md")
    args = parser.parse_args(argv)
    if args.tiny:
        args.weights = "tiny"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here; use --device cpu --tiny for the smoke run")
    if args.aesthetic_head is not None and not args.aesthetic_head.is_file():
        parser.error(f"--aesthetic-head {args.aesthetic_head}: no such file")
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    run(args)
    print(f"written to {args.out}")
    return args.out


if __name__ == "__main__":
    main()
