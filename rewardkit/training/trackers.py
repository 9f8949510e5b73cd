"""Per-prompt reward statistics with history: the ``PerPromptStatTracker`` of ddpo-pytorch / trl 0.23 and of flow_grpo.

One class, two upstream styles, reproduced exactly (float64 numpy, as flow_grpo; ddpo-pytorch computes in
the dtype of the rewards it is given):

* ``style="ddpo"`` -- kvablack/ddpo-pytorch ``ddpo_pytorch/stat_tracking.py`` (commit 1ce0994, unchanged
  at HEAD 1958463) and its copy in trl 0.23.1 ``trl/trainer/utils.py`` (``PerPromptStatTracker``, used by
  ``DDPOTrainer`` when ``per_prompt_stat_tracking=True``). Each prompt keeps a deque of its last
  ``buffer_size`` rewards, **across updates** (never cleared). An update first appends the batch's rewards
  of the prompt, then: if the deque holds fewer than ``min_count`` rewards, the prompt's advantages use the
  mean and std of the **whole current batch** (every prompt); otherwise the mean and std of the deque.
  ``advantage = (r - mean) / (std + 1e-6)``, numpy population std. Defaults 16 / 16 (ddpo-pytorch
  ``config/base.py``, trl ``DDPOConfig.per_prompt_stat_tracking_buffer_size`` / ``_min_count``).
* ``style="flow_grpo"`` -- yifan123/flow_grpo ``flow_grpo/stat_tracking.py`` (HEAD ac4c86e; ``type='grpo'``).
  Each prompt keeps every reward until ``clear()``; the mean is over that history, the std over that
  history too or, with ``global_std=True``, over **all rewards of the current update** (every prompt).
  ``advantage = (r - mean) / (std + 1e-4)``, population std. flow_grpo's ``scripts/train_sd3.py`` calls
  ``clear()`` after every epoch's update, so there the history is one gathered batch; upstream turns the
  history into an ndarray during ``update`` and raises if a prompt comes back before ``clear()``. Here
  the history stays a list, so it spans updates until ``clear()``; with a ``clear()`` after each update
  the results are upstream's.

Distributed use: upstream calls ``update`` with the rewards and prompts gathered from every process, on
every process, and each process keeps its slice. ``update`` here does the same: it gathers (rank order,
uneven batches padded) unless ``gathered=True``, updates the identical state on every rank, and returns
this rank's rows. The state therefore stays identical on all ranks, and a checkpoint written by the main
process (``rewardkit.recipe_support.checkpoint.save_checkpoint``, entry ``tracker.pt``) resumes every rank.

Not upstream: NaN rewards ("not applicable") are never stored, are left out of every statistic (also the
batch ones), and get a NaN advantage; upstream has no NaN policy (a NaN poisons its statistics).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Literal, Sequence

import numpy as np
import torch

from rewardkit.training.advantages import gather_rows

__all__ = ["DDPO_BUFFER_SIZE", "DDPO_EPS", "DDPO_MIN_COUNT", "FLOW_GRPO_EPS", "TRACKER_STYLES", "PerPromptStatTracker",
           "tracker_for"]

Style = Literal["ddpo", "flow_grpo"]
TRACKER_STYLES = ("ddpo", "flow_grpo")
DDPO_BUFFER_SIZE = 16  # ddpo-pytorch config/base.py per_prompt_stat_tracking.buffer_size; trl 0.23 DDPOConfig
DDPO_MIN_COUNT = 16  # ddpo-pytorch config/base.py per_prompt_stat_tracking.min_count; trl 0.23 DDPOConfig
DDPO_EPS = 1e-6  # ddpo-pytorch stat_tracking.py: np.std(...) + 1e-6
FLOW_GRPO_EPS = 1e-4  # flow_grpo stat_tracking.py: np.std(...) + 1e-4


class PerPromptStatTracker:
    """Per-prompt advantages with a reward history (see the module docstring for each style's exact rule).

    Args:
        style: ``"ddpo"`` (ddpo-pytorch / trl 0.23) or ``"flow_grpo"``.
        buffer_size: ddpo only; rewards kept per prompt (default 16).
        min_count: ddpo only; below this many stored rewards the batch statistics are used (default 16).
        global_std: flow_grpo only; divide by the std of the whole current update instead of the prompt's.
        eps: added to the std; default 1e-6 (ddpo) or 1e-4 (flow_grpo), as upstream.

    Raises:
        ValueError: an unknown style, an option of the other style, or a non-positive size.
    """

    def __init__(self, style: Style = "ddpo", *, buffer_size: int | None = None, min_count: int | None = None,
                 global_std: bool = False, eps: float | None = None) -> None:
        if style not in TRACKER_STYLES:
            raise ValueError(f"PerPromptStatTracker: style must be one of {TRACKER_STYLES}, got {style!r}")
        if style == "flow_grpo" and (buffer_size is not None or min_count is not None):
            raise ValueError("PerPromptStatTracker: buffer_size / min_count are ddpo options; flow_grpo keeps every "
                             "reward of a prompt until clear(). Drop them or use style='ddpo'")
        if style == "ddpo" and global_std:
            raise ValueError("PerPromptStatTracker: global_std is a flow_grpo option (ddpo uses the batch std only "
                             "below min_count); use style='flow_grpo' or drop global_std")
        self.style = style
        self.buffer_size = (DDPO_BUFFER_SIZE if buffer_size is None else int(buffer_size)) if style == "ddpo" else None
        self.min_count = (DDPO_MIN_COUNT if min_count is None else int(min_count)) if style == "ddpo" else None
        if style == "ddpo" and (self.buffer_size < 1 or self.min_count < 0):
            raise ValueError(f"PerPromptStatTracker: need buffer_size >= 1 and min_count >= 0, got "
                             f"{self.buffer_size} and {self.min_count}")
        self.global_std = bool(global_std)
        self.eps = float(eps) if eps is not None else (DDPO_EPS if style == "ddpo" else FLOW_GRPO_EPS)
        self._history: dict[str, deque | list] = {}
        self._seen: set[str] = set()

    # ------------------------------------------------------------------------------------------------
    def _store(self, prompt: str) -> deque | list:
        if prompt not in self._history:
            self._history[prompt] = deque(maxlen=self.buffer_size) if self.style == "ddpo" else []
        return self._history[prompt]

    def _advantages(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        """The upstream update on the whole batch (float64 ``(N,)``), NaN rows excluded."""
        finite = np.isfinite(rewards)
        batch = rewards[finite]
        advantages = np.full_like(rewards, np.nan)
        prompt_array = np.array(prompts, dtype=object)
        # Upstream appends every prompt's rewards first (flow_grpo) or just before using them (ddpo): the
        # same thing, as each prompt only reads its own history.
        rows_of = {prompt: np.flatnonzero((prompt_array == prompt) & finite) for prompt in dict.fromkeys(prompts)}
        for prompt, rows in rows_of.items():
            self._store(prompt).extend(rewards[rows].tolist())
            self._seen.add(prompt)
        for prompt, rows in rows_of.items():
            if rows.size == 0:
                continue
            history = np.asarray(self._history[prompt], dtype=np.float64)
            if self.style == "ddpo" and len(history) < self.min_count:
                mean, std = np.mean(batch), np.std(batch)
            else:
                mean = np.mean(history)
                std = np.std(batch) if self.global_std else np.std(history)
            advantages[rows] = (rewards[rows] - mean) / (std + self.eps)
        return advantages

    def update(self, prompts: Sequence[str], rewards: torch.Tensor | np.ndarray | Sequence[float], *,
               gathered: bool = False) -> torch.Tensor:
        """Add a batch to the history and return its advantages.

        Args:
            prompts: the ``B`` prompts of this rank's rows (equal strings form a group).
            rewards: float ``(B,)`` rewards (tensor, numpy array or list); NaN = not applicable.
            gathered: ``True`` when ``prompts`` / ``rewards`` already hold every rank's rows (as upstream
                calls it): no collective, all rows returned. ``False`` gathers across ranks first.

        Returns:
            ``(B,)`` advantages of this rank's rows (all rows when ``gathered``), float64 unless ``rewards``
            is a floating tensor (then its dtype), on the rewards' device; NaN where the reward is NaN.

        Raises:
            TypeError: a prompt that is not a string. ValueError: rewards not ``(B,)`` for ``B`` prompts.
        """
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("PerPromptStatTracker.update: prompts must be strings (the group keys), got "
                            f"{sorted({type(p).__name__ for p in prompts})}")
        is_tensor = isinstance(rewards, torch.Tensor)
        values = rewards.detach().to(torch.float64) if is_tensor else torch.as_tensor(np.asarray(rewards, np.float64))
        if values.ndim != 1 or values.shape[0] != len(prompts):
            raise ValueError(f"PerPromptStatTracker.update: expected rewards (B,) for B={len(prompts)} prompts, got "
                             f"shape {tuple(values.shape)}; pass one reward per prompt")
        all_values, all_prompts, offset = (values, prompts, 0) if gathered else gather_rows(values, prompts)
        advantages = torch.from_numpy(self._advantages(all_prompts, all_values.cpu().numpy()))
        mine = advantages if gathered else advantages[offset: offset + values.shape[0]]
        if is_tensor:
            return mine.to(device=rewards.device, dtype=rewards.dtype if rewards.is_floating_point() else torch.float64)
        return mine

    def clear(self) -> None:
        """Forget every stored reward (flow_grpo calls this after each epoch); ``num_prompts_seen`` stays."""
        self._history = {}

    # ------------------------------------------------------------------------------------------------
    @property
    def num_prompts_seen(self) -> int:
        """Distinct prompts ever updated (flow_grpo's ``trained_prompt_num``; survives ``clear()``)."""
        return len(self._seen)

    def get_stats(self) -> dict[str, dict[str, float]]:
        """``{prompt: {"mean", "std", "count"}}`` of the stored rewards (ddpo-pytorch's ``get_stats`` layout)."""
        return {prompt: {"mean": float(np.mean(v)) if len(v) else float("nan"),
                         "std": float(np.std(v)) if len(v) else float("nan"), "count": len(v)}
                for prompt, v in self._history.items()}

    def _options(self) -> dict[str, Any]:
        return {"style": self.style, "buffer_size": self.buffer_size, "min_count": self.min_count,
                "global_std": self.global_std, "eps": self.eps}

    def state_dict(self) -> dict[str, Any]:
        """Options, every prompt's stored rewards (float64 tensors, oldest first) and the seen prompts.

        Only plain types and tensors, so ``torch.load(weights_only=True)`` reads it back.
        """
        prompts = list(self._history)
        return {**self._options(), "prompts": prompts,
                "history": [torch.tensor(list(self._history[p]), dtype=torch.float64) for p in prompts],
                "seen": sorted(self._seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; the options must equal this tracker's (no silent change of rule).

        Raises:
            ValueError: missing keys, or options that differ from this tracker's.
        """
        missing = sorted({"prompts", "history", "seen", *self._options()} - set(state))
        if missing:
            raise ValueError(f"PerPromptStatTracker.load_state_dict: missing keys {missing}; pass a state_dict() "
                             "of a PerPromptStatTracker")
        saved = {key: state[key] for key in self._options()}
        if saved != self._options():
            raise ValueError(f"PerPromptStatTracker.load_state_dict: saved options {saved} differ from this "
                             f"tracker's {self._options()}; build the tracker with the saved options")
        self._history = {}
        for prompt, values in zip(state["prompts"], state["history"]):
            self._store(prompt).extend(torch.as_tensor(values, dtype=torch.float64).tolist())
        self._seen = set(state["seen"])

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self._options().items() if v is not None)
        return f"PerPromptStatTracker({options}, prompts={len(self._history)})"


def tracker_for(style: str, std: str, *, buffer_size: int | None = None,
                min_count: int | None = None) -> PerPromptStatTracker | None:
    """The recipes' ``advantage_tracker`` / ``advantage_std`` config pair -> a tracker (``None`` = stateless).

    Args:
        style: ``"ddpo"``, ``"flow_grpo"`` or ``"none"`` (stateless ``per_prompt_advantages``).
        std: ``"group"`` / ``"global"`` / ``"none"``; ``ddpo`` needs ``"group"`` (its rule has no other),
            ``flow_grpo`` takes ``"group"`` or ``"global"`` (its ``global_std``).
        buffer_size, min_count: ddpo only (defaults 16 / 16).

    Raises:
        ValueError: an unknown style, or a std the style cannot do.
    """
    if style == "none":
        return None
    if style == "ddpo" and std != "group":
        raise ValueError(f"config: advantage_tracker 'ddpo' divides by the per-prompt (or batch) std as ddpo-pytorch; "
                         f"advantage_std must be 'group', got {std!r} (or use advantage_tracker 'flow_grpo' / 'none')")
    if style == "flow_grpo" and std not in ("group", "global"):
        raise ValueError(f"config: advantage_tracker 'flow_grpo' needs advantage_std 'group' or 'global' (its "
                         f"global_std), got {std!r}; use advantage_tracker 'none' for mean-centring only")
    if style not in TRACKER_STYLES:
        raise ValueError(f"config: advantage_tracker must be 'ddpo', 'flow_grpo' or 'none', got {style!r}")
    if style == "ddpo":
        return PerPromptStatTracker("ddpo", buffer_size=buffer_size, min_count=min_count)
    return PerPromptStatTracker("flow_grpo", global_std=std == "global")
