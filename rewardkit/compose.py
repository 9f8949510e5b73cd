"""Weighted composition of rewards: ``rk.compose({"pickscore": 1.0, "aesthetic": 0.1}, normalize=...)``.

``total = sum_k w_k * n_k(r_k)`` over the parts with ``w_k != 0``, where ``r_k`` is part ``k``'s raw score:

* ``"none"``: ``n(r) = r``;  ``"affine"``: ``n(r) = (r - shift) / scale`` (fixed ``affine={name: (shift, scale)}``);
* ``"zscore"``: ``n(r) = (r - mean) / (std + eps)`` with per-part *running* statistics over every finite
  score seen so far, this batch included (float64 sums in buffers: ``state_dict`` saves and resumes them;
  all-reduced across processes when ``torch.distributed`` is initialised).

Non-finite scores. NaN means "not applicable to this row" (TRL's ``None``): ``nan_policy="skip"`` (default)
drops the part from the row and rescales the remaining weights to the row's full weight mass ``sum |w|``
(a row with no applicable part is NaN, with a warning); ``"propagate"`` makes the row NaN. ``±inf`` is a
real value (PSNR of identical images) and propagates: the row's total is ``±inf``, or NaN when parts of
opposite sign are infinite (``inf - inf``, with a warning). Z-score statistics never absorb ``±inf``
(a warning names the rows); such a row normalises to ``±inf``. Weights and affine constants must be finite.

Concurrency rule: a composition's result never depends on how many threads call it or in which order
they finish, on one process or many. Each call takes a *ticket* when it enters (or uses one reserved
earlier with ``reserve()`` in the submitting thread, as ``AsyncRewardScorer`` does), scores its parts
concurrently with other calls, then waits for its turn: in ticket order it folds its batch into the
statistics (one all-reduce, issued by the thread whose turn it is, so collectives run in the same order
on every rank) and reads them, exactly as the sequential run would. A call that raises still takes its
turn (and its all-reduce, with nothing added), so nobody waits forever and ranks stay in step. Every
rank must make the same number of calls. ``update_stats=False`` + ``update_statistics(details)`` is the
explicit-step alternative. Parts not marked ``thread_safe`` are called under a per-part lock.
Details and the maths: ``docs/composition.md``.

Parts that expose the shared-feature protocol and return the same ``feature_key`` compute the image
features once per call (tensor path). ``evaluate_pil`` / ``score_pil`` is the exact path: each part's
own ``evaluate_pil`` where it has one, the tensor path on ``image_io.to_tensor`` images otherwise.

Keywords beside images and prompts (``reference=``, ``source=``, ``metadata=``, ...) go to the parts whose
``context_keys`` name them (all keywords to a part that declares none), so ``metadata=`` for ``geneval``
never reaches a paired metric; a keyword that no part takes raises before any scoring.
"""

from __future__ import annotations

import math
import threading
import warnings
from contextlib import nullcontext
from typing import Any, Literal, Mapping

import torch
from torch import nn

from rewardkit.compose_checks import check_options, checked_scores
from rewardkit.compose_exact import ExactPathComposition
from rewardkit.compose_state import RunningStats, Ticket, Turns
from rewardkit.errors import check_images, check_prompts
from rewardkit.protocols import Reward, RewardOutput

__all__ = ["ComposedReward", "RunningStats", "Ticket", "compose"]

Normalize = Literal["none", "zscore", "affine"]
NanPolicy = Literal["skip", "propagate"]
ZSCORE_EPS = 1e-6  # keeps a constant reward from dividing by zero


class ComposedReward(ExactPathComposition, Reward):
    """A weighted sum of rewards, itself a RewardFn (module docstring: maths, NaN/inf, concurrency).

    ``evaluate()`` returns the total and, in ``details``, every part's raw score under its name and its
    normalised score under ``"<name>/normalized"``. Call it from any number of threads (``thread_safe``).
    """

    higher_is_better = True
    thread_safe = True  # per-part locks + ticketed statistics (module docstring)

    def __init__(self, parts: Mapping[str, Any], weights: Mapping[str, float], *, normalize: Normalize = "none",
                 affine: Mapping[str, tuple[float, float]] | None = None, normalize_weights: bool = False,
                 nan_policy: NanPolicy = "skip", update_stats: bool = True, name: str = "composed") -> None:
        super().__init__()
        check_options(parts, weights, normalize, affine, nan_policy)
        self.name = name
        self.part_names = list(parts)
        # ModuleDict keys cannot hold "." (registry names such as "hpsv2.1", "module:factory" paths): _key.
        self.parts = nn.ModuleDict({_key(k): v for k, v in parts.items() if isinstance(v, nn.Module)})
        self._callables = {k: v for k, v in parts.items() if not isinstance(v, nn.Module)}
        total = sum(weights[k] for k in self.part_names)
        if normalize_weights and total == 0:
            raise ValueError("compose: normalize_weights=True needs weights with a non-zero sum")
        self.weights = {k: float(weights[k]) / (total if normalize_weights else 1.0) for k in self.part_names}
        self.normalize = normalize
        self.affine = {k: (float(s), float(c)) for k, (s, c) in (affine or {}).items()}
        self.nan_policy = nan_policy
        self.update_stats = update_stats
        self.stats = nn.ModuleDict({_key(k): RunningStats() for k in self.part_names} if normalize == "zscore" else {})
        self.differentiable = all(bool(getattr(self._part(k), "differentiable", False)) for k in self.part_names)
        self.requires_prompt = any(bool(getattr(self._part(k), "requires_prompt", True)) for k in self.part_names)
        self._init_sync()
        self.freeze()

    def _init_sync(self) -> None:
        self._turns = Turns()
        self._locks = {k: threading.Lock() for k in self.part_names if not getattr(self._part(k), "thread_safe", False)}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_turns"], state["_locks"]  # locks do not pickle; a copy starts with its own
        return state

    def __copy__(self) -> ComposedReward:
        # A shallow copy (e.g. a view with another update_stats) shares parts, statistics and the call order.
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._init_sync()

    @property
    def stateful(self) -> bool:
        """True when results depend on earlier calls (``normalize="zscore"``): calls are then ticketed."""
        return self.normalize == "zscore"

    def _part(self, name: str) -> Any:
        return self._callables[name] if name in self._callables else self.parts[_key(name)]

    def reserve(self) -> Ticket:
        """Reserve the next place in the call order from the *submitting* thread (before handing the call
        to a pool), so the order is the submission order; pass it as ``ticket=`` to that call."""
        return self._turns.take() if self.stateful else Ticket(-1, None)

    def evaluate(self, images: torch.Tensor, prompts: str | list[str] | None = None, *, ticket: Ticket | None = None,
                 update_stats: bool | None = None, **context: Any) -> RewardOutput:
        """Score a float ``(B, 3, H, W)`` batch in ``[0, 1]``: total ``(B,)`` float32 plus every part in details.

        ``ticket``: a ``reserve()``d place in the call order; ``update_stats``: this call only (default: the
        attribute), e.g. ``False`` to evaluate without teaching the statistics and without mutating ``self``.
        """
        ticket, update = self._ticket(ticket), self.update_stats if update_stats is None else bool(update_stats)
        try:
            check_images(self.name, images)
            prompt_list = check_prompts(self.name, prompts, images.shape[0], self.requires_prompt)
            self._check_context(context)
            raw = self._tensor_raw(self.part_names, images, prompt_list, context)
        except BaseException:
            self._statistics(ticket, None, update)  # the failed call still takes (and passes) its turn
            raise
        return self._combine(raw, ticket, update)

    def update_statistics(self, raw: Mapping[str, Any], *, ticket: Ticket | None = None) -> None:
        """Fold raw part scores into the z-score statistics: the explicit-step alternative to
        ``update_stats=True`` (score with frozen statistics, then update in an order you choose).

        Args:
            raw: ``{part name: raw scores (B,)}``, e.g. ``evaluate(...).details`` (other keys ignored).
            ticket: a ``reserve()``d place in the call order; default: the next one.
        """
        try:
            if not self.stateful:
                raise ValueError(f"{self.name}: update_statistics needs normalize='zscore', got {self.normalize!r}")
            missing = [k for k in self.part_names if k not in raw]
            if missing:
                raise ValueError(f"{self.name}: update_statistics needs raw scores for every part, missing {missing}; "
                                 "pass evaluate(...).details")
            values = {k: torch.as_tensor(raw[k]).detach().float().reshape(-1) for k in self.part_names}
        except BaseException:
            if ticket is not None:
                ticket.release()
            raise
        self._statistics(self._ticket(ticket), values, True)

    def _ticket(self, ticket: Ticket | None) -> Ticket | None:
        """The call's place in the order (taken now unless reserved); None when nothing is order-dependent."""
        if ticket is not None and not isinstance(ticket, Ticket):
            raise TypeError(f"{self.name}: ticket must come from reward.reserve(), got {type(ticket).__name__}")
        if not self.stateful:
            return None
        if ticket is None:
            ticket = self._turns.take()
        if not self._turns.claim(ticket):
            raise ValueError(f"{self.name}: {ticket!r} was already used or released; reserve() one ticket per call")
        return ticket

    def _statistics(self, ticket: Ticket | None, raw: Mapping[str, torch.Tensor] | None,
                    update: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """In ticket order: add this call's moments (one all-reduce for all parts; zeros for a failed call,
        ``raw=None``) and read ``(mean, std)`` per part. Empty when nothing is order-dependent."""
        if ticket is None:
            return {}
        stats = [self.stats[_key(k)] for k in self.part_names]
        with self._turns.turn(ticket):
            if update:
                device = stats[0].count.device
                if raw is None:
                    local = torch.zeros(len(stats), 3, dtype=torch.float64, device=device)
                else:
                    _warn_infinite(self.name, raw)
                    local = torch.stack([RunningStats.moments(raw[k]).to(device) for k in self.part_names])
                if _distributed():  # issued by the thread whose turn it is: same order on every rank
                    torch.distributed.all_reduce(local)
                for part_stats, row in zip(stats, local):
                    part_stats.add(row)
            return {k: (s.mean.clone(), s.std.clone()) for k, s in zip(self.part_names, stats)}

    def _combine(self, raw: dict[str, torch.Tensor], ticket: Ticket | None, update: bool) -> RewardOutput:
        moments = self._statistics(ticket, raw, update)
        details: dict[str, Any] = {}
        weighted, masses = [], []
        for name in self.part_names:
            normalized = self._normalized(name, raw[name], moments.get(name))
            details[name], details[f"{name}/normalized"] = raw[name].detach(), normalized.detach()
            weight = self.weights[name]
            if weight == 0:  # reported, never summed (0 * inf would be NaN)
                continue
            applicable = ~torch.isnan(normalized)  # NaN = not applicable; +-inf is a value and propagates
            weighted.append(torch.where(applicable, weight * normalized, torch.zeros_like(normalized)))
            masses.append(applicable.to(normalized.dtype) * abs(weight))
        terms, mass = torch.stack(weighted), torch.stack(masses)  # (parts, B)
        total, present, complete = terms.sum(0), mass.sum(0), (mass > 0).all(0)
        nan = torch.full_like(total, float("nan"))
        if self.nan_policy == "propagate":
            total = torch.where(complete, total, nan)
        else:  # rescale only the incomplete rows, so complete rows are exactly the weighted sum
            full = sum(abs(w) for w in self.weights.values())
            rescaled = total * (full / present.clamp_min(1e-30))
            total = torch.where(complete, total, torch.where(present > 0, rescaled, nan))
        empty = (present == 0).nonzero().flatten().tolist()
        if empty and self.nan_policy == "skip":
            warnings.warn(f"{self.name}: rows {empty} have no applicable (non-NaN) part; their total is NaN",
                          stacklevel=3)
        clash = ((terms == math.inf).any(0) & (terms == -math.inf).any(0)).nonzero().flatten().tolist()
        if clash:
            warnings.warn(f"{self.name}: rows {clash} have parts at +inf and -inf; their total is NaN (inf - inf)",
                          stacklevel=3)
        return RewardOutput(total, details)

    def _normalized(self, name: str, raw: torch.Tensor,
                    moments: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        if self.normalize == "affine":
            shift, scale = self.affine[name]
            return (raw - shift) / scale
        if self.normalize == "zscore":
            mean, std = moments
            return (raw - mean.to(raw)) / (std.to(raw) + ZSCORE_EPS)
        return raw

    def _context_for(self, name: str, context: dict) -> dict:
        """The keywords part ``name`` takes (``context_keys``; all of them for a part that does not say)."""
        keys = getattr(self._part(name), "context_keys", None)
        return dict(context) if keys is None else {k: v for k, v in context.items() if k in keys}

    def _check_context(self, context: dict) -> None:
        """Refuse a keyword that no part takes (a typo, or a part missing from the composition), before scoring."""
        taken = set()
        for name in self.part_names:
            keys = getattr(self._part(name), "context_keys", None)
            taken |= set(context) if keys is None else set(keys)
        unknown = sorted(set(context) - taken)
        if unknown:
            takes = {n: sorted(getattr(self._part(n), "context_keys", None) or []) for n in self.part_names}
            raise TypeError(f"{self.name}: no part takes {unknown}; the parts take {takes}")

    def _lock(self, name: str) -> Any:
        lock = self._locks.get(name)
        return lock if lock is not None else nullcontext()

    def _tensor_raw(self, names: list[str], images: torch.Tensor, prompts: list[str] | None,
                    context: dict) -> dict[str, torch.Tensor]:
        """Raw float32 ``(B,)`` scores of ``names``; parts that expose the shared-feature protocol
        (``feature_key``, ``features``, ``score_features``; e.g. CLIP rewards on one tower with one
        preprocessing) run their backbone once per call for all of them."""
        shared: dict[Any, Any] = {}  # feature_key -> features, computed once per call
        out = {}
        for name in names:
            part = self._part(name)
            with self._lock(name):
                key = part.feature_key(images) if hasattr(part, "feature_key") else None
                if key is None:
                    raw = part(images, prompts, **self._context_for(name, context))
                else:
                    if key not in shared:
                        shared[key] = part.features(images)
                    part_prompts = prompts if getattr(part, "requires_prompt", True) else None
                    raw = part.score_features(shared[key], part_prompts).scores.to(images.device)
            out[name] = checked_scores(name, raw, images.shape[0])
        return out

    def extra_repr(self) -> str:
        return f"weights={self.weights}, normalize={self.normalize!r}, nan_policy={self.nan_policy!r}"


def _key(name: str) -> str:
    return name.replace(".", "_")  # ModuleDict keys cannot contain "."


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _warn_infinite(name: str, raw: Mapping[str, torch.Tensor]) -> None:
    for part, values in raw.items():
        rows = torch.isinf(values).nonzero().flatten().tolist()
        if rows:
            warnings.warn(f"{name}: z-score statistics of {part!r} ignore rows {rows} (+-inf); those rows "
                          "normalise to +-inf", stacklevel=4)


def compose(
    rewards: Mapping[Any, float],
    *,
    normalize: Normalize = "none",
    affine: Mapping[str, tuple[float, float]] | None = None,
    normalize_weights: bool = False,
    nan_policy: NanPolicy = "skip",
    update_stats: bool = True,
    device: Any = None,
    dtype: Any = None,
    load_options: Mapping[str, Mapping[str, Any]] | None = None,
    name: str = "composed",
) -> ComposedReward:
    """Build a weighted sum of rewards from a plain dict (e.g. parsed from YAML).

    Args:
        rewards: ``{registry name or RewardFn instance: weight}``; weights are finite, not all 0. Names are
            loaded with ``rk.load(name, device=device, dtype=dtype, **load_options.get(name, {}))``; an
            instance's ``name`` attribute is its key (duplicates raise).
        normalize: ``"none"``, ``"zscore"`` or ``"affine"`` (module docstring).
        affine: ``{name: (shift, scale)}`` (finite, scale != 0), only with ``normalize="affine"``.
        normalize_weights: divide the weights by their sum (MixGRPO's convention).
        nan_policy: ``"skip"`` (default) or ``"propagate"``.
        update_stats: ``False`` freezes the z-score statistics (update them with ``update_statistics``).
        device, dtype: for rewards loaded by name.
        load_options: per-name ``rk.load`` options (``weights=``, ``config=``, ...).
        name: the composed reward's name (log key).

    Returns:
        A ``ComposedReward``; ``evaluate()`` gives the total and every part.
    """
    from rewardkit.registry import load

    parts: dict[str, Any] = {}
    weights: dict[str, float] = {}
    for member, weight in rewards.items():
        if isinstance(member, str):
            key, reward = member, load(member, device=device, dtype=dtype, **dict((load_options or {}).get(member, {})))
        else:
            key, reward = getattr(member, "name", None), member
            if not isinstance(key, str) or not callable(member):
                raise TypeError(f"compose: members must be registry names or RewardFns with a name, got {member!r}")
        if key in parts:
            raise ValueError(f"compose: two members are named {key!r}; give one of them another .name")
        parts[key], weights[key] = reward, weight
    return ComposedReward(parts, weights, normalize=normalize, affine=affine, normalize_weights=normalize_weights,
                          nan_policy=nan_policy, update_stats=update_stats, name=name)
