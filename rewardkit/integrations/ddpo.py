"""The DDPO reward-function contract: ``fn(images, prompts, metadata) -> (rewards, info)``.

Callers (reference/rl_integration.md §1.2, §2):

* ddpo-pytorch (``kvablack/ddpo-pytorch`` ``scripts/train.py``) and flow_grpo submit
  ``reward_fn(images, prompts, prompt_metadata)`` to a thread pool and call ``.result()`` on the
  future; ``rewards`` may be a tensor or a numpy array, ``info`` a dict.
* trl <= 0.23 ``DDPOTrainer.compute_rewards`` unpacks ``reward, reward_metadata = reward_fn(...)`` and
  calls ``torch.as_tensor(reward, device=...)``; with ``async_reward_computation=True`` it maps the
  function over batches on its executor and calls ``.result()`` on *both* returned values, so the
  function itself must return futures: ``as_ddpo_reward(reward, executor=...)``.

``images``: float ``(B, 3, H, W)`` in ``[0, 1]`` (the pipelines' ``output_type="pt"``); ``prompts``: a
tuple or list of ``B`` strings; ``metadata``: a tuple of ``B`` dicts, accepted for the contract and not
used (no rewardkit reward takes per-row metadata yet).
"""

from __future__ import annotations

from concurrent.futures import Executor, Future
from typing import Any, Sequence

import torch

__all__ = ["DDPORewardFn", "as_ddpo_reward"]


class DDPORewardFn:
    """A picklable callable with the DDPO contract around a RewardFn (see the module docstring).

    Scores are computed under ``torch.no_grad()`` (DDPO rewards are not backpropagated) and returned
    as a float32 tensor ``(B,)`` on the images' device; ``info`` holds every detail the reward reports
    (a composed reward's parts, a judge's answers).
    """

    def __init__(self, reward: Any, executor: Executor | None = None) -> None:
        self.reward = reward
        self.executor = executor
        self.__name__ = getattr(reward, "name", type(reward).__name__)

    def _score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Any] | None) -> tuple:
        prompt_list = list(prompts) if prompts is not None else None
        with torch.no_grad():
            if hasattr(self.reward, "evaluate"):
                out = self.reward.evaluate(images, prompt_list)
                return out.scores, dict(out.details)
            return self.reward(images, prompt_list), {}

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Any] | None = None) -> tuple:
        if self.executor is None:
            return self._score(images, prompts, metadata)
        job = self.executor.submit(self._score, images, prompts, metadata)
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
        # Executors hold threads and locks; a pickled copy (e.g. sent to a worker) scores synchronously.
        return {"reward": self.reward, "executor": None, "__name__": self.__name__}


def as_ddpo_reward(reward: Any, executor: Executor | None = None) -> DDPORewardFn:
    """Wrap ``reward`` (a RewardFn or registry name) for DDPO-style loops.

    Args:
        reward: a RewardFn instance, or a registry name loaded with ``rk.load(name)``.
        executor: ``None`` -> ``fn(...)`` returns ``(Tensor (B,), dict)`` (ddpo-pytorch, flow_grpo,
            trl's sync path). An executor -> ``fn(...)`` returns ``(Future[Tensor], Future[dict])``, what
            trl 0.23's ``async_reward_computation=True`` calls ``.result()`` on.
    """
    if isinstance(reward, str):
        from rewardkit.registry import load

        reward = load(reward)
    if not callable(reward):
        raise TypeError(f"as_ddpo_reward: expected a RewardFn or a registry name, got {type(reward).__name__}")
    return DDPORewardFn(reward, executor)
