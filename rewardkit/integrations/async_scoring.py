"""Score rewards on a thread pool so that scoring overlaps sampling ("submit now, result later").

The pattern of the DDPO-family loops (reference/rl_integration.md §2.1-2.2, §5.4): ddpo-pytorch
(``kvablack/ddpo-pytorch`` ``scripts/train.py``) and flow_grpo submit ``reward_fn(images, prompts,
metadata)`` to a ``concurrent.futures.ThreadPoolExecutor`` right after sampling a batch, sample the next
batch, and call ``.result()`` later; trl <= 0.23 does the same with ``async_reward_computation=True``.
``AsyncRewardScorer`` is that executor with the reward-side details settled:

* images are detached in ``submit`` (the sampling graph is not kept alive by the queue) and moved to the
  scoring device inside the worker; scores come back on the images' original device;
* scoring runs under ``torch.inference_mode()`` and the scores are then cloned into ordinary tensors,
  so they can enter later autograd computations (advantages x log-probs) without the "inference
  tensors cannot be saved for backward" error;
* exceptions raised by the reward surface on ``future.result()``; ``map`` yields in submission order.

Thread safety, threads and order:

* One reward instance per worker thread: rewards keep per-instance state (the CLIP prompt-embedding
  cache is a plain ``OrderedDict``), so ``max_workers > 1`` needs a list of instances, one each, unless
  the reward is marked ``thread_safe`` (an ``rk.compose(...)``): then one instance serves every worker.
* Results never depend on the number of workers or on which job finishes first (the concurrency rule of
  ``rewardkit.compose``): for a reward with ``reserve()`` (a composition), ``submit`` reserves the job's
  place in the call order in the caller's thread, so a z-score composition folds batches into its
  statistics in submission order, as a sequential loop would, on every rank. A cancelled job gives its
  place up. Stateful rewards (``stateful``, a z-score composition) must be one shared instance: several
  instances would each keep their own statistics, so they are refused.
* Do not use the same instance elsewhere (e.g. ``reward_loss(..., checkpoint=True)``) while it is being
  scored here. Do not modify submitted images in place until their future is done (or pass
  ``clone_inputs=True``).
* Torch kernels release the GIL, so the worker really runs beside the sampling thread. On CPU both
  share the cores: ``num_threads`` sets the worker's intra-op thread count (OpenMP's count is per
  thread: measured with torch 2.14, the caller's ``torch.get_num_threads()`` is unchanged), e.g. one
  thread each on a 2-core machine.
* CUDA (not verified here, no GPU): the worker uses its thread's current stream, the default stream,
  which orders after the sampling kernels only if sampling also ran on the default stream; synchronise
  first when sampling on a side stream.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable, Iterator, Sequence

import torch

from rewardkit.compose_state import submit_in_call_order
from rewardkit.protocols import RewardOutput

__all__ = ["AsyncRewardScorer"]

THREAD_NAME_PREFIX = "rewardkit-scorer"


class AsyncRewardScorer:
    """A thread pool that scores batches with a reward while the caller keeps sampling.

    Example:
        >>> with AsyncRewardScorer(reward) as scorer:
        ...     pending = []
        ...     for prompts in prompt_batches:
        ...         images = generate(prompts)              # sampling continues ...
        ...         pending.append(scorer.submit(images, prompts))  # ... while this batch is scored
        ...     rewards = [future.result() for future in pending]

    Args:
        reward: a RewardFn, or a sequence of RewardFn instances, one per worker thread; one ``thread_safe``
            reward (``rk.compose(...)``) may serve any number of workers.
        max_workers: worker threads; default = the number of instances given (required value unless the
            reward is ``thread_safe``).
        device: where images are scored; ``None`` -> the reward's device (its first parameter's) when it
            has parameters, else wherever the images are.
        clone_inputs: clone images in ``submit`` (the caller may then overwrite its buffer at once).
        num_threads: intra-op threads of each worker (``torch.set_num_threads`` in the worker); ``None``
            leaves the process default.
    """

    def __init__(
        self,
        reward: Any,
        max_workers: int | None = None,
        device: torch.device | str | None = None,
        *,
        clone_inputs: bool = False,
        num_threads: int | None = None,
    ) -> None:
        rewards = list(reward) if isinstance(reward, (list, tuple)) else [reward]
        workers = len(rewards) if max_workers is None else int(max_workers)
        if workers < 1:
            raise ValueError(f"AsyncRewardScorer: max_workers must be >= 1, got {max_workers}")
        if len(rewards) > 1 and any(getattr(item, "stateful", False) for item in rewards):
            raise ValueError("AsyncRewardScorer: stateful rewards (z-score compositions) keep one set of statistics; "
                             f"pass one shared instance, AsyncRewardScorer(reward, max_workers={workers})")
        # A thread-safe reward (rk.compose) serves every worker; others need one instance per worker.
        self._shared = len(rewards) == 1 and bool(getattr(rewards[0], "thread_safe", False))
        if len(rewards) != workers and not self._shared:
            raise ValueError(
                f"AsyncRewardScorer: {workers} workers need {workers} reward instances (rewards are not "
                f"thread-safe), got {len(rewards)}; pass AsyncRewardScorer([rk.load(name) for _ in range({workers})])"
            )
        for item in rewards:
            if not callable(item):
                raise TypeError(f"AsyncRewardScorer: expected RewardFn instances, got {type(item).__name__}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"AsyncRewardScorer: num_threads must be >= 1 or None, got {num_threads}")
        self.rewards = rewards
        self.device = torch.device(device) if device is not None else None
        self.clone_inputs = clone_inputs
        self.num_threads = num_threads
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for item in rewards:
            self._free.put(item)
        self._local = threading.local()
        self._submit_lock = threading.Lock()
        self._closed = False
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=THREAD_NAME_PREFIX, initializer=self._claim)

    @property
    def name(self) -> str:
        return getattr(self.rewards[0], "name", type(self.rewards[0]).__name__)

    def _claim(self) -> None:
        """Worker initializer: take one reward instance for this thread for its lifetime."""
        self._local.reward = self.rewards[0] if self._shared else self._free.get_nowait()
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)

    def _target(self, reward: Any, images: torch.Tensor) -> torch.device:
        if self.device is not None:
            return self.device
        if isinstance(reward, torch.nn.Module):
            first = next(reward.parameters(), None)
            if first is not None:
                return first.device
        return images.device

    def _score(self, images: torch.Tensor, prompts: Any, context: dict, details: bool, ticket: Any = None) -> Any:
        if ticket is not None:
            context = {**context, "ticket": ticket}
        reward = self._local.reward
        with torch.inference_mode():
            moved = images.to(self._target(reward, images))
            if details:
                out = reward.evaluate(moved, prompts, **context)
            else:
                out = RewardOutput(reward(moved, prompts, **context))
        # Outside inference mode: clones are ordinary tensors, usable in later autograd computations.
        scores = out.scores.to(images.device).clone()
        if not details:
            return scores
        extra = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in out.details.items()}
        return RewardOutput(scores, extra)

    def _submit(self, images: torch.Tensor, prompts: Any, context: dict, details: bool) -> Future:
        if self._closed:
            raise RuntimeError(f"AsyncRewardScorer({self.name}): submit after shutdown; create a new scorer")
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"AsyncRewardScorer({self.name}): images must be a float tensor (B, 3, H, W) in [0, 1], "
                            f"got {type(images).__name__}; convert with rewardkit.image_io.to_tensor(...)")
        images = images.detach()
        if self.clone_inputs:
            images = images.clone()
        reward = self.rewards[0] if len(self.rewards) == 1 else None  # several instances: no shared call order
        # Reserve and queue atomically: the place in the call order is the place in the queue (callers on
        # several threads could otherwise queue a later ticket before an earlier one, and one worker deadlock).
        with self._submit_lock:
            future = submit_in_call_order(self._executor, reward, self._score, images, prompts, dict(context), details)
        return future

    def submit(self, images: torch.Tensor, prompts: str | Sequence[str] | None = None, **context: Any) -> Future:
        """Queue one batch; returns at once.

        Args:
            images: float ``(B, 3, H, W)`` in ``[0, 1]``; detached here (never backpropagated).
            prompts: as for the reward: one string, ``B`` strings, or ``None``.
            **context: forwarded to the reward (e.g. ``reference=`` images).

        Returns:
            ``Future`` of float32 scores ``(B,)`` on ``images.device``; ``.result()`` re-raises the
            reward's exception.
        """
        return self._submit(images, list(prompts) if isinstance(prompts, tuple) else prompts, context, False)

    def submit_evaluate(self, images: torch.Tensor, prompts: str | Sequence[str] | None = None,
                        **context: Any) -> Future:
        """Like ``submit`` but the future holds ``reward.evaluate(...)``'s ``RewardOutput`` (scores + details)."""
        return self._submit(images, list(prompts) if isinstance(prompts, tuple) else prompts, context, True)

    def map(self, images: Iterable[torch.Tensor], prompts: Iterable[Any] | None = None,
            **context: Any) -> Iterator[torch.Tensor]:
        """Submit every batch now (like ``Executor.map``); yield their scores in submission order.

        Args:
            images: batches ``(B_i, 3, H, W)``.
            prompts: one prompt entry per batch (a string, a list of ``B_i`` strings or ``None``), or
                ``None`` for prompt-free rewards.
        """
        batches = list(images)
        prompt_list = [None] * len(batches) if prompts is None else list(prompts)
        if len(prompt_list) != len(batches):
            raise ValueError(f"AsyncRewardScorer.map: {len(batches)} image batches but {len(prompt_list)} prompt "
                             "entries; give one prompt entry (a string or a list of strings) per batch")
        futures = [self.submit(batch, entry, **context) for batch, entry in zip(batches, prompt_list)]

        def results() -> Iterator[torch.Tensor]:
            for future in futures:
                yield future.result()

        return results()

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Stop accepting work; ``wait`` for running jobs; ``cancel_futures`` drops queued ones."""
        self._closed = True
        self._executor.shutdown(wait=wait, cancel_futures=cancel_futures)

    def __enter__(self) -> AsyncRewardScorer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown(wait=True)

    def __repr__(self) -> str:
        return (f"AsyncRewardScorer({self.name}, workers={len(self.rewards)}, device={self.device}, "
                f"closed={self._closed})")
