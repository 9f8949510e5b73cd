"""Stored-feature state for the metrics that cannot be reduced to running sums (KID, IS, CMMD).

KID's cubic kernel and CMMD's RBF kernel need every feature row (the explicit feature map of a cubic
kernel on 2048-d features has ~1.4e9 dimensions), and the Inception Score needs every logit row for its
splits. Rows are kept on the CPU in float32, in arrival order; ``sync`` gathers them from every process
(uneven counts allowed) in rank order, so all ranks end with the same rows. ``update`` stages the rows
of a whole call and commits them at the end (all or nothing), and ``state_dict()`` carries every row
(both sides and a fixed reference), so a checkpointed metric resumes.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["FeatureStore", "StoredFeatureMetric", "gather_rows", "MIN_ROWS"]

MIN_ROWS = 2  # every set metric needs two rows a side


def _group_and_device(accelerator_or_group: Any) -> tuple[Any, torch.device]:
    import torch.distributed as dist

    group = None if hasattr(accelerator_or_group, "reduce") else accelerator_or_group
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return group, device


def gather_rows(rows: torch.Tensor, accelerator_or_group: Any = None) -> torch.Tensor:
    """Concatenate ``rows`` ``(n_rank, D)`` of every process in rank order (counts may differ per rank).

    Works with an ``accelerate.Accelerator`` (its default process group) or a ``torch.distributed``
    group; returns ``rows`` itself when not running distributed.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return rows
    group, device = _group_and_device(accelerator_or_group)
    world = dist.get_world_size(group)
    count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c) for c in counts]
    padded = torch.zeros(max(sizes), *rows.shape[1:], dtype=rows.dtype, device=device)
    padded[: rows.shape[0]] = rows.to(device)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)]).to(rows.device)


class FeatureStore:
    """Rows of features per side (``"real"`` / ``"fake"``), float32 on the CPU."""

    def __init__(self) -> None:
        self._rows: dict[bool, list[torch.Tensor]] = {True: [], False: []}

    def add(self, features: torch.Tensor, real: bool) -> None:
        """Append ``features`` ``(B, D)``."""
        if features.ndim != 2:
            raise ValueError(f"expected features (B, D), got {tuple(features.shape)}")
        if not torch.isfinite(features).all():
            raise ValueError("features contain NaN/inf values; check the network's output (and dtype: fp16 can overflow)")
        self.check_dim(features.shape[1], real)
        self._rows[real].append(features.detach().float().cpu())

    def dim(self, real: bool) -> int | None:
        """The feature dimension of one side (None while it holds no rows)."""
        kept = self._rows[real]
        return kept[0].shape[1] if kept else None

    def check_dim(self, dim: int, real: bool) -> None:
        """Raise ``ValueError`` if rows of dimension ``dim`` cannot join this side."""
        if self.dim(real) not in (None, dim):
            raise ValueError(f"feature dimension changed from {self.dim(real)} to {dim}")

    def rows(self, real: bool) -> torch.Tensor:
        """All rows of one side ``(N, D)`` (``(0, 0)`` when empty)."""
        kept = self._rows[real]
        return torch.cat(kept) if kept else torch.zeros(0, 0)

    def count(self, real: bool) -> int:
        return sum(r.shape[0] for r in self._rows[real])

    def reset(self, real: bool = True) -> None:
        self._rows[False] = []
        if real:
            self._rows[True] = []

    def merge(self, other: FeatureStore) -> None:
        """Append ``other``'s rows to each side (dimensions checked before anything changes)."""
        for side in (True, False):
            if other.dim(side) is not None:
                self.check_dim(other.dim(side), side)
        for side in (True, False):
            self._rows[side].extend(other._rows[side])

    def sync(self, accelerator_or_group: Any = None) -> None:
        """Replace each side's rows by the rows of all processes, in rank order (every rank must call)."""
        for side in (True, False):
            local = self.rows(side)
            dim = torch.tensor([local.shape[1]], dtype=torch.float64)
            # Ranks without rows on a side still take part in the collective with a (0, D) block.
            width = int(_max_over_ranks(dim, accelerator_or_group))
            if width == 0:
                continue
            local = local if local.shape[1] == width else torch.zeros(0, width)
            self._rows[side] = [gather_rows(local, accelerator_or_group)]


def _max_over_ranks(value: torch.Tensor, accelerator_or_group: Any) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    group, device = _group_and_device(accelerator_or_group)
    buffer = value.to(device).clone()
    dist.all_reduce(buffer, op=dist.ReduceOp.MAX, group=group)
    return float(buffer)


class StoredFeatureMetric:
    """Mixin for ``FeatureMetric`` subclasses whose state is a ``FeatureStore`` (KID, IS, CMMD).

    Provides the staging hooks of ``FeatureMetric.update``, ``reset``, ``merge``, ``sync``, the state of
    ``state_dict()`` (``get_extra_state``) and a fixed-reference option (stored
    reference features from a statistics file, e.g. ``rewardkit fid-stats --features``).
    """

    store: FeatureStore
    name: str
    extractor: Any
    _synced: bool
    _reference_rows: torch.Tensor | None

    def _init_store(self) -> None:
        self.store = FeatureStore()
        self._synced = False
        self._reference_rows = None

    def _check_update(self, real: bool) -> None:
        if self._synced:
            raise RuntimeError(f"{self.name}: this metric was already synced across processes; call reset() "
                               "before adding more images (updating after sync would count shards twice)")
        if real and self._reference_rows is not None:
            raise ValueError(f"{self.name}: the real side is fixed by reference features; pass real=False")

    def _rows_of(self, features: torch.Tensor) -> torch.Tensor:
        """The rows stored for extracted ``features`` (the features themselves; IS turns them into logits)."""
        return features

    def _new_stage(self) -> FeatureStore:
        # Feature rows, never pixels: 8 KiB per image for 2048-d Inception features.
        return FeatureStore()

    def _stage(self, staged: FeatureStore, features: torch.Tensor, real: bool) -> None:
        rows = self._rows_of(features)
        self.store.check_dim(rows.shape[-1], real)
        staged.add(rows, real)

    def _commit(self, staged: FeatureStore, real: bool) -> None:
        self.store.merge(staged)

    def get_extra_state(self) -> dict[str, Any]:
        """The rows for ``state_dict()``: both sides ``(N, D)`` float32 (``(0, 0)`` when empty), the fixed
        reference rows (or None), the sync flag and the extractor identity they belong to."""
        return {"identity": self.extractor.identity(), "real": self.store.rows(True), "fake": self.store.rows(False),
                "reference_rows": self._reference_rows, "synced": self._synced}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`get_extra_state` (via ``load_state_dict``); refuses another extractor's rows."""
        from rewardkit.metrics.frechet import check_identity

        check_identity(dict(state["identity"]), self.extractor.identity(), what=f"{self.name} state")
        store = FeatureStore()
        for side, key in ((True, "real"), (False, "fake")):
            rows = torch.as_tensor(state[key])
            if rows.shape[0]:
                store.add(rows, side)
        if state["reference_rows"] is None:
            self._reference_rows = None
        else:
            self.set_reference_rows(torch.as_tensor(state["reference_rows"]))  # validates, then sets
        self.store, self._synced = store, bool(state["synced"])

    @property
    def has_fixed_reference(self) -> bool:
        """Whether the real side is fixed by stored reference rows (``set_reference_rows``)."""
        return self._reference_rows is not None

    def set_reference_rows(self, rows: torch.Tensor) -> None:
        """Fix the real side to stored feature rows ``(N, D)`` (e.g. from ``rewardkit fid-stats --features``)."""
        if rows.ndim != 2 or rows.shape[1] != self.extractor.feature_dim:
            raise ValueError(f"{self.name}: reference rows must be (N, {self.extractor.feature_dim}), got {tuple(rows.shape)}")
        self._reference_rows = rows.float()

    def side(self, real: bool) -> torch.Tensor:
        """All rows of one side ``(N, D)`` (the fixed reference rows for ``real=True`` if set).

        Raises:
            ValueError: fewer than 2 rows (no metric here is defined on fewer; never a silent 0.0).
        """
        rows = self._reference_rows if real and self._reference_rows is not None else self.store.rows(real)
        if rows.shape[0] < MIN_ROWS:
            side = "real" if real else "generated"
            raise ValueError(f"{self.name}: needs at least {MIN_ROWS} {side} images, got {rows.shape[0]}")
        return rows

    def reset(self, real: bool = True) -> None:
        """Clear the generated rows, and the real rows unless ``real=False`` (fixed references are kept)."""
        self.store.reset(real)
        self._synced = False

    def merge(self, other: StoredFeatureMetric) -> StoredFeatureMetric:
        """Append another shard's rows (this metric's rows first); returns ``self``."""
        if other.extractor.identity() != self.extractor.identity():
            raise ValueError(f"{self.name}: cannot merge metrics with different extractors or presets")
        if self._synced:
            raise RuntimeError(f"{self.name}: this metric was already synced; merge shards before sync(), or reset()")
        self.store.merge(other.store)
        return self

    def sync(self, accelerator_or_group: Any = None) -> None:
        """Gather both sides from all processes (every rank must call; uneven counts are fine)."""
        if self._synced:
            raise RuntimeError(f"{self.name}: sync() was already called; call reset() and update again first")
        self.store.sync(accelerator_or_group)
        self._synced = True
