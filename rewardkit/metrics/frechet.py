"""Gaussian feature statistics and the Fréchet distance (FID, FD-DINOv2), exact and fast.

* ``GaussianStats``: running float64 sums ``n, Σx, Σxxᵀ`` (the form torchmetrics' FID keeps, PR #1199),
  so that streaming, merging shards and reducing over processes are sums: one all-reduce of one flat
  float64 buffer, whatever the batch size on each rank.
* ``frechet_distance``: ``‖μ1−μ2‖² + tr Σ1 + tr Σ2 − 2 tr √(Σ1 Σ2)``. The trace of the matrix square
  root is taken as ``Σ √λᵢ`` over the eigenvalues of the symmetric PSD matrix ``R Σ2 R`` with
  ``R = √Σ1`` (``Σ1 Σ2`` is similar to it, so the eigenvalues are real and ≥ 0; round-off below the
  numerical-rank tolerance ``D·eps·max λ``, negative or not, counts as 0: exact for rank-deficient Σ),
  by ``torch.linalg.eigh`` in float64. pytorch-fid and clean-fid call
  ``scipy.linalg.sqrtm(Σ1 Σ2)`` (9 s for 2048², an "Imaginary component" error on rank-deficient input,
  and the ``disp`` argument they pass is gone in scipy 1.18); torch-fidelity and torchmetrics take the
  general ``eigvals`` of the non-symmetric product. On full-rank statistics all of these agree to
  ~1e-11; see ``reference/distribution_metrics.md`` §1.7 and §4.1.
* ``GaussianReference``: fixed reference statistics whose ``R = √Σ`` is computed once, so periodic FID
  against the same reference costs one ``eigvalsh`` after feature extraction.
* ``.npz`` files: ``mu``, ``sigma``, ``n`` and rewardkit's metadata (extractor, preset, resolution,
  weights sha256); plain pytorch-fid / clean-fid files (``mu``, ``sigma`` only) load with
  ``foreign=True``.

float32 is never used for these steps: it costs 1e-4 to 0.1 absolute FID (§1.7).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = [
    "GaussianStats", "GaussianReference", "psd_sqrt", "trace_sqrt_product", "frechet_distance",
    "save_statistics", "load_statistics", "StatisticsMismatchError", "sync_sum", "check_identity",
]

_META_KEY = "rewardkit_meta"
#: Metadata fields compared between statistics that are put against each other.
IDENTITY_FIELDS = ("extractor", "preset", "resolution", "weights_sha256")


class StatisticsMismatchError(ValueError):
    """Reference statistics made with another extractor, preset, resolution or weights."""


def sync_sum(tensor: torch.Tensor, accelerator_or_group: Any = None) -> torch.Tensor:
    """Sum ``tensor`` over all processes: one collective, any backend.

    Args:
        tensor: the local values (float64 keeps sums exact up to 2**53).
        accelerator_or_group: an ``accelerate.Accelerator`` (its ``reduce`` is used, on its device),
            a ``torch.distributed`` process group, or ``None`` for the default group.

    Returns:
        The summed tensor on ``tensor``'s device (the input itself when not distributed).
    """
    if accelerator_or_group is not None and hasattr(accelerator_or_group, "reduce"):
        device = getattr(accelerator_or_group, "device", tensor.device)
        return accelerator_or_group.reduce(tensor.to(device), reduction="sum").to(tensor.device)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(accelerator_or_group) == "nccl" else torch.device("cpu")
    buffer = tensor.to(device).clone()
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=accelerator_or_group)
    return buffer.to(tensor.device)


class GaussianStats:
    """Running float64 ``n``, ``Σx`` ``(D,)`` and ``Σxxᵀ`` ``(D, D)`` of a stream of feature rows."""

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.dim = dim
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.version = 0  # bumped on every change; lets callers cache derived matrices

    def update(self, features: torch.Tensor) -> None:
        """Add rows ``features`` ``(B, D)`` (any float dtype; accumulated in float64)."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected features (B, {self.dim}), got {tuple(features.shape)}")
        rows = features.detach().to(device=self.sum.device, dtype=torch.float64)
        if not torch.isfinite(rows).all():
            raise ValueError(f"features contain {int((~torch.isfinite(rows)).sum())} NaN/inf values; check the "
                             "network's output (and dtype: fp16 can overflow)")
        self.sum += rows.sum(0)
        self.outer += rows.T @ rows
        self.n += rows.shape[0]
        self.version += 1

    def merge(self, other: GaussianStats) -> GaussianStats:
        """Add another shard's sums into this one (in place); returns ``self``."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {other.dim} into {self.dim}")
        self.sum += other.sum.to(self.sum.device)
        self.outer += other.outer.to(self.outer.device)
        self.n += other.n
        self.version += 1
        return self

    def sync(self, accelerator_or_group: Any = None) -> None:
        """Replace the local sums by the sums over all processes (one all-reduce)."""
        flat = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64, device=self.sum.device),
                          self.sum, self.outer.reshape(-1)])
        flat = sync_sum(flat, accelerator_or_group)
        self.n = int(round(float(flat[0])))
        self.sum.copy_(flat[1 : 1 + self.dim])
        self.outer.copy_(flat[1 + self.dim :].reshape(self.dim, self.dim))
        self.version += 1

    def reset(self) -> None:
        self.n = 0
        self.sum.zero_()
        self.outer.zero_()
        self.version += 1

    def mean(self) -> torch.Tensor:
        """``μ`` ``(D,)`` float64."""
        return self.sum / self.n

    def cov(self) -> torch.Tensor:
        """Unbiased covariance ``(Σxxᵀ − n μμᵀ) / (n − 1)`` ``(D, D)`` float64 (= ``np.cov(rowvar=False)``)."""
        mu = self.mean()
        return (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)

    def state_dict(self) -> dict[str, Any]:
        """``{"n": int, "sum": (D,), "outer": (D, D)}`` float64 copies (``torch.save`` with ``weights_only``)."""
        return {"n": self.n, "sum": self.sum.clone(), "outer": self.outer.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the sums by ``state`` (from :meth:`state_dict`); shapes are checked before anything changes."""
        total, outer = torch.as_tensor(state["sum"]), torch.as_tensor(state["outer"])
        if total.shape != (self.dim,) or outer.shape != (self.dim, self.dim) or int(state["n"]) < 0:
            raise ValueError(f"statistics state has n={state['n']}, sum {tuple(total.shape)} and outer "
                             f"{tuple(outer.shape)}; expected n >= 0, ({self.dim},) and ({self.dim}, {self.dim})")
        self.n = int(state["n"])
        self.sum.copy_(total)
        self.outer.copy_(outer)
        self.version += 1


def _drop_round_off(values: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a symmetric PSD ``(D, D)`` float64 matrix with those below its numerical-rank tolerance
    ``D * eps * max|λ|`` set to 0 (numpy.linalg.matrix_rank's default tolerance).

    A covariance of ``n < D`` rows has rank ``n - 1``: its other ``D - n + 1`` eigenvalues are round-off,
    about ``±eps * max|λ|``. Square-rooted they become about ``1e-8 * √max|λ|`` each, and summed over
    thousands of them they put a spurious ``-1e-3`` into the distance of two identical 2048-D sets of 500
    images; zeroing them keeps the exact low-rank value (the rank-``r`` part is unchanged).
    """
    tolerance = values.shape[-1] * torch.finfo(torch.float64).eps * values.abs().max()
    return torch.where(values > tolerance, values, torch.zeros_like(values))


def psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a PSD matrix ``(D, D)`` float64 (eigenvalues below the numerical-rank
    tolerance, negative round-off included, set to 0; see ``_drop_round_off``)."""
    sym = (matrix + matrix.T) / 2
    values, vectors = torch.linalg.eigh(sym)
    return (vectors * _drop_round_off(values).sqrt()) @ vectors.T


def trace_sqrt_product(sigma1: torch.Tensor, sigma2: torch.Tensor, sqrt_sigma1: torch.Tensor | None = None) -> float:
    """``tr √(Σ1 Σ2)`` for PSD ``Σ1, Σ2`` ``(D, D)``, as ``Σ √λ(R Σ2 R)`` with ``R = √Σ1`` (float64).

    Args:
        sigma1, sigma2: covariance matrices.
        sqrt_sigma1: ``√Σ1`` if already known (the cached reference side); computed otherwise.
    """
    root = psd_sqrt(sigma1.double()) if sqrt_sigma1 is None else sqrt_sigma1
    middle = root @ sigma2.double() @ root
    eigenvalues = torch.linalg.eigvalsh((middle + middle.T) / 2)
    return float(_drop_round_off(eigenvalues).sqrt().sum())


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor,
                     *, sqrt_sigma1: torch.Tensor | None = None) -> float:
    """Fréchet distance between two Gaussians, float64; the raw value, never clipped at 0.

    Eigenvalues below the numerical-rank tolerance (``_drop_round_off``) count as 0, so statistics of fewer
    images than dimensions (rank ``n - 1 < D``) get their exact low-rank value: two identical sets give
    ``|FD| <= 1e-11 * (tr Σ1 + tr Σ2)`` (tests; measured -3.4e-13 at n = 50, D = 256, and +1.6e-11 at n = 500,
    D = 2048, where clamping only negative eigenvalues gave -3.9e-5 and -1.1e-3). Eigenvalues that small are
    below what float64 sums resolve; dropping one moves ``tr √(Σ1 Σ2)`` by at most ``√(D * eps * max λ)``.

    Args:
        mu1, mu2: means ``(D,)``.
        sigma1, sigma2: covariances ``(D, D)``.
        sqrt_sigma1: cached ``√Σ1`` (see ``GaussianReference``).
    """
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    for name, t in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not torch.isfinite(t).all():
            raise ValueError(f"Fréchet distance: {name} contains NaN/inf; check the features that built it")
    diff = mu1 - mu2
    trace_sqrt = trace_sqrt_product(sigma1, sigma2, sqrt_sigma1)
    return float(diff @ diff + torch.trace(sigma1) + torch.trace(sigma2)) - 2.0 * trace_sqrt


@dataclass
class GaussianReference:
    """Fixed reference statistics with their square root cached for repeated distances.

    Attributes:
        mu: ``(D,)`` float64.  sigma: ``(D, D)`` float64.  n: number of images (0 if unknown).
        meta: identity of the features (extractor, preset, resolution, weights_sha256) and provenance.
    """

    mu: torch.Tensor
    sigma: torch.Tensor
    n: int = 0
    meta: dict[str, str] = field(default_factory=dict)
    _sqrt: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def from_stats(cls, stats: GaussianStats, meta: dict[str, str]) -> GaussianReference:
        return cls(stats.mean(), stats.cov(), stats.n, dict(meta))

    def state_dict(self) -> dict[str, Any]:
        """``mu``, ``sigma``, ``n``, ``meta`` and the cached ``√Σ`` (or None): plain tensors, ints and strings."""
        return {"mu": self.mu.clone(), "sigma": self.sigma.clone(), "n": self.n, "meta": dict(self.meta),
                "sqrt": None if self._sqrt is None else self._sqrt.clone()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> GaussianReference:
        """The reference :meth:`state_dict` described (the cached ``√Σ`` is kept, not recomputed)."""
        mu, sigma = torch.as_tensor(state["mu"], dtype=torch.float64), torch.as_tensor(state["sigma"], dtype=torch.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"reference state: mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)} do not fit together")
        return cls(mu, sigma, int(state["n"]), dict(state["meta"]), state.get("sqrt"))

    def sqrt_sigma(self) -> torch.Tensor:
        """``√Σ`` ``(D, D)`` float64, computed on first use and then reused."""
        if self._sqrt is None:
            self._sqrt = psd_sqrt(self.sigma.double())
        return self._sqrt

    def distance(self, mu: torch.Tensor, sigma: torch.Tensor) -> float:
        """Fréchet distance from this reference to ``(mu, sigma)`` using the cached square root."""
        return frechet_distance(self.mu, self.sigma, mu.to(self.mu.device), sigma.to(self.sigma.device),
                                sqrt_sigma1=self.sqrt_sigma())

    def check_identity(self, identity: dict[str, str], *, what: str = "reference statistics") -> None:
        """Raise ``StatisticsMismatchError`` if a recorded identity field differs from ``identity``.

        Fields absent on either side (e.g. a foreign file, or weights built in memory) are not compared.
        """
        check_identity(self.meta, identity, what=what)


def check_identity(recorded: dict[str, str], identity: dict[str, str], *, what: str = "reference statistics") -> None:
    """Raise ``StatisticsMismatchError`` if a field of ``IDENTITY_FIELDS`` recorded with statistics (or a
    metric's saved state) differs from the ``identity`` of the extractor they are used with."""
    wrong = [f"{k}: file has {recorded[k]!r}, this metric uses {identity[k]!r}" for k in IDENTITY_FIELDS
             if recorded.get(k) and identity.get(k) and recorded[k] != identity[k]]
    if wrong:
        raise StatisticsMismatchError(
            f"{what} were made with different settings ({'; '.join(wrong)}); distances between them are "
            "not comparable. Recompute the statistics with this metric (rewardkit fid-stats), or build the "
            "metric with the settings of the file (e.g. preset=...)"
        )


def save_statistics(path: str | os.PathLike, reference: GaussianReference, features: torch.Tensor | None = None) -> None:
    """Write ``mu``, ``sigma``, ``n``, rewardkit metadata (and optionally ``features`` for KID/CMMD) as ``.npz``."""
    arrays: dict[str, Any] = {
        "mu": reference.mu.double().cpu().numpy(),
        "sigma": reference.sigma.double().cpu().numpy(),
        "n": np.asarray(reference.n, dtype=np.int64),
        _META_KEY: np.asarray(json.dumps(reference.meta, sort_keys=True)),
    }
    if features is not None:
        arrays["features"] = features.detach().float().cpu().numpy()
    np.savez(path, **arrays)


def load_statistics(path: str | os.PathLike, *, identity: dict[str, str] | None = None,
                    foreign: bool = False) -> tuple[GaussianReference, torch.Tensor | None]:
    """Read a statistics ``.npz``; returns ``(reference, features or None)``.

    Args:
        path: a file written by :func:`save_statistics`, or (with ``foreign=True``) a pytorch-fid /
            clean-fid / ADM file holding ``mu`` and ``sigma``.
        identity: the loading metric's ``extractor.identity()``; recorded fields must match it.
        foreign: accept a file without rewardkit metadata. You then vouch that it was made with the
            same network and resize (e.g. pytorch-fid's files match ``preset="legacy-pytorch"``).

    Raises:
        FileNotFoundError, ValueError (not a statistics file / a foreign file without ``foreign=True``),
        StatisticsMismatchError.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"statistics file {str(path)!r} does not exist; make one with `rewardkit fid-stats DIR --out FILE`")
    with np.load(path, allow_pickle=False) as data:
        keys = set(data.files)
        if not {"mu", "sigma"} <= keys:
            raise ValueError(f"{path}: not a statistics file (keys {sorted(keys)}; expected 'mu' and 'sigma')")
        mu, sigma = torch.from_numpy(data["mu"].astype(np.float64)), torch.from_numpy(data["sigma"].astype(np.float64))
        meta = json.loads(str(data[_META_KEY])) if _META_KEY in keys else None
        n = int(data["n"]) if "n" in keys else 0
        features = torch.from_numpy(data["features"]) if "features" in keys else None
    if meta is None and not foreign:
        raise ValueError(
            f"{path} has no rewardkit metadata (a pytorch-fid / clean-fid / ADM file?). Its resize preset and "
            "network cannot be checked; pass foreign=True (CLI: --foreign-stats) if you know it matches this "
            "metric's preset, e.g. pytorch-fid files match preset='legacy-pytorch'"
        )
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)} do not fit together")
    reference = GaussianReference(mu, sigma, n, meta or {"source": "foreign"})
    if identity is not None:
        reference.check_identity(identity, what=f"statistics in {path}")
    return reference, features
