"""The transformers adapter of the periodic-evaluation callbacks: ``EvalTrainerCallback``.

Built on first use (``trainer_callback_class()``), so importing rewardkit never imports transformers.
This module imports no other rewardkit module: ``periodic_eval.EvalCallback.as_trainer_callback`` and
``callbacks.EvalTrainerCallback`` reach it, never the other way round (no import cycle).

Hooks (``transformers/trainer_callback.py``: callbacks run on every rank):

* ``on_step_end``: evaluate when ``evaluation.should_evaluate(state.global_step)``; log with
  ``trainer.log`` (``state.log_history`` and every ``report_to`` integration; keys added in
  ``on_evaluate`` would not be logged, ``Trainer.evaluate`` logs before calling it), keeping
  ``control.should_log`` as it was so the step's training entry is still written; set
  ``control.should_training_stop`` when the evaluation's alarm fired with ``stop_on_alarm=True``.
* ``on_log``: record ``logs[train_reward_key]`` (TRL's ``"reward"``) as the optimised reward for the alarm.
  The Trainer logs after ``on_step_end``, so an evaluation at step ``k`` sees the rewards logged up to
  step ``k - 1``.
* ``on_save`` / ``on_train_begin``: the evaluation's ``state_dict()`` is written to
  ``<checkpoint>/<EVAL_STATE_FILE prefix>-<prefix>.pt`` by the main process and read back by every rank
  when training starts at a step that has a checkpoint folder (``trainer.train(resume_from_checkpoint=...)``),
  so a resumed run keeps its frozen FID reference, its alarm history and its last evaluated step.
"""

from __future__ import annotations

import logging
import os
from typing import Any

__all__ = ["EVAL_STATE_FILE", "trainer_callback_class"]

logger = logging.getLogger(__name__)

EVAL_STATE_FILE = "rewardkit_eval"  # <checkpoint-N>/rewardkit_eval-<prefix>.pt
CHECKPOINT_PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR


def _build() -> type:
    import torch
    from transformers import TrainerCallback

    class EvalTrainerCallback(TrainerCallback):
        """``transformers.TrainerCallback`` running an ``EvalCallback`` in ``on_step_end``.

        Args:
            evaluation: A ``FIDEvalCallback`` / ``RewardEvalCallback``.
            trainer: The trainer, for ``trainer.accelerator`` and ``trainer.log`` (values reach
                ``state.log_history`` and every ``report_to`` integration). Without it the values are
                appended to ``state.log_history`` only and the default process group is used.
            train_reward_key: A log key holding the optimised reward, recorded for the alarm.
        """

        def __init__(self, evaluation: Any, trainer: Any = None, train_reward_key: str | None = None) -> None:
            self.evaluation, self.trainer, self.train_reward_key = evaluation, trainer, train_reward_key

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
            if not self.evaluation.should_evaluate(state.global_step):
                return control
            accelerator = getattr(self.trainer, "accelerator", None)
            values = self.evaluation.evaluate(accelerator, step=state.global_step, model=model, log=False)
            if self.trainer is not None:
                # Trainer.log -> CallbackHandler.on_log clears control.should_log, which would drop this
                # step's own training log entry (its loss then folds into the next one): keep the flag.
                should_log = control.should_log
                self.trainer.log(dict(values))
                control.should_log = should_log
            else:
                logger.warning("EvalTrainerCallback without trainer=: values go to state.log_history only, not "
                               "to report_to integrations; pass trainer=trainer to log through Trainer.log")
                state.log_history.append({**values, "step": state.global_step})
            if self.evaluation.should_stop:
                control.should_training_stop = True
            return control

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> Any:
            if self.train_reward_key is not None and logs and self.train_reward_key in logs:
                self.evaluation.record_train_reward(float(logs[self.train_reward_key]))
            return control

        def _state_path(self, args: Any, step: int) -> str:
            name = f"{EVAL_STATE_FILE}-{self.evaluation.prefix or 'root'}.pt"
            return os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}-{step}", name)

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            path = self._state_path(args, state.global_step)
            if state.is_world_process_zero and os.path.isdir(os.path.dirname(path)):
                torch.save(self.evaluation.state_dict(), path)
            return control

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            path = self._state_path(args, state.global_step)
            if state.global_step > 0 and os.path.isfile(path):
                self.evaluation.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
                logger.info("EvalTrainerCallback: resumed the evaluation state from %s", path)
            return control

    EvalTrainerCallback.__module__, EvalTrainerCallback.__qualname__ = __name__, "EvalTrainerCallback"
    return EvalTrainerCallback


_CLASS: list[type] = []  # the class, built once


def trainer_callback_class() -> type:
    """``EvalTrainerCallback`` (a ``transformers.TrainerCallback`` subclass), built on first call."""
    if not _CLASS:
        _CLASS.append(_build())
    return _CLASS[0]


def __getattr__(name: str) -> Any:
    if name == "EvalTrainerCallback":
        return trainer_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
