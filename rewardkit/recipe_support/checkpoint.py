"""Checkpoints of the ``recipes/``: LoRA weights, optimizer, reward normaliser, step and RNG states.

A checkpoint is a folder ``output_dir/checkpoints/checkpoint-<step>/`` holding one file per entry of
the ``state`` mapping a recipe passes in, plus the RNG states of every process and ``meta.json``
(written last, so a folder without it is an interrupted save and is never resumed from):

* a module carrying peft adapters (the LoRA denoiser): only the adapter weights,
  ``<name>.lora.safetensors`` (peft's ``get_peft_model_state_dict`` keys; the base model is not copied);
* a composed reward (``rk.compose``): only its normaliser state (z-score running statistics),
  ``<name>.pt``, not the reward models' weights;
* anything else with ``state_dict()`` (optimizer, LR scheduler, a plain module, the advantage tracker
  ``trackers.PerPromptStatTracker`` with its per-prompt reward history): ``<name>.pt``. The tracker's state
  is identical on every rank (each rank updates it with the same gathered rewards), so the main process's
  copy resumes all of them.

The evaluation callbacks (``callbacks=``: ``RewardEvalCallback`` / ``FIDEvalCallback``) are saved in
``callbacks.pt``: each one's ``state_dict()`` (last evaluated step, the hacking alarm's history, FID's
reference frozen at the first evaluation). Their values are reduced over ranks, so they agree everywhere,
except the training rewards recorded since the last evaluation, which are per rank: those are summed
over ranks when saving and restored on the main process only (the alarm sums them over ranks again).

Loading is strict: a missing file, a missing or unexpected LoRA key raise ``ValueError``; a checkpoint
written before callback states were saved (no ``callbacks.pt``) resumes with a warning and fresh callbacks.
Files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

import numpy
import torch

__all__ = ["CHECKPOINTS_FOLDER", "checkpoint_folder", "latest_checkpoint", "save_checkpoint", "resume"]

logger = logging.getLogger(__name__)

CHECKPOINTS_FOLDER = "checkpoints"
_PREFIX = "checkpoint-"
_META = "meta.json"
CALLBACKS_FILE = "callbacks.pt"


def checkpoint_folder(cfg: Any, step: int) -> Path:
    """``output_dir/checkpoints/checkpoint-<step>``."""
    return Path(cfg.output_dir) / CHECKPOINTS_FOLDER / f"{_PREFIX}{int(step)}"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint (with ``meta.json``) of the highest step under ``output_dir``, or ``None``."""
    root = Path(output_dir) / CHECKPOINTS_FOLDER
    found = [p for p in root.glob(f"{_PREFIX}*") if p.name[len(_PREFIX):].isdigit() and (p / _META).is_file()]
    return max(found, key=lambda p: int(p.name[len(_PREFIX):]), default=None)


def _unwrap(accelerator: Any, obj: Any) -> Any:
    return accelerator.unwrap_model(obj) if isinstance(obj, torch.nn.Module) else obj


def _kind(obj: Any) -> str:
    if isinstance(obj, torch.nn.Module) and getattr(obj, "peft_config", None):
        return "lora"
    if isinstance(getattr(obj, "stats", None), torch.nn.Module) and hasattr(obj, "part_names"):
        return "normaliser"
    if callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None)):
        return "state_dict"
    raise TypeError(f"checkpoint: cannot save a {type(obj).__name__}; entries need state_dict()/load_state_dict()")


def _file(folder: Path, name: str, kind: str) -> Path:
    return folder / (f"{name}.lora.safetensors" if kind == "lora" else f"{name}.pt")


def _rng_state() -> dict[str, Any]:
    name, keys, position, has_gauss, cached = numpy.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(numpy.int64)), position,
                                                    has_gauss, cached), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached = state["numpy"]
    numpy.random.set_state((name, keys.numpy().astype(numpy.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _callback_states(accelerator: Any, callbacks: Sequence[Any]) -> list[dict[str, Any]]:
    """Every callback's ``state_dict()`` with its pending training-reward ``[count, sum]`` summed over ranks
    (one collective; every rank calls)."""
    from rewardkit.metrics.frechet import sync_sum

    states = [callback.state_dict() for callback in callbacks]
    if states:
        pending = torch.tensor([state["train_reward"] for state in states], dtype=torch.float64)  # (n, 2)
        for state, total in zip(states, sync_sum(pending, accelerator).tolist()):
            state["train_reward"] = total
    return states


def save_checkpoint(accelerator: Any, cfg: Any, step: int, state: Mapping[str, Any],
                    callbacks: Sequence[Any] = ()) -> Path:
    """Save ``state`` at ``step``; call on every process (each writes its RNG state).

    Args:
        accelerator: the run's ``Accelerator``.
        cfg: the recipe config (``output_dir``).
        step: the optimizer step just completed.
        state: ``{name: object}``, e.g. ``{"denoiser": ..., "optimizer": ..., "reward": ...}``.
        callbacks: the evaluation callbacks, saved in ``callbacks.pt`` (``resume(..., callbacks=)``).

    Returns:
        The checkpoint folder.
    """
    from safetensors.torch import save_file

    folder = checkpoint_folder(cfg, step)
    folder.mkdir(parents=True, exist_ok=True)
    callback_states = _callback_states(accelerator, callbacks)  # a collective: before any main-only work
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if callbacks:
            torch.save({"callbacks": callback_states}, folder / CALLBACKS_FILE)
        for name, obj in state.items():
            obj = _unwrap(accelerator, obj)
            kind = _kind(obj)
            if kind == "lora":
                from peft.utils import get_peft_model_state_dict

                weights = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(obj).items()}
                save_file(weights, str(_file(folder, name, kind)))
            else:
                payload = obj.stats.state_dict() if kind == "normaliser" else obj.state_dict()
                torch.save(payload, _file(folder, name, kind))
    torch.save(_rng_state(), folder / f"rng_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta = {"step": int(step), "num_processes": int(accelerator.num_processes), "entries": sorted(state)}
        (folder / _META).write_text(json.dumps(meta, indent=1))
    accelerator.wait_for_everyone()
    return folder


def _resolve(cfg: Any) -> Path | None:
    if str(cfg.resume_from) == "latest":
        found = latest_checkpoint(cfg.output_dir)
        if found is None:
            logger.warning("resume_from='latest': no checkpoint under %s; starting from step 0", cfg.output_dir)
        return found
    folder = Path(str(cfg.resume_from))
    if not (folder / _META).is_file():
        raise ValueError(f"resume: {folder} is not a complete checkpoint (no {_META}); pass resume_from='latest' "
                         f"or a folder like {checkpoint_folder(cfg, 100)}")
    return folder


def _load_lora(obj: torch.nn.Module, path: Path) -> None:
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(path))
    expected = set(get_peft_model_state_dict(obj))
    missing, unexpected = sorted(expected - set(saved)), sorted(set(saved) - expected)
    if missing or unexpected:
        raise ValueError(f"resume: LoRA weights in {path} do not match the model (lora_rank / targets changed?): "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    set_peft_model_state_dict(obj, saved)


def _load_callbacks(accelerator: Any, folder: Path, callbacks: Sequence[Any]) -> None:
    """Restore the callbacks' states (fresh with a warning when the checkpoint predates ``callbacks.pt``)."""
    path = folder / CALLBACKS_FILE
    if not path.is_file():
        logger.warning("resume: %s has no %s (written before evaluation callbacks were checkpointed); the "
                       "evaluation callbacks start fresh: no alarm history, and an FID reference built from images "
                       "is recomputed at the next evaluation", folder, CALLBACKS_FILE)
        return
    saved = torch.load(path, map_location="cpu", weights_only=True)["callbacks"]
    kinds = [type(callback).__name__ for callback in callbacks]
    if [state.get("kind") for state in saved] != kinds:
        raise ValueError(f"resume: {path} holds callbacks {[state.get('kind') for state in saved]}, this run built "
                         f"{kinds}; resume with the same fid_reference and evaluation settings as the saved run")
    for callback, state in zip(callbacks, saved):
        if not accelerator.is_main_process:  # the saved pending training rewards are the sum over ranks
            state = {**state, "train_reward": [0.0, 0.0]}
        callback.load_state_dict(state)
        if callback.should_stop:  # resuming is the user's decision to go on: the alarm decides afresh
            logger.warning("resume: %s had stopped the run on its hacking alarm; continuing (the alarm history is "
                           "kept, so it fires again if the trend goes on)", type(callback).__name__)
            callback.should_stop = False


def resume(accelerator: Any, cfg: Any, state: Mapping[str, Any], callbacks: Sequence[Any] = (),
           fresh_if_missing: Collection[str] = ()) -> int:
    """Load ``state`` from ``cfg.resume_from`` (``"latest"`` or a folder) and return the step to continue from.

    Returns 0 (nothing loaded) when ``cfg.resume_from`` is unset or ``"latest"`` finds no checkpoint.
    This process's RNG state is restored when the checkpoint has one for its rank. ``callbacks`` (built
    with the saved run's settings) get their states from ``callbacks.pt``; without that file (an older
    checkpoint) they start fresh, with a warning. So do the ``state`` entries named in ``fresh_if_missing``
    (the recipes name their advantage tracker: checkpoints written before trackers were saved have no
    ``tracker.pt``, and the per-prompt statistics then restart empty, as in ddpo-pytorch, which never saves
    them); any other missing entry raises.

    Raises:
        ValueError: an incomplete checkpoint folder, a missing entry file, mismatched LoRA keys, or saved
            callbacks that differ from ``callbacks`` (kinds, prompts, alarm setting).
    """
    if not cfg.resume_from:
        return 0
    folder = _resolve(cfg)
    if folder is None:
        return 0
    for name, obj in state.items():
        obj = _unwrap(accelerator, obj)
        kind = _kind(obj)
        path = _file(folder, name, kind)
        if not path.is_file() and name in fresh_if_missing:
            logger.warning("resume: %s has no %s (an older checkpoint); %s starts fresh, so the first steps after "
                           "resuming differ from an uninterrupted run", folder, path.name, name)
            continue
        if not path.is_file():
            present = sorted(p.name for p in folder.iterdir())
            raise ValueError(f"resume: {path.name} is missing from {folder} (it has {present}); resume with the "
                             "same recipe and state entries that wrote it")
        if kind == "lora":
            _load_lora(obj, path)
        else:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            (obj.stats if kind == "normaliser" else obj).load_state_dict(saved)
    if callbacks:
        _load_callbacks(accelerator, folder, callbacks)
    rng = folder / f"rng_state_{accelerator.process_index}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))
    else:
        logger.warning("resume: no RNG state for process %d in %s; sampling noise will differ from the original run",
                       accelerator.process_index, folder)
    step = int(json.loads((folder / _META).read_text())["step"])
    logger.info("resumed from %s at step %d", folder, step)
    return step
