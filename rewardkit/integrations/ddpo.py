"""The DDPO reward-function contract: ``fn(images, prompts, metadata) -> (rewards, info)``.

Callers (reference/rl_integration.md §1.2, §2):

* ddpo-pytorch (``kvablack/ddpo-pytorch`` ``scripts/train.py``) submits ``reward_fn(images, prompts,
  prompt_metadata)`` to a ``ThreadPoolExecutor(max_workers=2)`` and calls ``.result()`` on the future;
  ``rewards`` may be a tensor or a numpy array, ``info`` a dict.
* trl <= 0.23 ``DDPOTrainer.compute_rewards`` (0.23.1 ``trl/trainer/ddpo_trainer.py``) unpacks
  ``reward, reward_metadata = reward_fn(...)`` and calls ``torch.as_tensor(reward, device=...)``; with
  ``async_reward_computation=True`` it maps the function over batches on its executor and calls ``.result()``
  on *both* returned values, so the function itself must return futures: ``as_ddpo_reward(reward,
  executor=...)``. Both paths train trl 0.23's DDPOTrainer in ``tests/legacy_trl023``.

``images``: float ``(B, 3, H, W)`` in ``[0, 1]`` (the pipelines' ``output_type="pt"``; fp16 under trl's fp16
mixed precision); ``prompts``: a tuple or list of ``B`` strings; ``metadata``: a tuple of ``B`` dicts, accepted
for the contract and not used (no rewardkit reward takes per-row metadata).

NaN policy: both trainers z-score the rewards (per prompt or per batch) with numpy means, so one NaN row turns
the advantages of its whole group into NaN. A row the reward could not score therefore raises ``ValueError``
(with the reward's reason) unless ``nan_value=x`` is given, which replaces it by ``x`` and lists it in
``info["failures"]`` (``{row: reason}``).

Threads: ddpo-pytorch and trl call the function from thread pools; rewards keep per-instance caches, so calls
score one at a time (``serialize=True``; ``False`` for thread-safe rewards). A reward that declares
``thread_safe`` (a composition: per-part locks, ticketed statistics) is never serialized here, and with an
executor its place in a z-score composition's call order is reserved in the *submitting* thread, so results
follow submission order whatever order the workers run in (the concurrency rule, docs/composition.md).
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import Executor, Future
from typing import Any, Mapping, Sequence

import torch

from rewardkit.compose_state import submit_in_call_order

__all__ = ["DDPORewardFn", "as_ddpo_reward", "row_failures"]


def row_failures(scores: torch.Tensor, details: Mapping[str, Any]) -> dict[int, str]:
    """``{row: reason}`` for the NaN rows of ``scores`` (B,), reasons from ``details["failure"]`` when given."""
    failure = details.get("failure")
    rows = torch.nonzero(torch.isnan(scores.detach())).flatten().tolist()
    return {row: str(failure[row]) if isinstance(failure, (list, tuple)) and failure[row] else
            "the reward returned NaN" for row in rows}


class DDPORewardFn:
    """A picklable callable with the DDPO contract around a RewardFn (see the module docstring).

    Scores are computed under ``torch.no_grad()`` (DDPO rewards are not backpropagated) and returned
    as a float32 tensor ``(B,)`` on the images' device; ``info`` holds every detail the reward reports
    (a composed reward's parts, a judge's answers) and, with ``nan_value``, the replaced rows.
    """

    def __init__(self, reward: Any, executor: Executor | None = None, nan_value: float | None = None,
                 serialize: bool = True) -> None:
        self.reward = reward
        self.executor = executor
        self.nan_value = nan_value
        self._lock = threading.Lock() if serialize and not getattr(reward, "thread_safe", False) else None
        self.__name__ = getattr(reward, "name", type(reward).__name__)

    def _evaluate(self, images: torch.Tensor, prompts: list[str] | None, ticket: Any = None) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            if hasattr(self.reward, "evaluate"):
                out = self.reward.evaluate(images, prompts, **({} if ticket is None else {"ticket": ticket}))
                return out.scores, dict(out.details)
            return self.reward(images, prompts), {}

    def _score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Any] | None,
               ticket: Any = None) -> tuple:
        prompt_list = list(prompts) if prompts is not None and not isinstance(prompts, str) else prompts
        if self._lock is None:
            scores, info = self._evaluate(images, prompt_list, ticket)
        else:
            with self._lock:
                scores, info = self._evaluate(images, prompt_list, ticket)
        failures = row_failures(scores, info)
        if failures and self.nan_value is None:
            raise ValueError(f"{self.__name__}: rows {sorted(failures)} could not be scored ({failures}); DDPO's "
                             "z-scored advantages would be NaN for their groups: fix the inputs or pass "
                             "as_ddpo_reward(..., nan_value=<float>)")
        if failures:
            scores = torch.where(torch.isnan(scores), torch.full_like(scores, self.nan_value), scores)
            info["failures"] = failures
        return scores, info

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Any] | None = None) -> tuple:
        if self.executor is None:
            return self._score(images, prompts, metadata)
        # the submitting thread reserves the call's place in a z-score composition's order (docs/composition.md)
        job = submit_in_call_order(self.executor, self.reward, self._score, images, prompts, metadata)
        rewards: Future = Future()
        info: Future = Future()

        def unpack(done: Future) -> None:
            error = done.exception()
            if error is not None:
                rewards.set_exception(error)
                info.set_exception(error)
            else:
                scores, details = done.result()
                rewards.set_result(scores)
                info.set_result(details)

        job.add_done_callback(unpack)
        return rewards, info

    def __getstate__(self) -> dict[str, Any]:
        # Executors and locks hold threads; a pickled copy (e.g. sent to a worker) scores synchronously.
        return {"reward": self.reward, "executor": None, "nan_value": self.nan_value,
                "serialize": self._lock is not None, "__name__": self.__name__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        serialize = state.pop("serialize", True)
        self.__dict__.update(state)
        self._lock = threading.Lock() if serialize and not getattr(self.reward, "thread_safe", False) else None


def as_ddpo_reward(reward: Any, executor: Executor | None = None, *, nan_value: float | None = None,
                   serialize: bool = True) -> DDPORewardFn:
    """Wrap ``reward`` (a RewardFn or registry name) for DDPO-style loops.

    Args:
        reward: a RewardFn instance, or a registry name loaded with ``rk.load(name)``.
        executor: ``None`` -> ``fn(...)`` returns ``(Tensor (B,), dict)`` (ddpo-pytorch, flow_grpo,
            trl's sync path). An executor -> ``fn(...)`` returns ``(Future[Tensor], Future[dict])``, what
            trl 0.23's ``async_reward_computation=True`` calls ``.result()`` on.
        nan_value: the reward of rows that could not be scored; ``None`` (default) raises instead.
        serialize: score calls from several threads one at a time (rewards keep per-instance caches).
    """
    if isinstance(reward, str):
        from rewardkit.registry import load

        reward = load(reward)
    if not callable(reward):
        raise TypeError(f"as_ddpo_reward: expected a RewardFn or a registry name, got {type(reward).__name__}")
    if nan_value is not None and not math.isfinite(float(nan_value)):
        raise ValueError(f"as_ddpo_reward: nan_value must be a finite float or None, got {nan_value!r}")
    return DDPORewardFn(reward, executor, None if nan_value is None else float(nan_value), serialize)
