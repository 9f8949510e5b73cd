"""Periodic evaluation during training: FID / rewards on a fixed prompt set, on every rank, logged.

``FIDEvalCallback`` and ``RewardEvalCallback`` generate images for a fixed prompt set with fixed seeds
every ``every_n_steps`` steps. Each rank generates only its shard (contiguous, uneven allowed, possibly
empty), updates the metric, and the ranks reduce with all-reduce sums of fixed-shape tensors, so no
collective ever depends on a rank's batch sizes (``reference/rl_integration.md`` section 4: an unpadded
``gather`` of uneven shards returns garbage). Every rank gets the same values; logging goes to
``accelerator.log`` (accelerate's trackers log on the main process only: ``accelerate/accelerator.py``
``Accelerator.log`` is ``@on_main_process``).

Rewards are reduced as rows: each rank writes its shard's scores into a zero ``(N, parts)`` float64
matrix and one all-reduce sum gives every rank all N rows (``x + 0`` is exact), so the statistics are
computed on the same vector as in one process: bit-identical to a single-process run, and the parts'
correlations (Spearman needs all rows) come from the same collective. FID sums float64 statistics
(the metric's ``sync``): there the order of the float64 additions differs from one process.

Resume: ``state_dict()`` / ``load_state_dict()`` keep the last evaluated step, the alarm's history and
(FID) the reference statistics frozen at the first evaluation (read through the metric's public
``reference_statistics()`` / ``side(True)``, restored with ``set_reference`` / ``set_reference_rows``).
A reward hacking alarm (``alarm=RewardHackingAlarm(...)``, ``hacking_alarm.py``) and the
``stop_on_alarm`` policy are documented in ``EvalCallback`` and ``docs/callbacks.md``.

**Call ``maybe_evaluate`` on every rank**, never inside ``if accelerator.is_main_process`` (diffusers'
``log_validation`` pattern): the reduction is a collective and would deadlock. Generate with the
unwrapped model (``accelerator.unwrap_model``): a DDP forward may broadcast buffers, a collective
that ranks with different numbers of batches would not match.

Evaluation runs under ``torch.no_grad`` (not ``inference_mode``: tensors a model caches during
evaluation would otherwise be unusable in later training steps), with the given modules in eval mode
and every submodule's mode restored afterwards, and restores the Python, NumPy, CPU and (current
device) CUDA RNG states, so training continues exactly as without evaluation. The generated side is
reset afterwards; a z-score composition's running statistics are not updated by evaluation.

transformers: ``EvalTrainerCallback`` (``callback.as_trainer_callback(trainer)``, ``eval_trainer.py``)
runs in ``on_step_end`` when ``state.global_step % every_n_steps == 0`` and logs with ``trainer.log``
(``state.log_history`` and every ``report_to`` integration). In TRL trainers that call also flushes the
step's accumulated training metrics into the evaluation's log entry early; nothing is lost, the window
is split (reference section 1.6, TRL ``LogCompletionsCallback`` uses the same trainer-reference pattern).
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from rewardkit.integrations.hacking_alarm import RewardHackingAlarm, part_correlations
from rewardkit.integrations.periodic_eval import EvalCallback, rank_world, shard_range
from rewardkit.metrics.frechet import GaussianReference, sync_sum

__all__ = ["EvalCallback", "FIDEvalCallback", "RewardEvalCallback", "RewardHackingAlarm", "shard_range",
           "shard_source"]  # + EvalTrainerCallback (lazy, eval_trainer.py)

logger = logging.getLogger(__name__)

KID_PAIR = 2  # rewardkit.metrics.kid.KID.compute() -> [mean, std] over subsets


def shard_source(source: Any, rank: int, world: int) -> tuple[Any, bool]:
    """``(this rank's part of an image source, whether it was sharded)``: tensors, lists and folders
    shard; other sources (a ``DataLoader``) are read whole on every rank."""
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        from rewardkit.image_io import list_images

        source = list(list_images(source, recursive=False))
    if isinstance(source, (torch.Tensor, list, tuple)):
        part = shard_range(len(source), rank, world)
        return source[part.start : part.stop], True
    return source, False


class FIDEvalCallback(EvalCallback):
    """Periodic FID (or any Fréchet / stored-feature distribution metric) of generated images.

    The reference side is fixed: ``reference=`` statistics (a ``.npz`` from ``rewardkit fid-stats`` or a
    ``GaussianReference``; feature rows ``(N, D)`` for stored-feature metrics like KID), or computed
    once from ``reference_images=`` at the first evaluation (sharded over ranks when a tensor, list or
    folder; read whole on every rank otherwise) and kept. Logs ``<prefix>/<metric.name>`` (e.g.
    ``eval/fid``; KID's mean, with its std over subsets as ``eval/kid_std``) and
    ``<prefix>/<metric.name>_num_images``.

    Args:
        metric: A ``FrechetDistance`` (``rk.load("fid")``, FD-DINOv2) or stored-feature metric (KID, CMMD).
        prompts: Evaluation prompts; see ``EvalCallback`` for the other arguments.
        reference: Precomputed reference statistics.
        reference_images: Reference images (any source ``metric.update`` accepts), used once.
    """

    def __init__(self, metric: Any, prompts: Sequence[str], *, reference: Any = None, reference_images: Any = None,
                 **options: Any) -> None:
        super().__init__(prompts, **options)
        if reference is not None and reference_images is not None:
            raise ValueError("FIDEvalCallback: pass reference= (precomputed statistics) or reference_images=, not both")
        self.metric, self.reference_images = metric, reference_images
        if isinstance(reference, torch.Tensor) and hasattr(metric, "set_reference_rows"):
            metric.set_reference_rows(reference)
        elif reference is not None:
            metric.set_reference(reference)
        self._reference_ready = self._has_fixed_reference()
        self._reference_frozen_here = False  # True once _prepare froze it from images (saved by state_dict)
        if not self._reference_ready and reference_images is None and not self._real_count():
            raise ValueError(f"FIDEvalCallback: {metric.name} has no reference side; pass reference='stats.npz' "
                             "(from `rewardkit fid-stats`) or reference_images=<tensor, folder or list of paths>")

    def _has_fixed_reference(self) -> bool:
        return bool(getattr(self.metric, "has_fixed_reference", False))

    def _real_count(self) -> int:
        real = getattr(self.metric, "real", None)
        return int(real.n) if real is not None else int(self.metric.store.count(True))

    def _prepare(self, accelerator: Any) -> None:
        """First use: add this rank's reference shard, sum over ranks, and freeze it as the reference."""
        if self._reference_ready:
            return
        sharded = True  # real images the user added before count as this rank's shard
        if self.reference_images is not None:
            part, sharded = shard_source(self.reference_images, *rank_world(accelerator))
            if not sharded or len(part):
                self.metric.update(part, real=True)
        if sharded:
            self.metric.sync(accelerator)  # the generated side is empty here: only the reference is summed
        self._freeze_reference()
        self._reference_ready, self.reference_images, self._reference_frozen_here = True, None, True

    def _freeze_reference(self) -> None:
        metric = self.metric
        if hasattr(metric, "reference_statistics"):
            reference = metric.reference_statistics()
            metric.reset(real=True)
            metric.set_reference(reference)
        else:
            rows = metric.side(True)
            metric.reset(real=True)
            metric.set_reference_rows(rows)

    def _update(self, images: torch.Tensor, prompts: list[str]) -> None:
        self.metric.update(images, real=False)

    def _reduce(self, accelerator: Any) -> dict[str, float]:
        self.metric.sync(accelerator)
        fake = getattr(self.metric, "fake", None)
        count = int(fake.n) if fake is not None else int(self.metric.store.count(False))
        value = self.metric.compute().reshape(-1)  # FID: one value; KID: [mean, std] over subsets
        result = {self._key(self.metric.name): float(value[0]), self._key(f"{self.metric.name}_num_images"): count}
        if value.numel() == KID_PAIR:
            result[self._key(f"{self.metric.name}_std")] = float(value[1])
        return result

    def _reset(self) -> None:
        self.metric.reset(real=False)

    def _alarm_inputs(self, values: dict[str, float]) -> tuple[dict[str, float], dict[str, bool]]:
        name = self.metric.name
        return {name: values[self._key(name)]}, {name: bool(getattr(self.metric, "higher_is_better", False))}

    def _extra_state(self) -> dict[str, Any]:
        """The reference frozen at the first evaluation (a given ``reference=`` is rebuilt by the constructor)."""
        if not self._reference_frozen_here:
            return {"reference": None}
        metric = self.metric
        if hasattr(metric, "reference_statistics"):
            ref = metric.reference_statistics()
            return {"reference": {"mu": ref.mu.detach().cpu().clone(), "sigma": ref.sigma.detach().cpu().clone(),
                                  "n": int(ref.n), "meta": {str(k): str(v) for k, v in ref.meta.items()}}}
        return {"reference": {"rows": metric.side(True).detach().cpu().clone()}}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        saved = state.get("reference")
        if saved is None:
            return
        self.metric.reset(real=True)
        if "rows" in saved:
            self.metric.set_reference_rows(torch.as_tensor(saved["rows"]))
        else:
            self.metric.set_reference(GaussianReference(torch.as_tensor(saved["mu"], dtype=torch.float64),
                                                        torch.as_tensor(saved["sigma"], dtype=torch.float64),
                                                        int(saved["n"]), dict(saved["meta"])))
        self._reference_ready, self.reference_images, self._reference_frozen_here = True, None, True


class RewardEvalCallback(EvalCallback):
    """Periodic mean and std of a reward (any ``RewardFn``, or ``rk.compose(...)``) on generated images.

    Logs ``<prefix>/<reward.name>_mean`` / ``_std`` and, for a composed reward, the same for every
    part's raw score (``evaluate().details[part]``) plus the parts' pairwise correlations
    ``<prefix>/<reward.name>/pearson/<a>~<b>`` and ``.../spearman/<a>~<b>`` (rows where either part is NaN
    left out). Statistics are over all ranks' images (NaN rows, "not applicable", are left out; a std
    needs 2 finite rows, else NaN). The alarm watches every ``<name>_mean`` (or ``alarm.watch``).

    A z-score composition is evaluated with its running statistics frozen for the call (evaluation
    images must not enter them) without touching the shared instance that training threads call:
    the call passes ``update_stats=False`` where ``evaluate`` accepts it, else goes through a shallow
    copy with ``update_stats=False`` (same parts and statistics buffers). Flipping the shared flag, as
    earlier versions did, let a training call on another thread skip its statistics update and its
    all-reduce on one rank only (a hang or mixed-up collectives).

    Args:
        reward: The reward; called as ``reward.evaluate(images, prompts)`` (or ``reward(images, prompts)``).
        prompts: Evaluation prompts; see ``EvalCallback`` for the other arguments.
    """

    def __init__(self, reward: Any, prompts: Sequence[str], **options: Any) -> None:
        super().__init__(prompts, **options)
        self.reward = reward
        self.parts = list(getattr(reward, "part_names", []))
        self.names = [reward.name] + self.parts
        self._rows: list[torch.Tensor] = []  # this rank's (b, len(names)) float64 score batches

    def _update(self, images: torch.Tensor, prompts: list[str]) -> None:
        param = next(iter(self.reward.parameters()), None) if isinstance(self.reward, nn.Module) else None
        images = images.to(param.device) if param is not None else images
        if hasattr(self.reward, "evaluate"):
            output = _evaluate_frozen(self.reward, images, prompts)
            scores, details = output.scores, output.details
        else:
            scores, details = self.reward(images, prompts), {}
        columns = [scores] + [torch.as_tensor(details[name]) for name in self.parts]
        self._rows.append(torch.stack([c.detach().double().cpu().reshape(-1) for c in columns], dim=1))

    def _reduce(self, accelerator: Any) -> dict[str, float]:
        rows = torch.zeros(len(self.prompts), len(self.names), dtype=torch.float64)
        local = torch.cat(self._rows) if self._rows else rows[:0]
        if local.shape[0] != len(self._shard):
            raise RuntimeError(f"RewardEvalCallback: {local.shape[0]} scored rows for a shard of {len(self._shard)}")
        rows[self._shard.start : self._shard.stop] = local
        rows = sync_sum(rows, accelerator)  # each row is non-zero on one rank only: the sum is exact
        result: dict[str, float] = {}
        for column, name in enumerate(self.names):
            values = rows[:, column][torch.isfinite(rows[:, column])]
            result[self._key(f"{name}_mean")] = float(values.mean()) if values.numel() else math.nan
            result[self._key(f"{name}_std")] = float(values.std()) if values.numel() > 1 else math.nan
        if len(self.parts) > 1:
            parts = {name: rows[:, column + 1] for column, name in enumerate(self.parts)}
            result.update({self._key(f"{self.reward.name}/{k}"): v for k, v in part_correlations(parts).items()})
        return result

    def _reset(self) -> None:
        self._rows = []

    def _alarm_inputs(self, values: dict[str, float]) -> tuple[dict[str, float], dict[str, bool]]:
        inputs = {f"{name}_mean": values[self._key(f"{name}_mean")] for name in self.names}
        orientation = {f"{self.reward.name}_mean": bool(getattr(self.reward, "higher_is_better", True))}
        part = getattr(self.reward, "_part", None)  # ComposedReward's lookup of a part by its name
        for name in self.parts:
            orientation[f"{name}_mean"] = bool(getattr(part(name), "higher_is_better", True)) if part else True
        return inputs, orientation


def _evaluate_frozen(reward: Any, images: torch.Tensor, prompts: list[str]) -> Any:
    """``reward.evaluate(images, prompts)`` without updating running statistics, never mutating ``reward``."""
    if not getattr(reward, "update_stats", False):
        return reward.evaluate(images, prompts)
    if "update_stats" in inspect.signature(reward.evaluate).parameters:
        return reward.evaluate(images, prompts, update_stats=False)
    # A view sharing every attribute (parts, statistics buffers, and any locks or call-order state the
    # composition keeps) except this flag. Built from __dict__ rather than copy.copy, which would go
    # through __getstate__ and could give the view fresh locks of its own.
    view = object.__new__(type(reward))
    view.__dict__.update(reward.__dict__)
    view.update_stats = False
    return view.evaluate(images, prompts)


def __getattr__(name: str) -> Any:
    # EvalTrainerCallback subclasses transformers.TrainerCallback: built on first use (eval_trainer.py) so
    # that importing this module does not import transformers (accelerate-only loops never need it).
    if name == "EvalTrainerCallback":
        from rewardkit.integrations.eval_trainer import trainer_callback_class

        return trainer_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
