"""FID (Heusel et al. 2017) and every Fréchet distance on Gaussian feature statistics (FD-DINOv2).

The network is the TF ``inception-2015-12-05`` port shared by pytorch-fid, torch-fidelity, torchmetrics
and clean-fid (``rewardkit.nets.fid_inception``); what differs between those packages is the resize
before the network, which rewardkit names (``rewardkit.metrics.fid_presets``) and stores with every
statistics file:

============== ===================================================== =================================
preset         resize to 299 (and input scaling)                     equals
============== ===================================================== =================================
clean          PIL bicubic on float32, no re-quantisation; (x-128)/128 clean-fid ``mode="clean"``
legacy-pytorch torch bilinear, no antialias, on [0, 1]; 2x-1          pytorch-fid, clean-fid legacy_pytorch
torch-fidelity TF1 bilinear (asymmetric, no antialias); (x-128)/128   torch-fidelity, TTUR-style graph resize
torchmetrics   torch bilinear + antialias; (x-128)/128                torchmetrics >= 1.8 (default)
diffsynth      PIL bicubic on uint8; 2x-1                             DiffSynth-Studio ``FIDMetric``
============== ===================================================== =================================

The default is ``clean``: it is the only preset whose resize is a proper antialiased filter (the others
alias when downsampling and shift FID by up to several points, see clean-fid's paper, Parmar et al.
CVPR 2022), and it is what recent text-to-image papers report as "clean-FID". Use ``legacy-pytorch`` or
``torch-fidelity`` to reproduce numbers computed with those packages (or with pytorch-fid's published
``.npz`` files, loaded with ``foreign=True``).

Statistics are float64 running sums (``rewardkit.metrics.frechet``); the distance uses the symmetric
eigen-form, with the reference side's square root cached.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from rewardkit.metrics.base import FeatureMetric
from rewardkit.metrics.extractor import FeatureExtractor
from rewardkit.metrics.frechet import (GaussianReference, GaussianStats, check_identity, load_statistics,
                                      save_statistics, sync_sum)

__all__ = ["FrechetDistance", "load_fid", "MIN_IMAGES"]

#: A covariance needs two samples; fewer on a side is an error, never 0.0 (torchmetrics #1652).
MIN_IMAGES = 2


class FrechetDistance(FeatureMetric):
    """Fréchet distance between the real (or fixed reference) and generated feature Gaussians.

    ``update(images, real=True|False)`` streams images into float64 sums; ``compute()`` returns the
    distance as a 0-dim float64 tensor. With ``reference=`` (a statistics file or a
    ``GaussianReference``) the real side is fixed and its square root is computed once.

    Multi-process: every rank updates with its own images (any batch sizes), then every rank calls
    ``sync(accelerator_or_group)`` (one all-reduce of both sides) and ``compute()``.
    """

    name = "fid"
    higher_is_better = False

    def __init__(self, extractor: FeatureExtractor, *, reference: Any = None, foreign_reference: bool = False,
                 name: str | None = None, **options: Any) -> None:
        super().__init__(extractor, **options)
        if name is not None:
            self.name = name
        dim = extractor.feature_dim
        self.real, self.fake = GaussianStats(dim), GaussianStats(dim)
        self._reference: GaussianReference | None = None
        self._real_cache: tuple[int, GaussianReference] | None = None
        self._synced = False
        if reference is not None:
            self.set_reference(reference, foreign=foreign_reference)

    # -- reference side -------------------------------------------------------------------------------
    def set_reference(self, reference: str | os.PathLike | GaussianReference, *, foreign: bool = False) -> None:
        """Fix the real side to precomputed statistics (a ``.npz`` path or a ``GaussianReference``).

        Raises:
            StatisticsMismatchError: the statistics were made with another extractor / preset / weights.
            ValueError: a dimension that differs from this extractor's features.
        """
        if not isinstance(reference, GaussianReference):
            reference, _ = load_statistics(reference, identity=self.extractor.identity(), foreign=foreign)
        else:
            reference.check_identity(self.extractor.identity())
        if reference.mu.shape[0] != self.extractor.feature_dim:
            raise ValueError(f"{self.name}: reference statistics have dimension {reference.mu.shape[0]}, this "
                             f"extractor gives {self.extractor.feature_dim}")
        self._reference = reference

    @property
    def has_fixed_reference(self) -> bool:
        """Whether the real side is fixed by reference statistics (``reference=`` / ``set_reference``)."""
        return self._reference is not None

    def reference_statistics(self) -> GaussianReference:
        """The real side as a ``GaussianReference`` (the fixed one, or built from the real images so far)."""
        if self._reference is not None:
            return self._reference
        self._check_count(self.real, "real")
        if self._real_cache is None or self._real_cache[0] != self.real.version:
            meta = {**self.extractor.identity(), "metric": self.name}
            self._real_cache = (self.real.version, GaussianReference.from_stats(self.real, meta))
        return self._real_cache[1]

    def save_reference(self, path: str | os.PathLike) -> None:
        """Write the real side's statistics (with this extractor's identity) to ``path`` (``.npz``)."""
        save_statistics(path, self.reference_statistics())

    # -- state ----------------------------------------------------------------------------------------
    def _check_update(self, real: bool) -> None:
        if self._synced:
            raise RuntimeError(f"{self.name}: this metric was already synced across processes; call reset() "
                               "before adding more images (updating after sync would count shards twice)")
        if real and self._reference is not None:
            raise ValueError(f"{self.name}: the real side is fixed by reference statistics; pass real=False, or "
                             "build the metric without reference= to accumulate real images")

    def _new_stage(self) -> GaussianStats:
        # Staged as float64 sums (2 + D + D² numbers), whatever the number of images.
        return GaussianStats(self.extractor.feature_dim)

    def _stage(self, staged: GaussianStats, features: torch.Tensor, real: bool) -> None:
        staged.update(features)

    def _commit(self, staged: GaussianStats, real: bool) -> None:
        (self.real if real else self.fake).merge(staged)

    def get_extra_state(self) -> dict[str, Any]:
        """The statistics for ``state_dict()``: both sides' sums, the fixed reference (with its cached
        ``√Σ``), the sync flag and the extractor identity they belong to (plain tensors, ints, strings)."""
        return {"identity": self.extractor.identity(), "real": self.real.state_dict(), "fake": self.fake.state_dict(),
                "reference": None if self._reference is None else self._reference.state_dict(),
                "synced": self._synced}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`get_extra_state` (via ``load_state_dict``); refuses another extractor's statistics."""
        check_identity(dict(state["identity"]), self.extractor.identity(), what=f"{self.name} state")
        reference = None if state["reference"] is None else GaussianReference.from_state_dict(state["reference"])
        if reference is not None and reference.mu.shape[0] != self.extractor.feature_dim:
            raise ValueError(f"{self.name} state: reference dimension {reference.mu.shape[0]}, this extractor gives "
                             f"{self.extractor.feature_dim}")
        for stats, side in ((self.real, "real"), (self.fake, "fake")):
            GaussianStats(stats.dim).load_state_dict(state[side])  # validate both sides before changing either
        self.real.load_state_dict(state["real"])
        self.fake.load_state_dict(state["fake"])
        self._reference, self._real_cache, self._synced = reference, None, bool(state["synced"])

    def statistics(self, real: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(μ (D,), Σ (D, D))`` float64 of one side."""
        stats = self.real if real else self.fake
        self._check_count(stats, "real" if real else "generated")
        return stats.mean(), stats.cov()

    def compute(self) -> torch.Tensor:
        """The Fréchet distance, a 0-dim float64 tensor (the raw value: ~-1e-10 is possible for equal sets).

        Raises:
            ValueError: fewer than 2 images on a side.
        """
        reference = self.reference_statistics()
        mu, sigma = self.statistics(real=False)
        return torch.tensor(reference.distance(mu, sigma), dtype=torch.float64)

    def reset(self, real: bool = True) -> None:
        """Clear the generated side, and the accumulated real side unless ``real=False``.

        A fixed ``reference=`` is always kept (periodic evaluation reuses its cached square root).
        """
        self.fake.reset()
        if real:
            self.real.reset()
        self._synced = False

    def merge(self, other: FrechetDistance) -> FrechetDistance:
        """Add another metric's (a shard's) sums into this one; returns ``self``."""
        if other.extractor.identity() != self.extractor.identity():
            raise ValueError(f"{self.name}: cannot merge metrics with different extractors or presets")
        if self._synced:
            raise RuntimeError(f"{self.name}: this metric was already synced; merge shards before sync(), or reset()")
        self.real.merge(other.real)
        self.fake.merge(other.fake)
        return self

    def sync(self, accelerator_or_group: Any = None) -> None:
        """Sum both sides over all processes in one all-reduce; every rank must call it."""
        if self._synced:
            raise RuntimeError(f"{self.name}: sync() was already called; call reset() and update again first")
        sides = (self.real, self.fake)
        flat = torch.cat([torch.tensor([float(s.n) for s in sides], dtype=torch.float64)]
                         + [t.reshape(-1) for s in sides for t in (s.sum, s.outer)])
        flat = sync_sum(flat, accelerator_or_group)
        offset = len(sides)
        for index, stats in enumerate(sides):
            dim = stats.dim
            state = {"n": int(round(float(flat[index]))), "sum": flat[offset : offset + dim],
                     "outer": flat[offset + dim : offset + dim + dim * dim].reshape(dim, dim)}
            stats.load_state_dict(state)
            offset += dim + dim * dim
        self._synced = True

    def _check_count(self, stats: GaussianStats, side: str) -> None:
        if stats.n < MIN_IMAGES:
            raise ValueError(f"{self.name}: needs at least {MIN_IMAGES} {side} images, got {stats.n}; a covariance "
                             "from fewer is undefined (and FID is biased below ~10k images: report the count)")


def load_fid(weights: Any = None, device: Any = None, dtype: Any = None, *, preset: str = "clean",
             reference: Any = None, foreign_reference: bool = False, **options: Any) -> FrechetDistance:
    """Build FID on the FID-Inception network.

    Args:
        weights: ``None`` (pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``), a local ``.pth`` /
            ``.safetensors`` file in that layout (torch-fidelity's file and DiffSynth-Studio's
            ``FID/model.safetensors`` also load), or an ``hf:``/``ms:``/URL spec.
        device: where the network runs.
        dtype: ``None`` (exact fp32) or ``"bf16"``/``"fp16"`` autocast.
        preset: resize preset (see module docstring); stored with statistics.
        reference: reference statistics (``.npz`` path or ``GaussianReference``) fixing the real side.
        foreign_reference: accept a reference file without rewardkit metadata (pytorch-fid / clean-fid).
        **options: ``batch_size``, ``num_workers``, ``quantize``, ``recursive``, ``progress``.
    """
    from rewardkit.metrics.inception import load_inception

    extractor = load_inception(weights, preset=preset, device=device)
    metric = FrechetDistance(extractor, reference=reference, foreign_reference=foreign_reference, dtype=dtype,
                             **options)
    return metric.to(device) if device is not None else metric
