"""Models of the ``recipes/``: pipeline, LoRA, composed reward, evaluation callbacks (re-exported by
``common``, which documents the recipe conventions and sources).

Under ``--tiny`` every model is a tiny random one built offline through ``rewardkit.testing``: the
pipelines of ``rewardkit.testing.pipelines`` and the tiny reward / FID checkpoints, written once under
``output_dir/tiny-weights``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

__all__ = ["LORA_TARGET_MODULES", "TINY_WEIGHTS_FOLDER", "weight_dtype", "load_pipeline", "denoiser_of", "add_lora",
           "load_tiny_shared", "build_reward", "eval_callbacks", "fid_metric", "stop_requested"]

logger = logging.getLogger(__name__)

# Attention projections of diffusers' UNet / SD3 / Flux attention blocks (diffusers LoRA examples).
LORA_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")
TINY_WEIGHTS_FOLDER = "tiny-weights"  # under output_dir: the tiny reward / FID checkpoints of --tiny runs


def weight_dtype(accelerator: Any) -> torch.dtype:
    """The dtype of frozen weights (VAE, text encoders, base denoiser) for the accelerator's precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(str(accelerator.mixed_precision), torch.float32)


def load_pipeline(cfg: Any, family: Literal["sd", "sd3"], device: Any, dtype: torch.dtype) -> Any:
    """The diffusers pipeline with every module frozen, on ``device`` in ``dtype``.

    ``family="sd"``: ``StableDiffusionPipeline``; ``"sd3"``: ``StableDiffusion3Pipeline`` (flow matching).
    With ``cfg.tiny`` the tiny random builders of ``rewardkit.testing.pipelines`` are used (offline).
    """
    from rewardkit.testing.pipelines import tiny_sd3_pipeline, tiny_sd_pipeline

    if family not in ("sd", "sd3"):
        raise ValueError(f"load_pipeline: family must be 'sd' or 'sd3', got {family!r}")
    if cfg.tiny:
        pipe = (tiny_sd_pipeline if family == "sd" else tiny_sd3_pipeline)(seed=cfg.seed)
    else:
        from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

        cls = StableDiffusionPipeline if family == "sd" else StableDiffusion3Pipeline
        pipe = cls.from_pretrained(cfg.pretrained_model, torch_dtype=dtype)
    pipe.to(device, dtype)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser_of(pipe: Any) -> torch.nn.Module:
    """The pipeline's denoiser: ``unet`` (SD 1.x/XL) or ``transformer`` (SD3, Flux)."""
    module = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if module is None:
        raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer")
    return module


def add_lora(denoiser: torch.nn.Module, cfg: Any,
             target_modules: Sequence[str] = LORA_TARGET_MODULES) -> list[torch.nn.Parameter]:
    """Freeze ``denoiser`` and add a peft LoRA adapter (rank ``cfg.lora_rank``) on its attention projections.

    Returns:
        The trainable LoRA parameters, upcast to float32 (for mixed-precision training).
    """
    from peft import LoraConfig

    denoiser.requires_grad_(False)
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                        target_modules=list(target_modules))
    denoiser.add_adapter(config)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"add_lora: no module of {type(denoiser).__name__} matched {list(target_modules)}")
    for param in params:
        param.data = param.data.float()
    return params


def load_tiny_shared(name: str, root: str | Path, accelerator: Any = None) -> Any:
    """``rewardkit.testing.load_tiny`` for several processes: the main process writes the tiny checkpoint
    once under ``root/name`` and every process loads it.

    The builder's ``rk.load`` arguments are broadcast from the main process instead of every rank
    building its own copy: ranks would race on the files, and transformers' ``save_pretrained`` writes
    only on rank 0 under ``torch.distributed``, so other ranks' HF folders would stay empty.
    """
    import rewardkit.testing as rkt
    from rewardkit.registry import get_entry, load

    entry = get_entry(name)
    if entry.tiny is None:
        return load(name)
    main = accelerator is None or accelerator.is_main_process
    kwargs = [getattr(rkt, entry.tiny)(Path(root) / name) if main else None]
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(kwargs, from_process=0)
    return load(name, **kwargs[0])


def build_reward(cfg: Any, device: Any, accelerator: Any = None) -> Any:
    """``rk.compose(cfg.rewards, normalize=cfg.normalize)`` on ``device``, parts keyed by their ``.name``.

    With ``cfg.tiny``, registry rewards are tiny random checkpoints written once under
    ``output_dir/tiny-weights`` (``load_tiny_shared``; pass ``accelerator`` when several processes run)
    and ``"module:factory"`` rewards (e.g. the toy brightness reward) are loaded directly.
    """
    from rewardkit.compose import compose
    from rewardkit.registry import load

    members: dict[Any, float] = {}
    for name, weight in cfg.rewards.items():
        if cfg.tiny and ":" not in name:
            reward = load_tiny_shared(name, Path(cfg.output_dir) / TINY_WEIGHTS_FOLDER, accelerator)
        else:
            reward = load(name, weights=cfg.reward_weights.get(name), dtype=cfg.reward_dtype)
        members[reward.to(device) if isinstance(reward, torch.nn.Module) else reward] = float(weight)
    affine = {k: (float(v[0]), float(v[1])) for k, v in cfg.reward_affine.items()} or None
    return compose(members, normalize=cfg.normalize, affine=affine)


def eval_callbacks(cfg: Any, pipeline: Any, reward: Any, accelerator: Any = None,
                   pipeline_kwargs: dict[str, Any] | None = None) -> list[Any]:
    """``RewardEvalCallback`` (and ``FIDEvalCallback`` when ``cfg.fid_reference`` is set), every
    ``cfg.eval_every`` steps, on the first ``cfg.eval_prompts`` prompts with seeds ``0..N-1``; prompts from a
    ``.jsonl`` file are scored with their records as ``metadata=`` (``PromptMetadataReward``).

    With ``cfg.hacking_alarm_window = N > 0`` each callback gets its own ``RewardHackingAlarm(window=N)``
    (``stop_on_alarm=cfg.stop_on_hacking_alarm``) and logs ``eval/train_reward`` / ``eval/hacking_alarm``.

    Call ``callback.record_train_reward(rewards)`` with each step's optimised rewards, then
    ``callback.maybe_evaluate(step, accelerator, model=denoiser)`` on every rank, then ``stop_requested``.
    """
    from rewardkit.integrations.callbacks import FIDEvalCallback, RewardEvalCallback
    from rewardkit.recipe_support.prompts import PromptMetadataReward, load_prompts

    all_prompts = load_prompts(cfg)
    prompts = [all_prompts[i % len(all_prompts)] for i in range(cfg.eval_prompts)]
    kwargs = {"num_inference_steps": cfg.num_inference_steps, "guidance_scale": cfg.guidance_scale,
              "height": cfg.resolution, "width": cfg.resolution, **(pipeline_kwargs or {})}
    options = {"every_n_steps": cfg.eval_every, "pipeline": pipeline, "pipeline_kwargs": kwargs}
    window = int(getattr(cfg, "hacking_alarm_window", 0))

    def alarm() -> dict[str, Any]:  # one alarm per callback: each keeps its own history
        if not window:
            return {}
        from rewardkit.integrations.hacking_alarm import RewardHackingAlarm

        return {"alarm": RewardHackingAlarm(window=window), "stop_on_alarm": bool(cfg.stop_on_hacking_alarm)}

    # a .jsonl prompt file's records reach the reward as metadata=, as in training (GenEval needs them)
    scored = PromptMetadataReward(reward, all_prompts) if all_prompts.records else reward
    callbacks: list[Any] = [RewardEvalCallback(scored, prompts, **options, **alarm())]
    if cfg.fid_reference:
        callbacks.append(FIDEvalCallback(fid_metric(cfg, accelerator), prompts, **_fid_reference(cfg), **options,
                                         **alarm()))
    return callbacks


def stop_requested(callbacks: Sequence[Any], step: int) -> bool:
    """True when a callback's hacking alarm asked to stop (``stop_on_hacking_alarm``); logs which and why.

    The callbacks decide on values reduced over every rank, so every rank returns the same answer at the
    same step: the recipes then checkpoint and leave the loop together (no rank waits in a collective).
    """
    stopping = [callback for callback in callbacks if getattr(callback, "should_stop", False)]
    for callback in stopping:
        alarm = callback.alarm
        logger.warning("stopping at step %d (stop_on_hacking_alarm): %s's alarm fired on %s; the training reward "
                       "rose over the last %d evaluations while these held-out values worsened", step,
                       type(callback).__name__, alarm.last or (alarm.fired[-1]["keys"] if alarm.fired else "?"),
                       alarm.window)
    return bool(stopping)


def fid_metric(cfg: Any, accelerator: Any) -> Any:
    """The FID metric of a recipe: the registry's ``fid`` (tiny FID-Inception weights under ``--tiny``)."""
    from rewardkit.registry import load

    device = getattr(accelerator, "device", None)
    if cfg.tiny:
        metric = load_tiny_shared("fid", Path(cfg.output_dir) / TINY_WEIGHTS_FOLDER, accelerator)
        return metric.to(device) if device is not None else metric
    return load("fid", device=device)


def _fid_reference(cfg: Any) -> dict[str, Any]:
    reference = Path(str(cfg.fid_reference))
    if reference.suffix == ".npz" and reference.is_file():
        return {"reference": str(reference)}
    if reference.is_dir():
        return {"reference_images": str(reference)}
    raise ValueError(f"config: fid_reference must be a .npz file from `rewardkit fid-stats` or a folder of images, "
                     f"got {cfg.fid_reference!r}")
