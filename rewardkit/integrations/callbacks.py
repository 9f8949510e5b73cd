"""Periodic evaluation during training: FID / rewards on a fixed prompt set, on every rank, logged.

``FIDEvalCallback`` and ``RewardEvalCallback`` generate images for a fixed prompt set with fixed seeds
every ``every_n_steps`` steps. Each rank generates only its shard (contiguous, uneven allowed, possibly
empty), updates the metric, and the ranks reduce by sums (FID: the metric's ``sync``; rewards: float64
``[count, Σ, Σ²]`` per key), so no collective ever depends on a rank's batch sizes
(``reference/rl_integration.md`` section 4: an unpadded ``gather`` of uneven shards returns garbage).
Every rank gets the same values; logging goes to ``accelerator.log`` (accelerate's trackers log on
the main process only: ``accelerate/accelerator.py`` ``Accelerator.log`` is ``@on_main_process``).

**Call ``maybe_evaluate`` on every rank**, never inside ``if accelerator.is_main_process`` (diffusers'
``log_validation`` pattern): the reduction is a collective and would deadlock. Generate with the
unwrapped model (``accelerator.unwrap_model``): a DDP forward may broadcast buffers, a collective
that ranks with different numbers of batches would not match.

Evaluation runs under ``torch.no_grad`` (not ``inference_mode``: tensors a model caches during
evaluation would otherwise be unusable in later training steps), with the given modules in eval mode
and every submodule's mode restored afterwards, and restores the Python, NumPy, CPU and (current
device) CUDA RNG states, so training continues exactly as without evaluation. The generated side is
reset afterwards; a zscore-composed reward's running statistics are not updated by evaluation.

transformers: ``EvalTrainerCallback`` (``callback.as_trainer_callback(trainer)``) runs in
``on_step_end`` when ``state.global_step % every_n_steps == 0`` (``transformers/trainer_callback.py``:
callbacks run on every rank; keys a callback adds in ``on_evaluate`` are not logged because
``Trainer.evaluate`` logs before calling it). It logs with ``trainer.log`` (``state.log_history`` and
every ``report_to`` integration). In TRL trainers that call also flushes the step's accumulated
training metrics into the evaluation's log entry early; nothing is lost, the window is split
(reference section 1.6, TRL ``LogCompletionsCallback`` uses the same trainer-reference pattern).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from rewardkit.integrations.periodic_eval import EvalCallback, rank_world, shard_range
from rewardkit.metrics.frechet import sync_sum

__all__ = ["EvalCallback", "FIDEvalCallback", "RewardEvalCallback", "shard_range", "shard_source"]  # + EvalTrainerCallback (lazy)

logger = logging.getLogger(__name__)


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
    ``eval/fid``) and ``<prefix>/<metric.name>_num_images``.

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
        self._reference_ready, self.reference_images = True, None

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
        return {self._key(self.metric.name): float(self.metric.compute()),
                self._key(f"{self.metric.name}_num_images"): count}

    def _reset(self) -> None:
        self.metric.reset(real=False)


class RewardEvalCallback(EvalCallback):
    """Periodic mean and std of a reward (any ``RewardFn``, or ``rk.compose(...)``) on generated images.

    Logs ``<prefix>/<reward.name>_mean`` / ``_std`` and, for a composed reward, the same for every
    part's raw score (``evaluate().details[part]``). Statistics are over all ranks' images (NaN rows,
    "not applicable", are left out; a std needs 2 finite rows, else NaN).

    Args:
        reward: The reward; called as ``reward.evaluate(images, prompts)`` (or ``reward(images, prompts)``).
        prompts: Evaluation prompts; see ``EvalCallback`` for the other arguments.
    """

    def __init__(self, reward: Any, prompts: Sequence[str], **options: Any) -> None:
        super().__init__(prompts, **options)
        self.reward = reward
        self.names = [reward.name] + list(getattr(reward, "part_names", []))
        self._scores: dict[str, list[torch.Tensor]] = {name: [] for name in self.names}

    def _update(self, images: torch.Tensor, prompts: list[str]) -> None:
        param = next(iter(self.reward.parameters()), None) if isinstance(self.reward, nn.Module) else None
        images = images.to(param.device) if param is not None else images
        # A zscore-composed reward must not learn from evaluation images, and its running-statistics
        # update is an all-reduce that ranks with different batch counts would not match.
        frozen = getattr(self.reward, "update_stats", None)
        if frozen is not None:
            self.reward.update_stats = False
        try:
            if hasattr(self.reward, "evaluate"):
                output = self.reward.evaluate(images, prompts)
                scores, details = output.scores, output.details
            else:
                scores, details = self.reward(images, prompts), {}
        finally:
            if frozen is not None:
                self.reward.update_stats = frozen
        self._scores[self.reward.name].append(scores.detach().double().cpu())
        for name in self.names[1:]:
            self._scores[name].append(torch.as_tensor(details[name]).detach().double().cpu())

    def _reduce(self, accelerator: Any) -> dict[str, float]:
        sums = torch.zeros(len(self.names), 3, dtype=torch.float64)  # [count, Σ, Σ²] of the finite scores
        for row, name in enumerate(self.names):
            values = torch.cat(self._scores[name]) if self._scores[name] else torch.zeros(0, dtype=torch.float64)
            values = values[torch.isfinite(values)]
            sums[row] = torch.stack([values.new_tensor(float(values.numel())), values.sum(), (values**2).sum()])
        sums = sync_sum(sums, accelerator)
        result: dict[str, float] = {}
        for (count, total, total_sq), name in zip(sums.tolist(), self.names):
            mean = total / count if count else float("nan")
            variance = (total_sq - count * mean * mean) / (count - 1) if count > 1 else float("nan")
            result[self._key(f"{name}_mean")] = mean
            result[self._key(f"{name}_std")] = max(variance, 0.0) ** 0.5 if count > 1 else float("nan")
        return result

    def _reset(self) -> None:
        self._scores = {name: [] for name in self.names}


def _build_trainer_callback_class() -> type:
    from transformers import TrainerCallback

    class EvalTrainerCallback(TrainerCallback):
        """``transformers.TrainerCallback`` running an ``EvalCallback`` in ``on_step_end``.

        Args:
            evaluation: A ``FIDEvalCallback`` / ``RewardEvalCallback``.
            trainer: The trainer, for ``trainer.accelerator`` and ``trainer.log`` (values reach
                ``state.log_history`` and every ``report_to`` integration). Without it the values are
                appended to ``state.log_history`` only and the default process group is used.
        """

        def __init__(self, evaluation: EvalCallback, trainer: Any = None) -> None:
            self.evaluation, self.trainer = evaluation, trainer

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
            if not self.evaluation.should_evaluate(state.global_step):
                return control
            accelerator = getattr(self.trainer, "accelerator", None)
            values = self.evaluation.evaluate(accelerator, step=state.global_step, model=model, log=False)
            if self.trainer is not None:
                self.trainer.log(dict(values))
            else:
                logger.warning("EvalTrainerCallback without trainer=: values go to state.log_history only, not "
                               "to report_to integrations; pass trainer=trainer to log through Trainer.log")
                state.log_history.append({**values, "step": state.global_step})
            return control

    EvalTrainerCallback.__module__, EvalTrainerCallback.__qualname__ = __name__, "EvalTrainerCallback"
    return EvalTrainerCallback


_TRAINER_CALLBACK: list[type] = []  # the class, built once


def _trainer_callback_class() -> type:
    if not _TRAINER_CALLBACK:
        _TRAINER_CALLBACK.append(_build_trainer_callback_class())
    return _TRAINER_CALLBACK[0]


def __getattr__(name: str) -> Any:
    # EvalTrainerCallback subclasses transformers.TrainerCallback: built on first use so that importing
    # this module does not import transformers (accelerate-only loops never need it).
    if name == "EvalTrainerCallback":
        return _trainer_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
