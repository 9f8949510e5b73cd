"""DiffSynth-Studio's ``FIDMetric`` and ``LPIPSMetric`` (``diffsynth.metrics``) on rewardkit's metrics.

    from rewardkit.metrics import FIDMetric, LPIPSMetric     # was: from diffsynth.metrics import ...
    FIDMetric.from_pretrained(device="cuda").compute("real_dir", "generated_dir")   # -> float
    LPIPSMetric.from_pretrained(net="alex").compute("a.png", "b.png")               # -> float

Same names, ``from_pretrained`` arguments, default files (``DiffSynth-Studio/ImageMetrics``: ``FID/model.safetensors``,
``LPIPS/{alexnet,vgg,squeezenet}.safetensors``) and return types. Where DiffSynth deviates from upstream
(reference/clip_family.md §10-11) rewardkit follows upstream by default:

* FID: ``preset="legacy-pytorch"`` = pytorch-fid's resize (DiffSynth resizes with PIL bicubic on uint8 first:
  ``preset="diffsynth"`` reproduces that), and the exact symmetric eigen-form of the distance (DiffSynth
  always adds ε = 1e-6 to both covariances and clamps the result at 0, which lowers FID by 0.005-0.05).
* LPIPS: pairs must have equal sizes, as in upstream ``lpips``; DiffSynth silently resizes every image to
  ``target_size`` (shortest side, bicubic) and centre-crops when any two sizes differ. Pass ``resize=True``
  to get that behaviour explicitly.
"""

from __future__ import annotations

import os
import pathlib
import warnings
from typing import Any

import torch

# One-way: rewardkit.compat.diffsynth resolves FIDMetric / LPIPSMetric lazily (module __getattr__) and never
# imports this module, so importing either module first works (`rewardkit compare` imports this one first).
from rewardkit.compat.diffsynth import (DEFAULT_DEVICE, ModelConfig, _default, _model_weights, _with_sidecar,
                                       load_for)

__all__ = ["FIDMetric", "LPIPSMetric"]

DIFFSYNTH_BATCH_SIZE = 16  # diffsynth/metrics/fid.py, lpips.py defaults
LPIPS_TARGET_SIZE = 512  # diffsynth/metrics/lpips.py: resize target when sizes differ
_LPIPS_FILES = {"alex": "LPIPS/alexnet.safetensors", "vgg": "LPIPS/vgg.safetensors", "squeeze": "LPIPS/squeezenet.safetensors"}


def _warn_vram(name: str, vram_limit: Any) -> None:
    if vram_limit is not None:
        warnings.warn(f"{name}: vram_limit is ignored by rewardkit (the model is loaded whole)", stacklevel=3)


class FIDMetric(torch.nn.Module):
    """DiffSynth's ``FIDMetric``: FID between two image sets (folders, files, PIL images or lists of them)."""

    def __init__(self, metric: Any) -> None:
        super().__init__()
        self.metric = metric

    @classmethod
    def from_pretrained(cls, model_config: ModelConfig | None = None, device: Any = DEFAULT_DEVICE, *,
                        batch_size: int = DIFFSYNTH_BATCH_SIZE, num_workers: int = 0, vram_limit: float | None = None,
                        preset: str = "legacy-pytorch", **options: Any) -> FIDMetric:
        """Load the FID-Inception weights (default ``FID/model.safetensors`` of DiffSynth-Studio/ImageMetrics)."""
        from rewardkit.metrics.fid import load_fid

        _warn_vram("FIDMetric", vram_limit)
        weights = _model_weights(model_config or _default("FID/model.safetensors", ModelConfig()))
        _with_sidecar(weights, options)
        return cls(load_fid(weights, device=device, preset=preset, batch_size=batch_size, num_workers=num_workers,
                            recursive=True, **options))

    def _with(self, batch_size: int | None, num_workers: int | None) -> Any:
        """The metric with this call's batch size / workers (DiffSynth's per-call overrides; not kept)."""
        import copy

        if batch_size is None and num_workers is None:
            return self.metric
        metric = copy.copy(self.metric)  # shallow: shares the network, owns its settings
        metric.batch_size = batch_size or metric.batch_size
        metric.num_workers = metric.num_workers if num_workers is None else num_workers
        return metric

    def statistics(self, images: Any, batch_size: int | None = None, num_workers: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean (2048,), cov (2048, 2048))`` float64 of ``images``."""
        from rewardkit.metrics.frechet import GaussianStats

        metric = self._with(batch_size, num_workers)
        stats = GaussianStats(metric.extractor.feature_dim)
        for features in metric.iter_features(images):
            stats.update(features)
        if stats.n < 2:
            raise ValueError(f"FIDMetric: need at least 2 images for a covariance, got {stats.n}")
        return stats.mean(), stats.cov()

    @torch.no_grad()
    def compute(self, reference_images: Any, generated_images: Any, batch_size: int | None = None,
                num_workers: int | None = None) -> float:
        """FID between the two sets, a Python float."""
        metric = self._with(batch_size, num_workers)
        metric.reset()
        metric.update(reference_images, real=True)
        metric.update(generated_images, real=False)
        value = float(metric.compute())
        metric.reset()
        return value

    forward = compute


def _pairs(image_a: Any, image_b: Any, what: str = "LPIPSMetric", recursive: bool = False
           ) -> list[tuple[Any, Any, str]]:
    """DiffSynth's pairing: two images, or two folders matched by file stem (first in sorted order wins).

    ``what`` names the caller in error messages (``rewardkit compare`` shares this pairing). With
    ``recursive=True`` sub-folders are searched too and files match by relative path without extension.
    """
    from rewardkit.image_io import list_images

    is_dir = [isinstance(x, (str, os.PathLike)) and pathlib.Path(x).is_dir() for x in (image_a, image_b)]
    if is_dir[0] != is_dir[1]:
        raise ValueError(f"{what}: compare two images or two folders, not a folder with a file")
    if not is_dir[0]:
        return [(image_a, image_b, "pair")]
    stems: list[dict[str, pathlib.Path]] = []
    for folder in (image_a, image_b):
        by_stem: dict[str, pathlib.Path] = {}
        for path in list_images(folder, recursive=recursive):
            key = path.relative_to(folder).with_suffix("").as_posix() if recursive else path.stem
            by_stem.setdefault(key, path)
        stems.append(by_stem)
    common = sorted(set(stems[0]) & set(stems[1]))
    if not common:
        raise ValueError(f"{what}: no file names (without extension) in common between {image_a} and {image_b}")
    return [(stems[0][s], stems[1][s], s) for s in common]


class LPIPSMetric(torch.nn.Module):
    """DiffSynth's ``LPIPSMetric``: mean LPIPS over two images or two folders of name-matched images."""

    def __init__(self, reward: Any, batch_size: int = DIFFSYNTH_BATCH_SIZE, target_size: int = LPIPS_TARGET_SIZE,
                 resize: bool = False) -> None:
        super().__init__()
        self.reward, self.batch_size, self.target_size, self.resize = reward, batch_size, target_size, resize

    @classmethod
    def from_pretrained(cls, net: str = "alex", model_config: ModelConfig | None = None, device: Any = DEFAULT_DEVICE,
                        *, batch_size: int = DIFFSYNTH_BATCH_SIZE, target_size: int = LPIPS_TARGET_SIZE,
                        vram_limit: float | None = None, resize: bool = False, **options: Any) -> LPIPSMetric:
        """Load LPIPS v0.1 (default: DiffSynth-Studio/ImageMetrics ``LPIPS/<net>.safetensors``)."""
        if net not in _LPIPS_FILES:
            raise ValueError(f"LPIPSMetric: net must be one of {sorted(_LPIPS_FILES)}, got {net!r}")
        _warn_vram("LPIPSMetric", vram_limit)
        weights = _model_weights(model_config or _default(_LPIPS_FILES[net], ModelConfig()))
        reward = load_for("LPIPSMetric", "lpips", weights, device=device, net=net, **options)
        return cls(reward, batch_size, target_size, resize)

    def _tensor(self, item: Any) -> torch.Tensor:
        from rewardkit.image_io import as_rgb, load_image, pil_to_tensor

        image = load_image(item) if isinstance(item, (str, os.PathLike)) else as_rgb(item)
        if self.resize:
            from torchvision.transforms import functional as TF
            from torchvision.transforms import InterpolationMode

            image = TF.center_crop(TF.resize(image, self.target_size, InterpolationMode.BICUBIC), self.target_size)
        return pil_to_tensor(image)

    @torch.no_grad()
    def compute(self, image_a: Any, image_b: Any) -> float:
        """Mean LPIPS over the pairs (a single pair: its LPIPS), a Python float (lower = more similar)."""
        values = []
        pairs = _pairs(image_a, image_b)
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            a, b = [self._tensor(x) for x, _, _ in chunk], [self._tensor(y) for _, y, _ in chunk]
            for (x, y, label), ta, tb in zip(chunk, a, b):
                if ta.shape != tb.shape:
                    raise ValueError(f"LPIPSMetric: {label}: sizes differ ({tuple(ta.shape[1:])} vs {tuple(tb.shape[1:])}); "
                                     "upstream LPIPS compares equal sizes. Resize the images, or pass resize=True to "
                                     f"resize every image to {self.target_size} and centre-crop it (DiffSynth's behaviour)")
            device = next(self.reward.parameters()).device
            by_size: dict[tuple[int, ...], list[int]] = {}
            for index, ta in enumerate(a):  # one batch per image size within the chunk
                by_size.setdefault(tuple(ta.shape), []).append(index)
            for rows in by_size.values():
                batch_a = torch.stack([a[i] for i in rows]).to(device)
                values.append(self.reward(batch_a, reference=torch.stack([b[i] for i in rows]).to(device)))
        return float(torch.cat(values).double().mean())

    forward = compute
