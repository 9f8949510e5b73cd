"""The machinery shared by the periodic-evaluation callbacks (``rewardkit.integrations.callbacks``).

``EvalCallback`` holds a fixed prompt set with fixed seeds, decides when to evaluate, shards the
prompts over ranks (contiguous, uneven allowed, possibly empty: ``accelerate``'s
``split_between_processes`` convention), generates each rank's shard in batches, and isolates the
evaluation from training: ``torch.no_grad``, the given modules in eval mode with every submodule's mode
restored afterwards, and the Python, NumPy, CPU and CUDA RNG states restored. Subclasses add the
measurement (update locally, reduce collectively, reset). See ``callbacks.py`` for sources.

Concurrency: every collective (the subclass's reduction, then the alarm's training-reward sum) is
issued by the thread that calls ``evaluate``, in the same order on every rank, whatever other threads
do meanwhile (e.g. a reward thread pool scoring training batches); a reward that issues collectives
itself (a z-score composition) must have no call in flight then. The RNG states are process-global:
other threads must not draw from the global RNGs while an evaluation runs (seeded ``torch.Generator``s
are unaffected), or the restore at its end rewinds their draws.

Imports go one way: ``callbacks`` -> ``periodic_eval`` -> ``hacking_alarm``; ``eval_trainer`` imports none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from rewardkit.integrations.hacking_alarm import RewardHackingAlarm
from rewardkit.metrics.frechet import sync_sum

__all__ = ["EvalCallback", "GenerateFn", "shard_range", "rank_world", "DEFAULT_BATCH_SIZE", "DEFAULT_PREFIX"]

logger = logging.getLogger(__name__)

GenerateFn = Callable[[list[str], list[int]], torch.Tensor]
DEFAULT_BATCH_SIZE = 8  # images per generate_fn call on one rank
DEFAULT_PREFIX = "eval"


def shard_range(total: int, rank: int, world: int) -> range:
    """Indices of rank ``rank``'s contiguous shard: the first ``total % world`` ranks get one more
    (``accelerate``'s ``split_between_processes`` convention); a shard may be empty."""
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def rank_world(accelerator: Any) -> tuple[int, int]:
    if accelerator is not None:
        return int(accelerator.process_index), int(accelerator.num_processes)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _modules(model: Any) -> list[nn.Module]:
    if model is None:
        return []
    items = model.values() if isinstance(model, dict) else model if isinstance(model, (list, tuple)) else [model]
    return [item for item in items if isinstance(item, nn.Module)]


@contextmanager
def _isolated(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Eval mode + ``no_grad`` inside; every submodule's mode and the RNG states restored after.

    RNGs: Python, NumPy, torch CPU and, when CUDA is initialised, the current CUDA device's (each rank
    drives its own device; querying every device would create a context on each GPU from every rank).
    """
    import numpy

    modes = [(sub, sub.training) for module in modules for sub in module.modules()]
    python_state, numpy_state, torch_state = random.getstate(), numpy.random.get_state(), torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        for module in modules:
            module.eval()
        with torch.no_grad():
            yield
    finally:
        for sub, mode in modes:
            sub.training = mode
        random.setstate(python_state)
        torch.set_rng_state(torch_state)
        numpy.random.set_state(numpy_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state)


class EvalCallback:
    """Shared machinery: fixed prompts and seeds, sharded generation, schedule, isolation, logging, resume.

    Subclasses implement ``_update(images, prompts)`` (local), ``_reduce(accelerator) -> dict`` (every
    rank, collective), ``_reset()`` and ``_alarm_inputs(values)``; ``_prepare(accelerator)`` runs before
    generation.

    Args:
        prompts: The fixed evaluation prompts (``N >= 1``); repeat a prompt with other seeds for more images.
        every_n_steps: Evaluate when ``step % every_n_steps == 0``.
        generate_fn: ``generate_fn(prompts, seeds) -> (b, 3, H, W)`` float in ``[0, 1]``, one image per
            (prompt, seed); must not run collectives. Give this or ``pipeline``.
        pipeline: A diffusers text-to-image pipeline, run with ``rewardkit.integrations.generation.generate_images``
            (one ``torch.Generator`` per seed); its modules are put in eval mode during evaluation.
        seeds: One integer seed per prompt (default ``0..N-1``).
        batch_size: Images per ``generate_fn`` call on a rank.
        prefix: Log-key prefix (``"eval"`` -> ``eval/fid``).
        pipeline_kwargs: Extra ``generate_images`` arguments (``num_inference_steps``, ``height``, ...).
        alarm: A ``RewardHackingAlarm`` fed at every evaluation with the training reward recorded since
            the previous one (``record_train_reward``) and this evaluation's values.
        stop_on_alarm: When the alarm fires, set ``should_stop`` (the transformers adapter then sets
            ``control.should_training_stop``; an accelerate loop checks ``callback.should_stop``).
    """

    def __init__(self, prompts: Sequence[str], *, every_n_steps: int, generate_fn: GenerateFn | None = None,
                 pipeline: Any = None, seeds: Sequence[int] | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 prefix: str = DEFAULT_PREFIX, pipeline_kwargs: dict[str, Any] | None = None,
                 alarm: RewardHackingAlarm | None = None, stop_on_alarm: bool = False) -> None:
        name = type(self).__name__
        self.prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        self.seeds = list(range(len(self.prompts))) if seeds is None else [int(s) for s in seeds]
        if not self.prompts or len(self.seeds) != len(self.prompts):
            raise ValueError(f"{name}: need N >= 1 prompts and one seed per prompt, got {len(self.prompts)} prompts "
                             f"and {len(self.seeds)} seeds; omit seeds= for 0..N-1")
        if (generate_fn is None) == (pipeline is None):
            raise ValueError(f"{name}: pass exactly one of generate_fn=(prompts, seeds) -> images or pipeline=")
        if every_n_steps < 1 or batch_size < 1:
            raise ValueError(f"{name}: every_n_steps and batch_size must be >= 1, got {every_n_steps}, {batch_size}")
        if stop_on_alarm and alarm is None:
            raise ValueError(f"{name}: stop_on_alarm=True needs alarm=RewardHackingAlarm(window=...)")
        self.every_n_steps, self.batch_size, self.prefix = int(every_n_steps), int(batch_size), prefix
        self.generate_fn, self.pipeline = generate_fn, pipeline
        self.pipeline_kwargs = dict(pipeline_kwargs or {})
        self.alarm, self.stop_on_alarm = alarm, bool(stop_on_alarm)
        self.last_step: int | None = None
        self.should_stop = False  # set once the alarm fired with stop_on_alarm (same step on every rank)
        self._shard = range(0)  # this rank's prompt indices during an evaluation
        self._train_lock = threading.Lock()  # record_train_reward may be called from reward threads
        self._train_sums: list[float] = []  # per-record sums of finite training rewards (fsum: order-free)
        self._train_count = 0

    def should_evaluate(self, step: int) -> bool:
        """True when ``step`` is a multiple of ``every_n_steps`` and was not evaluated yet (gradient
        accumulation calls a loop body several times per optimizer step; a resumed run restores
        ``last_step`` with ``load_state_dict``)."""
        return step % self.every_n_steps == 0 and step != self.last_step

    def record_train_reward(self, rewards: float | Sequence[float] | torch.Tensor) -> None:
        """Record this rank's optimised (training) rewards for the alarm: one value or a batch ``(B,)``.

        Non-finite entries (NaN = not applicable) are left out. The alarm sees the mean over every rank's
        records since the previous evaluation (summed in ``evaluate``, so identical on every rank).
        """
        values = torch.as_tensor(rewards).detach().double().reshape(-1).cpu()
        values = values[torch.isfinite(values)]
        with self._train_lock:
            self._train_sums.append(math.fsum(values.tolist()))
            self._train_count += int(values.numel())

    def maybe_evaluate(self, step: int, accelerator: Any = None, model: Any = None) -> dict[str, float] | None:
        """Evaluate and log if ``should_evaluate(step)``; call on **every** rank at every step.

        Args:
            step: The global optimizer step.
            accelerator: An ``accelerate.Accelerator`` (sharding, reduction, ``accelerator.log``); ``None``
                uses the default ``torch.distributed`` group when initialised, else one process.
            model: Module(s) (one, a list or a dict) to switch to eval mode and restore afterwards.

        Returns:
            The logged values (identical on every rank), or ``None`` when not due.
        """
        if not self.should_evaluate(step):
            return None
        return self.evaluate(accelerator, step=step, model=model)

    def evaluate(self, accelerator: Any = None, *, step: int | None = None, model: Any = None,
                 log: bool = True) -> dict[str, float]:
        """Generate this rank's shard, update, reduce over ranks, compute, feed the alarm, log (if ``log``
        and an accelerator is given) and reset the generated side. Collective: every rank must call it."""
        rank, world = rank_world(accelerator)
        indices = shard_range(len(self.prompts), rank, world)
        modules = _modules(model) + (_modules(dict(self.pipeline.components)) if self.pipeline is not None else [])
        with _isolated(modules):
            try:
                self._shard = indices
                self._prepare(accelerator)
                for start in range(indices.start, indices.stop, self.batch_size):
                    chunk = range(start, min(start + self.batch_size, indices.stop))
                    prompts = [self.prompts[i] for i in chunk]
                    self._update(self._generate(prompts, [self.seeds[i] for i in chunk]), prompts)
                values = self._reduce(accelerator)
            finally:
                self._reset()
        if self.alarm is not None:
            values.update(self._observe(accelerator, step, values))
        self.last_step = step
        if log and accelerator is not None:
            accelerator.log(values, step=step)
        logger.debug("%s at step %s: %s", type(self).__name__, step, values)
        return values

    def _observe(self, accelerator: Any, step: int | None, values: dict[str, float]) -> dict[str, float]:
        """Sum the training rewards over ranks (one collective), feed the alarm, return its log values."""
        with self._train_lock:
            local = torch.tensor([float(self._train_count), math.fsum(self._train_sums)], dtype=torch.float64)
            self._train_sums, self._train_count = [], 0
        count, total = sync_sum(local, accelerator).tolist()
        train = total / count if count else math.nan
        evaluated, orientation = self._alarm_inputs(values)
        fired = self.alarm.observe(step, train, evaluated, orientation)
        if fired:
            warnings.warn(f"{type(self).__name__}: possible reward hacking at step {step}: the training reward rose "
                          f"over the last {self.alarm.window} evaluations while {fired} worsened"
                          + ("; stopping (stop_on_alarm=True)" if self.stop_on_alarm else ""), stacklevel=3)
            self.should_stop = self.should_stop or self.stop_on_alarm
        return {self._key("train_reward"): train, self._key("hacking_alarm"): float(bool(fired))}

    def as_trainer_callback(self, trainer: Any = None, *, train_reward_key: str | None = None) -> Any:
        """This evaluation as a ``transformers.TrainerCallback`` (``EvalTrainerCallback``).

        Args:
            trainer: The trainer (``trainer.accelerator``, ``trainer.log``); see ``EvalTrainerCallback``.
            train_reward_key: A key of the trainer's logs holding the optimised reward (TRL's ``"reward"``),
                recorded for the alarm at every ``on_log``.
        """
        from rewardkit.integrations.eval_trainer import trainer_callback_class

        return trainer_callback_class()(self, trainer=trainer, train_reward_key=train_reward_key)

    # -- resume ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs (plain Python and tensors: ``torch.load(weights_only=True)``-safe)."""
        with self._train_lock:
            train = [float(self._train_count), math.fsum(self._train_sums)]
        return {"kind": type(self).__name__, "prompts_sha256": self._prompts_digest(), "last_step": self.last_step,
                "should_stop": self.should_stop, "train_reward": train,
                "alarm": None if self.alarm is None else self.alarm.state_dict(), **self._extra_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()`` into a callback built with the same prompts, seeds and alarm setting."""
        name = type(self).__name__
        if state.get("kind") != name or state.get("prompts_sha256") != self._prompts_digest():
            raise ValueError(f"{name}: the saved state belongs to a {state.get('kind')} with other prompts/seeds; "
                             "build the callback with the run's prompts and seeds before load_state_dict")
        if (state["alarm"] is None) != (self.alarm is None):
            raise ValueError(f"{name}: the saved state {'has' if state['alarm'] is not None else 'has no'} alarm "
                             "history; build the callback with the same alarm= setting as the saved run")
        self.last_step = None if state["last_step"] is None else int(state["last_step"])
        self.should_stop = bool(state["should_stop"])
        count, total = state["train_reward"]
        with self._train_lock:
            self._train_sums, self._train_count = [float(total)], int(count)
        if self.alarm is not None:
            self.alarm.load_state_dict(state["alarm"])
        self._load_extra_state(state)

    def _prompts_digest(self) -> str:
        return hashlib.sha256(json.dumps([self.prompts, self.seeds]).encode()).hexdigest()

    def _extra_state(self) -> dict[str, Any]:  # hook: subclass state, restored by _load_extra_state
        return {}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        pass

    # -- generation and subclass hooks ----------------------------------------------------------------
    def _generate(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        if self.pipeline is not None:
            from rewardkit.integrations.generation import generate_images

            images = generate_images(self.pipeline, prompts, seeds, **self.pipeline_kwargs)
        else:
            images = self.generate_fn(prompts, seeds)
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[:2] != (len(prompts), 3):
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"{type(self).__name__}: generate_fn must return a float tensor ({len(prompts)}, 3, H, W) "
                             f"in [0, 1] (one image per prompt and seed), got {got}; for a diffusers pipeline "
                             "use output_type='pt'")
        return images

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _prepare(self, accelerator: Any) -> None:  # hook: every rank, before generation, isolated
        pass

    def _update(self, images: torch.Tensor, prompts: list[str]) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _reduce(self, accelerator: Any) -> dict[str, float]:  # pragma: no cover - interface
        raise NotImplementedError

    def _reset(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _alarm_inputs(self, values: dict[str, float]) -> tuple[dict[str, float], dict[str, bool]]:
        """``({key without prefix: value}, {key: higher_is_better})`` the alarm watches."""
        raise NotImplementedError  # pragma: no cover - interface
