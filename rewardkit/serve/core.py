"""The engine-independent half of ``rewardkit serve``: build the served reward and score merged requests.

:class:`ScoringCore` is what a Ray Serve replica (``deployment.py``) and the plain WSGI baseline
(``wsgi.py``) both run: it takes several decoded requests (a dynamic batch), scores rows of equal image
size together in one forward pass, and splits the answers back per request. A failure of the merged pass
falls back to scoring each request alone, so one request that breaks the model cannot take the others'
rows with it; a request that still fails gets NaN rows with the reason, never a lost row.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rewardkit.serve.wire import Batch, Scored, WireError

__all__ = ["ServeSpec", "ScoringCore", "load_served_reward", "check_spec"]

logger = logging.getLogger(__name__)
_SPEC_SUFFIXES = (".yaml", ".yml")


@dataclass
class ServeSpec:
    """What to serve and how (the arguments of ``rewardkit serve``).

    Attributes:
        reward: a registry name, a ``"module:factory"`` path, or a ``.yaml`` composition spec (the keyword
            arguments of ``rk.compose``: ``rewards: {name: weight}``, ``normalize``, ``load_options``, ...).
        tiny: tiny RANDOM models from ``rewardkit.testing`` (offline; meaningless numbers), built under
            ``tiny_root``.
        weights, dtype, options: passed to ``rk.load`` (ignored for a YAML spec, which carries its own).
        device: ``None`` picks ``cuda`` when the replica was given a GPU, else ``cpu``.
    """

    reward: str
    tiny: bool = False
    tiny_root: str | None = None
    weights: str | None = None
    dtype: str | None = None
    device: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


def check_spec(spec: ServeSpec) -> None:
    """Fail fast, before Ray starts: an unknown reward, a missing or malformed YAML spec, options a spec ignores."""
    if spec.reward.endswith(_SPEC_SUFFIXES):
        if spec.weights is not None or spec.dtype is not None or spec.options:
            raise ValueError(f"{spec.reward}: a YAML composition carries its own options (load_options:); drop "
                             "--weights / --dtype")
        if not Path(spec.reward).is_file():
            raise FileNotFoundError(f"{spec.reward}: no such YAML spec")
        _load_yaml_spec(Path(spec.reward))
    elif ":" not in spec.reward:
        from rewardkit.registry import get_entry

        entry = get_entry(spec.reward)  # KeyError with close matches
        if entry.kind != "reward":
            raise ValueError(f"{spec.reward} is a {entry.kind} metric (update/compute); only per-image rewards are served")


def _load_yaml_spec(path: Path) -> dict[str, Any]:
    import yaml

    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(spec, dict) or not isinstance(spec.get("rewards"), dict):
        raise ValueError(f"{path}: a composition spec is a YAML mapping with 'rewards: {{name: weight}}' (and "
                         f"optional rk.compose arguments), got {type(spec).__name__}")
    return spec


def load_served_reward(spec: ServeSpec) -> Any:
    """Build the reward a replica serves (a RewardFn, frozen, on ``spec.device``)."""
    import rewardkit as rk

    device = spec.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if spec.reward.endswith(_SPEC_SUFFIXES):
        compose_args = _load_yaml_spec(Path(spec.reward))
        if spec.tiny:
            from rewardkit.testing import load_tiny

            root = Path(spec.tiny_root or _tiny_root())
            members = {load_tiny(name, root, device=device): weight for name, weight in compose_args.pop("rewards").items()}
            compose_args.pop("load_options", None)
            return rk.compose(members, **compose_args)
        return rk.compose(device=device, **compose_args)
    if spec.tiny:
        from rewardkit.testing import load_tiny

        return load_tiny(spec.reward, spec.tiny_root or _tiny_root(), device=device, dtype=spec.dtype, **spec.options)
    return rk.load(spec.reward, weights=spec.weights, device=device, dtype=spec.dtype, **spec.options)


def _tiny_root() -> str:
    """A temporary folder for --tiny checkpoints, removed when the replica process exits."""
    import atexit
    import shutil
    import tempfile

    root = tempfile.mkdtemp(prefix="rewardkit-serve-tiny-")
    atexit.register(shutil.rmtree, root, True)
    return root


def _reward_device(reward: Any) -> torch.device:
    parameter = next(iter(reward.parameters()), None) if hasattr(reward, "parameters") else None
    return parameter.device if parameter is not None else torch.device("cpu")


def _rows_of(value: Any, batch: Batch) -> list:
    """A context value as one item per row (a per-row list as it is, any other value repeated)."""
    return list(value) if isinstance(value, (list, tuple)) and len(value) == len(batch) else [value] * len(batch)


class ScoringCore:
    """Scores decoded requests with one reward, merging requests of equal image size into one pass.

    Thread-safe: calls are serialised by a lock (one model, one forward pass at a time per replica).
    """

    def __init__(self, reward: Any) -> None:
        self.reward = reward
        self.device = _reward_device(reward)
        self._lock = threading.Lock()
        self.passes = self.rows = 0  # forward passes run and rows scored (reported by GET /ready)

    def info(self) -> dict[str, Any]:
        """What ``GET /ready`` reports (and the client reads to describe the remote reward)."""
        reward = self.reward
        return {"name": getattr(reward, "name", "reward"), "higher_is_better": bool(reward.higher_is_better),
                "requires_prompt": bool(reward.requires_prompt), "device": str(self.device),
                "passes": self.passes, "rows": self.rows}

    def check(self, batch: Batch) -> None:
        """Reject a request this reward cannot take, before it joins a batch (the server answers 400)."""
        if self.reward.requires_prompt and batch.prompts is None:
            raise WireError(f"{self.info()['name']} needs one prompt per image; send prompts")

    def score(self, batches: list[Batch]) -> list[Scored]:
        """Score every batch; never raises for a model failure (those rows become NaN with the reason)."""
        with self._lock, torch.inference_mode():
            try:
                return self._score_merged(batches)
            except Exception as error:  # noqa: BLE001 - fall back to one pass per request, below
                if len(batches) == 1:
                    return [self._failed(batches[0], error)]
                logger.warning("merged pass over %d requests failed (%s); scoring them one by one", len(batches), error)
            results = []
            for batch in batches:
                try:
                    results += self._score_merged([batch])
                except Exception as error:  # noqa: BLE001 - this request's rows become NaN with the reason
                    results.append(self._failed(batch, error))
            return results

    @staticmethod
    def _failed(batch: Batch, error: Exception) -> Scored:
        logger.warning("scoring a request of %d rows failed: %s: %s", len(batch), type(error).__name__, error)
        reason = f"server error: {type(error).__name__}: {error}"
        return Scored([math.nan] * len(batch), [reason] * len(batch))

    def _score_merged(self, batches: list[Batch]) -> list[Scored]:
        rows = [(b, r) for b, batch in enumerate(batches) for r in range(len(batch))]
        keys = sorted({k for batch in batches for k in batch.context})
        groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for b, r in rows:  # one forward pass per image size
            groups.setdefault(tuple(batches[b].images[r].shape[1:]), []).append((b, r))
        results = [Scored([math.nan] * len(batch), [None] * len(batch), {}) for batch in batches]
        per_row_context = [{k: _rows_of(batch.context[k], batch) for k in batch.context} for batch in batches]
        for members in groups.values():
            images = torch.stack([batches[b].images[r] for b, r in members]).to(self.device)
            prompts = None if not self.reward.requires_prompt else [batches[b].prompts[r] for b, r in members]
            context = {k: [per_row_context[b][k][r] if k in per_row_context[b] else None for b, r in members]
                       for k in keys}
            evaluate = getattr(self.reward, "evaluate", None)
            output = evaluate(images, prompts, **context) if evaluate else None
            scores = (output.scores if output is not None else self.reward(images, prompts, **context)).float().cpu()
            self.passes, self.rows = self.passes + 1, self.rows + len(members)
            details = {} if output is None else output.details
            failures = details.get("failure")
            for i, (b, r) in enumerate(members):
                value = float(scores[i])
                results[b].scores[r] = value
                reason = failures[i] if isinstance(failures, list) else None
                results[b].failures[r] = reason if reason is not None or math.isfinite(value) else \
                    "the reward returned NaN without a reason"
                for key, column in _per_row_details(details, len(members)).items():
                    results[b].details.setdefault(key, [None] * len(batches[b]))[r] = column[i]
        return results


def _per_row_details(details: dict[str, Any], batch: int) -> dict[str, list]:
    """The details that travel: ``(B,)`` tensors as floats, lists of ``B`` str / number / bool / None."""
    kept: dict[str, list] = {}
    for key, value in details.items():
        if key == "failure":
            continue
        if isinstance(value, torch.Tensor) and value.shape == (batch,):
            kept[key] = value.detach().float().cpu().tolist()
        elif isinstance(value, list) and len(value) == batch and all(
                v is None or isinstance(v, (str, int, float, bool)) for v in value):
            kept[key] = value
    return kept
