"""Weighted composition of rewards: ``rk.compose({"pickscore": 1.0, "aesthetic": 0.1}, normalize=...)``.

``total = sum_k w_k * n_k(r_k)`` where ``r_k`` is part ``k``'s raw score and ``n_k`` its normalisation:

* ``"none"``: ``n(r) = r``;
* ``"affine"``: ``n(r) = (r - shift) / scale`` with fixed per-part ``affine={name: (shift, scale)}``;
* ``"zscore"``: ``n(r) = (r - mean) / (std + eps)`` with per-part *running* statistics over every
  score seen so far (this batch included), kept as float64 sums in buffers, so they are saved and
  restored with ``state_dict`` and all-reduced across processes when ``torch.distributed`` is
  initialised (then every rank must call the composed reward the same number of times).

Parts that expose the shared-feature protocol and return the same ``feature_key`` (CLIP-family
rewards on one image tower with the same preprocessing and precision) compute the image features
once per call.

NaN in a part means "not applicable to this row" (TRL's ``None``). ``nan_policy="skip"`` (default)
drops that part from the row and rescales the remaining weights to the row's full weight mass
(``sum |w|``); a row with no finite part is NaN (with a warning naming the rows).
``nan_policy="propagate"`` makes any NaN part NaN the row. Running statistics ignore NaN.

Group-relative advantages (GRPO / DDPO per-prompt normalisation) are not composition; they live in
``rewardkit.integrations``.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, Mapping

import torch
from torch import nn

from rewardkit.protocols import Reward, RewardOutput

__all__ = ["ComposedReward", "RunningStats", "compose"]

Normalize = Literal["none", "zscore", "affine"]
NanPolicy = Literal["skip", "propagate"]
ZSCORE_EPS = 1e-6  # keeps a constant reward from dividing by zero


class RunningStats(nn.Module):
    """Count, sum and sum of squares of a stream of scores (float64 buffers), NaN ignored."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("total", torch.zeros((), dtype=torch.float64))
        self.register_buffer("total_sq", torch.zeros((), dtype=torch.float64))

    def update(self, values: torch.Tensor, sync: bool = True) -> None:
        """Add the finite entries of ``values`` (all-reduced across processes when distributed)."""
        finite = values.detach().double()[torch.isfinite(values.detach())]
        delta = torch.stack([finite.new_tensor(float(finite.numel())), finite.sum(), (finite**2).sum()])
        if sync and torch.distributed.is_available() and torch.distributed.is_initialized():
            delta = delta.to(self.count.device)
            torch.distributed.all_reduce(delta)
        delta = delta.to(self.count.device)
        self.count += delta[0]
        self.total += delta[1]
        self.total_sq += delta[2]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count.clamp_min(1)

    @property
    def std(self) -> torch.Tensor:
        """Population standard deviation of everything seen (0 before two values)."""
        variance = self.total_sq / self.count.clamp_min(1) - self.mean**2
        return variance.clamp_min(0).sqrt()


class ComposedReward(Reward):
    """A weighted sum of rewards, itself a RewardFn (see the module docstring for the maths).

    ``evaluate()`` returns the total and, in ``details``, every part's raw score under its name and
    its normalised score under ``"<name>/normalized"``.
    """

    higher_is_better = True

    def __init__(
        self,
        parts: Mapping[str, Any],
        weights: Mapping[str, float],
        *,
        normalize: Normalize = "none",
        affine: Mapping[str, tuple[float, float]] | None = None,
        normalize_weights: bool = False,
        nan_policy: NanPolicy = "skip",
        update_stats: bool = True,
        name: str = "composed",
    ) -> None:
        super().__init__()
        _check_options(parts, weights, normalize, affine, nan_policy)
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
        self.freeze()

    def _part(self, name: str) -> Any:
        return self._callables[name] if name in self._callables else self.parts[_key(name)]

    def _normalized(self, name: str, raw: torch.Tensor) -> torch.Tensor:
        if self.normalize == "affine":
            shift, scale = self.affine[name]
            return (raw - shift) / scale
        if self.normalize == "zscore":
            stats = self.stats[_key(name)]
            if self.update_stats:
                stats.update(raw)
            return (raw - stats.mean.to(raw)) / (stats.std.to(raw) + ZSCORE_EPS)
        return raw

    def score(self, images: torch.Tensor, prompts: list[str] | None, **context: Any) -> RewardOutput:
        details: dict[str, Any] = {}
        weighted, masses = [], []
        shared: dict[Any, Any] = {}  # feature_key -> features, computed once per call
        for name in self.part_names:
            raw = self._raw_score(name, images, prompts, shared, context).float()  # (B,)
            if raw.shape != (images.shape[0],):
                raise ValueError(f"compose: part {name!r} returned shape {tuple(raw.shape)}, expected ({images.shape[0]},)")
            normalized = self._normalized(name, raw)
            details[name], details[f"{name}/normalized"] = raw.detach(), normalized.detach()
            finite = torch.isfinite(normalized)
            weight = self.weights[name]
            weighted.append(torch.where(finite, weight * normalized, torch.zeros_like(normalized)))
            masses.append(finite.to(normalized.dtype) * abs(weight))
        total = torch.stack(weighted).sum(0)  # (B,)
        masses_all = torch.stack(masses)  # (parts, B)
        present = masses_all.sum(0)  # (B,) weight mass of the finite parts per row
        complete = (masses_all > 0).sum(0) == sum(1 for w in self.weights.values() if w != 0)  # no NaN part
        nan = torch.full_like(total, float("nan"))
        if self.nan_policy == "propagate":
            total = torch.where(complete, total, nan)
        else:  # rescale only the incomplete rows, so complete rows are exactly the weighted sum
            full = sum(abs(w) for w in self.weights.values())
            rescaled = total * (full / present.clamp_min(1e-30))
            total = torch.where(complete, total, torch.where(present > 0, rescaled, nan))
        empty = (present == 0).nonzero().flatten().tolist()
        if empty:
            warnings.warn(f"{self.name}: rows {empty} have no finite part; their total is NaN", stacklevel=3)
        return RewardOutput(total, details)

    def _raw_score(self, name: str, images: torch.Tensor, prompts, shared: dict, context: dict) -> torch.Tensor:
        """One part's scores; parts that expose the shared-feature protocol (``feature_key``,
        ``features``, ``score_features``; e.g. CLIP rewards on one tower with one preprocessing) run
        their backbone once per call for all of them."""
        part = self._part(name)
        key = part.feature_key(images) if hasattr(part, "feature_key") else None
        if key is None:
            return part(images, prompts, **context)
        if key not in shared:
            shared[key] = part.features(images)
        part_prompts = prompts if getattr(part, "requires_prompt", True) else None
        return part.score_features(shared[key], part_prompts).scores.to(images.device)

    def extra_repr(self) -> str:
        return f"weights={self.weights}, normalize={self.normalize!r}, nan_policy={self.nan_policy!r}"


def _key(name: str) -> str:
    return name.replace(".", "_")  # ModuleDict keys cannot contain "."


def _check_options(parts, weights, normalize, affine, nan_policy) -> None:
    if not parts:
        raise ValueError("compose: give at least one reward, e.g. {'pickscore': 1.0}")
    if normalize not in ("none", "zscore", "affine"):
        raise ValueError(f"compose: normalize must be 'none', 'zscore' or 'affine', got {normalize!r}")
    if nan_policy not in ("skip", "propagate"):
        raise ValueError(f"compose: nan_policy must be 'skip' or 'propagate', got {nan_policy!r}")
    for name in parts:
        weight = weights.get(name)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight != weight:
            raise ValueError(f"compose: the weight of {name!r} must be a finite number, got {weight!r}")
    if normalize == "affine":
        missing = [n for n in parts if n not in (affine or {})]
        if missing:
            raise ValueError(f"compose: normalize='affine' needs affine={{name: (shift, scale)}} for {missing}")
        zero = [n for n in parts if (affine or {})[n][1] == 0]
        if zero:
            raise ValueError(f"compose: affine scale must be non-zero, got 0 for {zero}")


def compose(
    rewards: Mapping[Any, float],
    *,
    normalize: Normalize = "none",
    affine: Mapping[str, tuple[float, float]] | None = None,
    normalize_weights: bool = False,
    nan_policy: NanPolicy = "skip",
    device: Any = None,
    dtype: Any = None,
    load_options: Mapping[str, Mapping[str, Any]] | None = None,
    name: str = "composed",
) -> ComposedReward:
    """Build a weighted sum of rewards from a plain dict (e.g. parsed from YAML).

    Args:
        rewards: ``{registry name or RewardFn instance: weight}``. Names are loaded with
            ``rk.load(name, device=device, dtype=dtype, **load_options.get(name, {}))``; an instance's
            ``name`` attribute is its key (duplicates raise).
        normalize: ``"none"``, ``"zscore"`` or ``"affine"`` (module docstring).
        affine: ``{name: (shift, scale)}`` for ``normalize="affine"``.
        normalize_weights: divide the weights by their sum (MixGRPO's convention).
        nan_policy: ``"skip"`` (default) or ``"propagate"``.
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
                          nan_policy=nan_policy, name=name)
