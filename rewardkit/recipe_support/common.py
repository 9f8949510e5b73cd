"""Shared support of the ``recipes/`` training scripts: config, accelerator, models, rewards, logging.

Every recipe (Flow-GRPO, DDPO, Diffusion-DPO, DRaFT, ...) is one readable file that subclasses
``CommonConfig`` with its method's fields and calls the helpers below, so the parts that must be
right everywhere (config parsing, batch arithmetic, LoRA, checkpoints, evaluation, tracker logging)
are written and tested once. Checkpointing lives in ``checkpoint.py``, the model builders
(pipeline, LoRA, rewards, evaluation callbacks) in ``models.py`` and the prompts (files, metadata, K-repeat
sampling) in ``prompts.py``; all are re-exported here.

Sources (facts only, no code copied): accelerate's ``Accelerator`` / ``ProjectConfiguration`` trackers;
TRL's ``TrlParser`` (``trl/scripts/utils.py``: ``--config x.yaml`` sets parser defaults, the command
line overrides them); diffusers' LoRA training examples (peft ``LoraConfig`` on
``to_q/to_k/to_v/to_out.0`` through ``add_adapter``, gaussian init); flow_grpo's
``DistributedKRepeatSampler`` (``yifan123/flow_grpo`` ``scripts/train_sd3.py``: K copies of each prompt
shuffled over the *global* batch) and ddpo-pytorch's start-up batch arithmetic
(``kvablack/ddpo-pytorch`` ``scripts/train.py``). See reference/rl_integration.md §3-§4.

Order of precedence of config values: dataclass defaults < the config class's ``TINY_DEFAULTS`` (only with
``--tiny``) < ``--config`` YAML < ``TINY_OVERRIDES`` (only with ``--tiny``) < command-line flags; with ``--tiny``,
``tiny_prompts`` (a task config's small shipped prompt file) replaces ``prompts`` unless ``--prompts`` is given.
Dict fields (``rewards``, ...) come from YAML as mappings and from the command line as JSON:
``--rewards '{"pickscore": 1.0}'``.

Prompt files (``prompts``): ``.txt``, one prompt per line, or ``.jsonl``, one ``{"prompt": ..., <metadata>}`` object
per line (flow_grpo's GenEval files); ``load_prompts`` keeps each prompt's record (``prompts.py``) and the
recipes pass it to the reward as ``metadata=``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

import torch

from rewardkit.recipe_support.checkpoint import latest_checkpoint, resume, save_checkpoint
from rewardkit.recipe_support.models import (
    LORA_TARGET_MODULES,
    TINY_WEIGHTS_FOLDER,
    add_lora,
    build_reward,
    denoiser_of,
    eval_callbacks,
    fid_metric,
    load_pipeline,
    load_tiny_shared,
    weight_dtype,
)
from rewardkit.recipe_support.prompts import (
    BUILTIN_PROMPTS,
    PromptList,
    PromptMetadataReward,
    k_repeat_prompts,
    load_prompts,
)

__all__ = [
    "CommonConfig", "BUILTIN_PROMPTS", "LORA_TARGET_MODULES", "TINY_WEIGHTS_FOLDER", "parse_config",
    "make_accelerator", "setup_logging", "weight_dtype", "load_pipeline", "denoiser_of", "load_tiny_shared",
    "build_reward", "add_lora", "save_checkpoint", "resume", "latest_checkpoint", "check_batch_arithmetic",
    "PromptList", "PromptMetadataReward", "load_prompts", "k_repeat_prompts", "eval_callbacks", "fid_metric",
    "json_field", "gathered_stats", "log_metrics", "progress_bar", "write_config",
]

logger = logging.getLogger(__name__)

@dataclass
class CommonConfig:
    """Fields every recipe shares; a recipe's ``Config`` subclasses this and adds its method's fields."""

    output_dir: str  # run folder: logs/ (TensorBoard), checkpoints/, config.yaml, tiny-weights/
    seed: int = 0  # global seed; each process adds its rank for sampling noise
    tiny: bool = False  # tiny random pipeline + tiny rewards from rewardkit.testing (CPU smoke runs, offline)
    pretrained_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # diffusers repo id or folder
    # reward spec: {registry name or "module:factory": weight}; CLI: --rewards '{"pickscore": 1.0}'
    rewards: dict[str, float] | str | None = field(default_factory=lambda: {"pickscore": 1.0})
    reward_weights: dict[str, str] | str | None = field(default_factory=dict)  # optional name -> weights= spec
    reward_affine: dict[str, list[float]] | str | None = field(default_factory=dict)  # name -> [shift, scale]
    normalize: Literal["none", "zscore", "affine"] = "none"  # rk.compose normalisation of each part
    reward_dtype: str = "fp32"  # rewards in "fp32" (exact) or "bf16" / "fp16" (fast autocast)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # denoiser autocast; LoRA weights stay float32
    max_steps: int = 100  # optimizer steps in total (a resumed run continues up to this count)
    learning_rate: float = 1e-4
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    train_batch_size: int = 4  # images per process per micro-step (per GPU!)
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step
    lora_rank: int = 8
    lora_alpha: float = 8.0
    resolution: int = 512  # image side in pixels
    num_inference_steps: int = 10  # sampling steps (training rollouts and evaluation)
    guidance_scale: float = 4.5  # classifier-free guidance scale (<= 1 disables CFG)
    prompts: str | None = None  # .txt (one prompt per line) or .jsonl ({"prompt": ..., metadata}) file; None = built-in
    tiny_prompts: str | None = None  # with --tiny: the prompt file used instead of `prompts` (task configs ship one)
    checkpoint_every: int = 50  # optimizer steps between checkpoints (a final one is always written)
    resume_from: str | None = None  # "latest" or a checkpoint folder
    eval_every: int = 50  # optimizer steps between evaluations (step 0 is not evaluated)
    eval_prompts: int = 8  # number of fixed evaluation prompts (the first ones of the prompt list)
    fid_reference: str | None = None  # FID reference: .npz statistics (`rewardkit fid-stats`) or image folder
    # reward-hacking alarm: fires (eval/hacking_alarm = 1, a warning) when the optimised training reward rises
    # while a held-out eval value worsens over this many evaluations (a trend fit); 0 = off, else >= 2
    hacking_alarm_window: int = 0
    stop_on_hacking_alarm: bool = False  # when the alarm fires: checkpoint and stop (every rank at the same step)
    log_with: str = "tensorboard"  # accelerate tracker name, or "none"

    # Applied with --tiny on top of the dataclass defaults only: YAML values and flags win (e.g. a recipe's toy
    # rewards, used unless a task config names its own).
    TINY_DEFAULTS: ClassVar[dict[str, Any]] = {}
    # Applied with --tiny on top of defaults and YAML (command-line flags still win).
    TINY_OVERRIDES: ClassVar[dict[str, Any]] = {
        "max_steps": 20, "resolution": 32, "num_inference_steps": 3, "train_batch_size": 2, "eval_prompts": 2,
        "eval_every": 2,
        "checkpoint_every": 2, "lora_rank": 4, "lora_alpha": 4.0, "mixed_precision": "no",
    }

    def __post_init__(self) -> None:
        self.rewards = json_field("rewards", self.rewards)
        self.reward_weights = json_field("reward_weights", self.reward_weights)
        self.reward_affine = json_field("reward_affine", self.reward_affine)
        if not self.rewards:
            raise ValueError('config: rewards must name at least one reward, e.g. --rewards \'{"pickscore": 1.0}\'')
        for name, weight in self.rewards.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ValueError(f"config: the weight of reward {name!r} must be a number, got {weight!r}")
        unknown = sorted(set(self.reward_weights) - set(self.rewards))
        if unknown:
            raise ValueError(f"config: reward_weights names {unknown} that are not in rewards {list(self.rewards)}")
        for name in ("max_steps", "train_batch_size", "gradient_accumulation_steps", "lora_rank", "resolution",
                     "num_inference_steps", "checkpoint_every", "eval_every", "eval_prompts"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"config: {name} must be >= 1, got {getattr(self, name)}")
        if self.hacking_alarm_window == 1 or self.hacking_alarm_window < 0:
            raise ValueError(f"config: hacking_alarm_window must be 0 (off) or >= 2 evaluations (a trend needs two), "
                             f"got {self.hacking_alarm_window}")
        if self.stop_on_hacking_alarm and not self.hacking_alarm_window:
            raise ValueError("config: stop_on_hacking_alarm needs the alarm on; set hacking_alarm_window (e.g. 3)")


def json_field(name: str, value: Any) -> dict[str, Any]:
    """A dict field given as a mapping (YAML, Python) or a JSON string (command line)."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"config: {name} must be a JSON object on the command line, e.g. "
                             f'--{name} \'{{"pickscore": 1.0}}\', got {value!r} ({error})') from None
    if not isinstance(value, dict):
        raise ValueError(f"config: {name} must be a mapping, got {type(value).__name__} {value!r}")
    return dict(value)


def parse_config(config_cls: type, argv: Sequence[str] | None = None) -> Any:
    """Parse ``--config x.yaml``, ``--tiny`` and ``--field value`` flags into ``config_cls``.

    Uses TRL's ``TrlParser`` (transformers' ``HfArgumentParser`` plus YAML defaults). With ``tiny``
    set, ``config_cls.TINY_DEFAULTS`` replace dataclass defaults (not YAML values), ``TINY_OVERRIDES`` replace
    defaults and YAML values, and ``tiny_prompts`` replaces ``prompts``; none of them replaces an explicit flag.

    Args:
        config_cls: a dataclass subclassing ``CommonConfig``.
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The config instance.
    """
    from trl import TrlParser

    args = list(sys.argv[1:] if argv is None else argv)
    (config,) = TrlParser(dataclass_types=[config_cls]).parse_args_and_config(args)
    if not config.tiny:
        return config
    explicit = _command_line_keys(config_cls, args)
    from_yaml = _yaml_keys(args)
    overrides = {k: v for k, v in getattr(config_cls, "TINY_DEFAULTS", {}).items() if k not in from_yaml}
    overrides.update(config_cls.TINY_OVERRIDES)
    if config.tiny_prompts:
        overrides["prompts"] = config.tiny_prompts
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if k not in explicit})


def _yaml_keys(args: list[str]) -> set[str]:
    """The field names set by the ``--config`` YAML file (none without one)."""
    import yaml

    if "--config" not in args or args.index("--config") + 1 >= len(args):
        return set()
    values = yaml.safe_load(Path(args[args.index("--config") + 1]).read_text(encoding="utf-8"))
    return set(values) if isinstance(values, dict) else set()


def _command_line_keys(config_cls: type, args: list[str]) -> set[str]:
    """The field names given as flags (not from YAML or defaults)."""
    from trl import TrlParser

    if "--config" in args:
        at = args.index("--config")
        args = args[:at] + args[at + 2:]
    parser = TrlParser(dataclass_types=[config_cls])
    for action in parser._actions:  # argparse keeps no record of which values were given: suppress defaults
        action.default, action.required = argparse.SUPPRESS, False
    namespace, _ = parser.parse_known_args(args)
    return set(vars(namespace))


def setup_logging(accelerator: Any) -> None:
    """INFO logs on the main process, warnings elsewhere; quiet diffusers / transformers progress bars."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if accelerator.is_main_process else logging.WARNING, force=True)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def make_accelerator(cfg: CommonConfig, project_name: str) -> Any:
    """An ``Accelerator`` with trackers (TensorBoard under ``output_dir/logs``) initialised with the config.

    Seeds Python, NumPy and torch with ``cfg.seed + process_index`` (different sampling noise per rank).
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    project = ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "logs"))
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=None if cfg.log_with in ("", "none") else cfg.log_with, project_config=project,
    )
    set_seed(cfg.seed, device_specific=True)
    if cfg.log_with not in ("", "none"):
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
                   for k, v in dataclasses.asdict(cfg).items()}
        accelerator.init_trackers(project_name, config=hparams)
    return accelerator


def write_config(accelerator: Any, cfg: CommonConfig) -> Path:
    """Write the resolved config to ``output_dir/config.yaml`` (main process) and return its path."""
    import yaml

    path = Path(cfg.output_dir) / "config.yaml"
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    return path


def check_batch_arithmetic(cfg: CommonConfig, accelerator: Any, **numbers: int | tuple[int, int]) -> dict[str, int]:
    """Log the derived batch sizes at start-up and raise if a division is uneven.

    Args:
        cfg: the config (per-process batch, gradient accumulation).
        accelerator: for the number of processes.
        **numbers: ``name=value`` to report, or ``name=(total, divisor)`` that must divide evenly; the
            quotient is reported under ``name``.

    Returns:
        Every derived number by name (``processes``, ``global_batch``, and ``numbers``).

    Raises:
        ValueError: an uneven or non-positive division, naming the quantity and the fix.
    """
    processes = int(accelerator.num_processes)
    derived: dict[str, int] = {
        "processes": processes, "per_process_batch": cfg.train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "global_batch": cfg.train_batch_size * processes,
        "images_per_optimizer_step": cfg.train_batch_size * processes * cfg.gradient_accumulation_steps,
    }
    for name, value in numbers.items():
        if isinstance(value, tuple):
            total, divisor = (int(v) for v in value)
            if divisor < 1 or total < 1 or total % divisor:
                raise ValueError(f"batch arithmetic: {name} = {total} / {divisor} does not divide evenly; change "
                                 "train_batch_size, the number of processes or the group size so that it does")
            value = total // divisor
        derived[name] = int(value)
    if accelerator.is_main_process:
        logger.info("batch arithmetic:\n%s", "\n".join(f"  {k:<32} {v}" for k, v in derived.items()))
    return derived


def progress_bar(accelerator: Any, cfg: CommonConfig, initial: int = 0) -> Any:
    """A tqdm bar over optimizer steps on the main process (silent elsewhere and when not a terminal)."""
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, initial=initial, desc="steps",
                disable=True if not accelerator.is_local_main_process else None)


def gathered_stats(accelerator: Any, values: dict[str, torch.Tensor]) -> dict[str, float]:
    """``{key/mean, key/std}`` over every process's rows (equal row counts on every rank); NaN rows left out.

    Args:
        values: ``{log key: (B,) tensor}`` of this process's rows.
    """
    result = {}
    for key, rows in values.items():
        every = accelerator.gather(rows.detach().float().contiguous())
        finite = every[torch.isfinite(every)]
        result[f"{key}/mean"] = float(finite.mean()) if finite.numel() else float("nan")
        result[f"{key}/std"] = float(finite.std()) if finite.numel() > 1 else float("nan")
    return result


def log_metrics(accelerator: Any, metrics: dict[str, Any], step: int, progress: Any = None,
                postfix: Sequence[str] = ()) -> dict[str, float]:
    """Log scalars through the accelerator's trackers (main process) and show ``postfix`` keys on the bar."""
    values = {k: float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else float(v)
              for k, v in metrics.items()}
    accelerator.log(values, step=step)
    if progress is not None and postfix:
        progress.set_postfix({k: f"{values[k]:.4g}" for k in postfix if k in values}, refresh=False)
    return values
