"""Flow-GRPO: fine-tune a flow-matching text-to-image model (SD3 / SD3.5) LoRA with GRPO on rewardkit rewards.

Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL" (yifan123/flow_grpo,
``scripts/train_sd3.py``). Each step samples ``group_size`` images per prompt with the SDE step of
``rewardkit.training.flow_logprob`` (log-probs recorded in float32; the group of a prompt spans
processes), scores them with the composed reward from the config, turns the scores into group-relative
advantages over the gathered batch, and takes ``num_inner_epochs`` PPO-clipped optimizer steps over the
recorded transitions, optionally with a KL penalty to the base model (the LoRA adapters disabled).
Advantages come from flow_grpo's per-prompt stat tracker by default (``advantage_tracker``; the rewards of a
whole step, gathered from every process, cleared every ``tracker_clear_every`` steps as ``train_sd3.py``
clears it every epoch; saved in checkpoints). Logged: total and per-part rewards, the saturation signals
(``train/zero_std_ratio``, ``train/group_std_mean``; ``train/frac_reward_zero_std`` is TRL's name for the
first), the correlation of every two reward parts (``train/part_corr/<a>_vs_<b>``), loss, policy loss, KL,
approx-KL, clip fraction and the mean ratio (exactly 1 on the first inner epoch: sampling and training compute the same
policy), plus the evaluation callbacks (rewards on fixed prompts; FID with ``fid_reference``) and, with
``hacking_alarm_window``, the reward-hacking alarm (``eval/hacking_alarm``; ``stop_on_hacking_alarm`` checkpoints
and stops).

Tasks (one config each, flow_grpo ``config/grpo.py``): ``flow_grpo.yaml`` (PickScore), ``flow_grpo_ocr.yaml``
(visual text: the ``ocr`` reward) and ``flow_grpo_geneval.yaml`` (GenEval: the ``geneval`` reward).

Prompt files (``prompts``; ``None`` = rewardkit's built-in prompts):

* ``.txt``: one prompt per line (flow_grpo ``dataset/ocr/train.txt``; for ``ocr`` the text to render is the part
  of the prompt in double quotes);
* ``.jsonl``: one JSON object per line with a ``"prompt"`` string and the prompt's metadata (flow_grpo
  ``dataset/geneval/train_metadata.jsonl``: ``{"tag": ..., "include": [{"class": ..., "count": ...}, ...],
  "exclude": [...], "prompt": ...}``). As flow_grpo's ``GenevalPromptDataset``, the whole object is the prompt's
  metadata; every reward call gets ``metadata=`` with the record of each image's prompt (also in evaluation).
  A reward that needs it (``geneval``) refuses a prompt file without records before any model loads.

Launch (real model; every size is in the YAML):

    accelerate launch recipes/flow_grpo.py --config recipes/configs/flow_grpo.yaml                    # one GPU
    accelerate launch --multi_gpu --num_processes 8 recipes/flow_grpo.py --config recipes/configs/flow_grpo.yaml
    ACCELERATE_USE_CPU=1 accelerate launch --num_processes 2 --multi_gpu recipes/flow_grpo.py \\
        --tiny --max_steps 2 --output_dir /tmp/flow-grpo-smoke                                       # CPU smoke
    python recipes/flow_grpo.py --config recipes/configs/flow_grpo_geneval.yaml --tiny --max_steps 2 \\
        --output_dir /tmp/flow-grpo-geneval                               # CPU smoke of a task (or _ocr.yaml)

``--tiny`` builds a random tiny SD3 pipeline and tiny versions of the configured rewards offline
(``rewardkit.testing``: random tiny GenEval detector and colour CLIP, the real PP-OCRv4 models of the rapidocr
wheel) and trains on the config's ``tiny_prompts`` file (shipped beside the task configs); without a config it
uses a toy brightness + HPSv2 pair. Expected runtime: the CPU smoke run took 30-40 s on 2 shared, busy cores
(mostly imports and start-up). Real-model runtime was not measured (no GPU was available when this recipe was
written).
"""

from __future__ import annotations

import contextlib
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

import torch

from rewardkit.recipe_support import common as rc  # rewardkit: shared recipe support
from rewardkit.training.group_signals import advantages_with_signals  # rewardkit: advantages + saturation
from rewardkit.training.flow_logprob import (  # rewardkit: Flow-GRPO SDE step with log-probs
    FlowTrajectory,
    gaussian_kl,
    sample_with_logprob,
    step_log_prob,
)
from rewardkit.recipe_support.models import stop_requested  # rewardkit: stop_on_hacking_alarm
from rewardkit.training.trackers import tracker_for  # rewardkit: per-prompt stat trackers (flow_grpo, ddpo)

PROJECT = "flow_grpo"
# flow_grpo scripts/train_sd3.py: LoRA on the joint attention's image and text projections.
SD3_LORA_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")
# --tiny without rewards in the config: two parts, so per-part logs are exercised
TINY_REWARDS = {"rewardkit.testing.toy_rewards:load_brightness": 1.0, "hpsv2": 0.5}
_SEED_STRIDE = 1_000_003  # mixes (seed, step, micro-batch, rank, row) into one noise seed per image


@dataclass
class Config(rc.CommonConfig):
    """Flow-GRPO fields on top of ``CommonConfig`` (flow_grpo ``config/base.py`` / ``grpo.py`` names in brackets)."""

    pretrained_model: str = "stabilityai/stable-diffusion-3.5-medium"  # a StableDiffusion3Pipeline
    max_steps: int = 300  # GRPO steps: one rollout of every micro-batch + num_inner_epochs optimizer steps
    group_size: int = 8  # G images per prompt over ALL processes: the advantage group [sample.num_image_per_prompt]
    noise_level: float = 0.7  # SDE noise level eta [sample.noise_level]
    same_latent: bool = False  # the images of a prompt share their initial noise [sample.same_latent]
    num_inner_epochs: int = 1  # optimizer steps on each rollout [train.num_inner_epochs]
    clip_range: float = 1e-4  # PPO ratio clip [train.clip_range]
    adv_clip_max: float = 5.0  # advantages clamped to [-adv_clip_max, adv_clip_max] [train.adv_clip_max]
    advantage_std: Literal["group", "global", "none"] = "global"  # [sample.global_std=True -> "global"]
    # per-prompt statistics: "flow_grpo" (flow_grpo/stat_tracking.py), "ddpo" (ddpo-pytorch / trl 0.23, with
    # tracker_buffer_size / tracker_min_count) or "none" (stateless) [per_prompt_stat_tracking]
    advantage_tracker: Literal["flow_grpo", "ddpo", "none"] = "flow_grpo"
    tracker_clear_every: int = 1  # flow_grpo tracker: clear() after every N steps (train_sd3.py: 1); 0 = never
    tracker_buffer_size: int = 16  # ddpo tracker: rewards kept per prompt
    tracker_min_count: int = 16  # ddpo tracker: below this many, the batch mean / std are used
    # weight of the exact KL(policy || base model) per transition; 0 = off. flow_grpo's [train.beta] weighs a
    # KL |dt| times this one (|dt| ~ 1/T), so its beta 0.01 corresponds to about 0.01/T here.
    kl_beta: float = 0.0
    timestep_fraction: float = 1.0  # train on the first fraction of the stochastic steps [train.timestep_fraction]
    learning_rate: float = 3e-4  # [train.learning_rate]
    weight_decay: float = 1e-4  # AdamW [train.adam_weight_decay]
    resolution: int = 512
    num_inference_steps: int = 10  # sampling steps T (T - 1 stochastic ones are trained) [sample.num_steps]
    guidance_scale: float = 4.5  # CFG while sampling AND while recomputing log-probs [sample.guidance_scale]
    lora_rank: int = 32
    lora_alpha: float = 64.0

    TINY_DEFAULTS: ClassVar[dict[str, Any]] = {"rewards": TINY_REWARDS}  # a config's own rewards survive --tiny
    TINY_OVERRIDES: ClassVar[dict[str, Any]] = {**rc.CommonConfig.TINY_OVERRIDES, "group_size": 2,
                                                "num_inner_epochs": 2, "kl_beta": 0.01}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size < 2:
            raise ValueError(f"config: group_size must be >= 2 (advantages compare images of a prompt), got "
                             f"{self.group_size}")
        tracker_for(self.advantage_tracker, self.advantage_std, buffer_size=self.tracker_buffer_size,  # validates
                    min_count=self.tracker_min_count)
        if self.tracker_clear_every < 0:
            raise ValueError(f"config: tracker_clear_every must be >= 0 (0 = never), got {self.tracker_clear_every}")
        if not 0 < self.timestep_fraction <= 1 or self.noise_level <= 0 or self.clip_range <= 0:
            raise ValueError("config: need 0 < timestep_fraction <= 1, noise_level > 0 and clip_range > 0, got "
                             f"{self.timestep_fraction}, {self.noise_level}, {self.clip_range}")


@dataclass
class Rollout:
    """One sampled micro-batch of this process: the recorded trajectory, its advantages and total rewards ``(B,)``."""

    trajectory: FlowTrajectory
    advantages: torch.Tensor
    scores: torch.Tensor  # the optimised (composed) reward of each image, fed to the hacking alarm


# ----------------------------------------------------------------------------------------------------
# Phases
# ----------------------------------------------------------------------------------------------------
def setup(cfg: Config) -> tuple[Any, dict[str, int]]:
    accelerator = rc.make_accelerator(cfg, PROJECT)  # rewardkit: trackers (TensorBoard), seeds
    rc.setup_logging(accelerator)  # rewardkit:
    rc.write_config(accelerator, cfg)  # rewardkit: output_dir/config.yaml
    micro_batch = cfg.train_batch_size * accelerator.num_processes
    sizes = rc.check_batch_arithmetic(  # rewardkit: printed at start-up, raises if uneven
        cfg, accelerator, group_size=cfg.group_size, prompts_per_micro_batch=(micro_batch, cfg.group_size),
        stochastic_steps=cfg.num_inference_steps - 1,
        trained_steps_per_image=max(1, int(cfg.timestep_fraction * (cfg.num_inference_steps - 1))))
    return accelerator, sizes


def build_models(cfg: Config, accelerator: Any) -> dict[str, Any]:
    dtype = rc.weight_dtype(accelerator)  # rewardkit: frozen weights in the mixed-precision dtype
    pipe = rc.load_pipeline(cfg, "sd3", accelerator.device, dtype)  # rewardkit: tiny SD3 under --tiny
    params = rc.add_lora(pipe.transformer, cfg, target_modules=SD3_LORA_TARGETS)  # rewardkit: peft LoRA, fp32
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    denoiser, optimizer = accelerator.prepare(pipe.transformer, optimizer)
    reward = rc.build_reward(cfg, accelerator.device, accelerator)  # rewardkit: rk.compose(cfg.rewards)
    tracker = tracker_for(cfg.advantage_tracker, cfg.advantage_std, buffer_size=cfg.tracker_buffer_size,  # rewardkit:
                          min_count=cfg.tracker_min_count)
    return {"pipe": pipe, "denoiser": denoiser, "params": params, "optimizer": optimizer, "reward": reward,
            "tracker": tracker}


def _generators(cfg: Config, accelerator: Any, step: int, micro: int, count: int) -> list[torch.Generator]:
    """One generator per image, from (seed, step, micro-batch, rank, row): a resumed run draws the same noise."""
    base = (((cfg.seed * _SEED_STRIDE + step) * _SEED_STRIDE + micro) * _SEED_STRIDE + accelerator.process_index)
    return [torch.Generator().manual_seed((base * _SEED_STRIDE + row) % 2**63) for row in range(count)]


def _shared_latents(cfg: Config, pipe: Any, prompts: list[str], step: int) -> torch.Tensor | None:
    """With ``same_latent``, initial noise seeded by (seed, step, prompt): equal within a group, on every rank."""
    if not cfg.same_latent:
        return None
    side = cfg.resolution // pipe.vae_scale_factor
    shape = (pipe.transformer.config.in_channels, side, side)
    seeds = [((cfg.seed * _SEED_STRIDE + step) * _SEED_STRIDE + zlib.crc32(p.encode())) % 2**63 for p in prompts]
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def score(cfg: Config, accelerator: Any, models: dict, images: list[torch.Tensor], batches: list[list[str]],
          step: int, metadata: Sequence[list[dict] | None] | None = None) -> tuple[list[tuple], dict]:
    """Rewards of every micro-batch of a step -> ``(advantages, rewards)`` of each micro-batch (advantages over
    every process's images) and reward statistics.

    ``metadata``: per micro-batch, one record per image (its prompt's ``.jsonl`` record) or ``None``; passed to
    the reward as ``metadata=`` (flow_grpo's ``reward_fn(images, prompts, prompt_metadata)``). As flow_grpo, the
    advantages of a step come from one tracker update with all of its gathered rewards.
    """
    reward, tracker = models["reward"], models["tracker"]
    metadata = metadata if metadata is not None else [None] * len(batches)
    with torch.no_grad():
        outputs = [reward.evaluate(batch_images, batch, **({} if rows is None else {"metadata": rows}))  # rewardkit:
                   for batch_images, batch, rows in zip(images, batches, metadata)]
    scores = torch.cat([output.scores for output in outputs])
    parts = {part: torch.cat([output.details[part] for output in outputs]) for part in reward.part_names}
    prompts = [prompt for batch in batches for prompt in batch]
    advantages, metrics = advantages_with_signals(  # rewardkit: one gather, tracker update, saturation signals
        scores, prompts, parts, tracker=tracker, std=cfg.advantage_std,
        clip=cfg.adv_clip_max, prefix="")
    if tracker is not None and cfg.tracker_clear_every and (step + 1) % cfg.tracker_clear_every == 0:
        tracker.clear()  # flow_grpo scripts/train_sd3.py clears its tracker after every epoch
    total = accelerator.gather(scores.detach().float())
    metrics.update({"reward/mean": total.mean(), "reward/std": total.std(),
                    "frac_reward_zero_std": metrics["zero_std_ratio"]})  # TRL's name for the same fraction
    for part, values in parts.items():  # rewardkit: per-part raw scores
        values = accelerator.gather(values.float())
        metrics[f"rewards/{part}/mean"], metrics[f"rewards/{part}/std"] = values.nanmean(), values.std()
    sizes = [len(batch) for batch in batches]
    return list(zip(advantages.split(sizes), scores.split(sizes))), metrics


def rollout(cfg: Config, accelerator: Any, models: dict, prompts: rc.PromptList, step: int) -> tuple[list, dict]:
    """Sample ``gradient_accumulation_steps`` micro-batches with the current policy, then score them together
    (each image with its prompt's metadata record when the prompt file has them)."""
    trajectories, batches = [], []
    groups = cfg.train_batch_size * accelerator.num_processes // cfg.group_size
    for micro in range(cfg.gradient_accumulation_steps):
        batch = rc.k_repeat_prompts(prompts, cfg.group_size, groups, step * cfg.gradient_accumulation_steps + micro,
                                    accelerator.process_index, accelerator.num_processes, cfg.seed)  # rewardkit:
        with accelerator.autocast():
            trajectories.append(sample_with_logprob(  # rewardkit: SDE sampling, float32 log-probs
                models["pipe"], batch, num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                height=cfg.resolution, width=cfg.resolution, noise_level=cfg.noise_level,
                generator=_generators(cfg, accelerator, step, micro, len(batch)),
                latents=_shared_latents(cfg, models["pipe"], batch, step)))
        batches.append(batch)
    metadata = [prompts.metadata_for(batch) for batch in batches]  # rewardkit: records travel with their prompts
    scored, metrics = score(cfg, accelerator, models, [t.images for t in trajectories], batches, step, metadata)
    return [Rollout(t, a, s) for t, (a, s) in zip(trajectories, scored)], {k: float(v) for k, v in metrics.items()}


def grpo_loss(cfg: Config, denoiser: Any, raw: Any, item: Rollout, j: int) -> tuple[torch.Tensor, dict]:
    """Clipped policy loss (+ KL to the base model) on stochastic step ``j`` of one micro-batch."""
    traj = item.trajectory
    args = (traj.latents[:, j], traj.next_latents[:, j], traj.timesteps[j], traj.step_indices[j], traj.sigmas, traj.text,
            cfg.guidance_scale, cfg.noise_level)
    kl = torch.zeros((), device=traj.latents.device)
    if cfg.kl_beta > 0:
        with torch.no_grad():
            raw.disable_adapters()  # the reference policy: the base model
            reference = step_log_prob(raw, *args)  # rewardkit:
            raw.enable_adapters()
    new = step_log_prob(denoiser, *args)  # rewardkit: float32 log-prob of the recorded transition
    if cfg.kl_beta > 0:
        kl = gaussian_kl(new.mean, reference.mean, new.std).mean()  # rewardkit:
    valid = torch.isfinite(item.advantages)  # NaN rewards ("not applicable") contribute nothing
    advantages = torch.where(valid, item.advantages, torch.zeros_like(item.advantages)).float()
    log_ratio = new.log_prob - traj.log_probs[:, j]
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - cfg.clip_range, 1 + cfg.clip_range)
    policy_loss = torch.maximum(-advantages * ratio, -advantages * clipped).mean()
    loss = policy_loss + cfg.kl_beta * kl
    metrics = {"loss": loss.detach(), "policy_loss": policy_loss.detach(), "kl": kl.detach(),
               "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean(), "ratio": ratio.detach().mean(),
               "clip_frac": ((ratio.detach() - 1).abs() > cfg.clip_range).float().mean()}
    return loss, metrics


def policy_update(cfg: Config, accelerator: Any, models: dict, rollouts: list[Rollout]) -> dict[str, float]:
    """``num_inner_epochs`` optimizer steps, each over every micro-batch and trained stochastic step."""
    denoiser, optimizer = models["denoiser"], models["optimizer"]
    raw = accelerator.unwrap_model(denoiser)
    steps = rollouts[0].trajectory.log_probs.shape[1]
    trained = max(1, int(cfg.timestep_fraction * steps))
    jobs = [(item, j) for item in rollouts for j in range(trained)]
    metrics: dict[str, list[float]] = defaultdict(list)
    for epoch in range(cfg.num_inner_epochs):
        for n, (item, j) in enumerate(jobs):
            sync = contextlib.nullcontext() if n == len(jobs) - 1 else accelerator.no_sync(denoiser)
            with sync, accelerator.autocast():
                loss, stats = grpo_loss(cfg, denoiser, raw, item, j)
                # accelerator.backward divides by gradient_accumulation_steps; the mean is over all jobs.
                accelerator.backward(loss * cfg.gradient_accumulation_steps / len(jobs))
            for key, value in stats.items():
                metrics[key if epoch == 0 or key != "ratio" else "ratio_last_epoch"].append(float(value))
        if cfg.max_grad_norm > 0:
            metrics["grad_norm"].append(float(accelerator.clip_grad_norm_(models["params"], cfg.max_grad_norm)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {f"train/{key}": sum(v) / len(v) for key, v in metrics.items()}


def evaluate(cfg: Config, accelerator: Any, models: dict, callbacks: list, step: int, rollouts: list[Rollout]) -> None:
    """Evaluation callbacks on every process (they are collectives); sample images on the main one.

    Each callback first records this step's optimised rewards (this rank's images) for its hacking alarm.
    """
    raw = accelerator.unwrap_model(models["denoiser"])
    scores = torch.cat([item.scores for item in rollouts])
    for callback in callbacks:
        callback.record_train_reward(scores)  # rewardkit: the alarm's training side (NaN rows left out)
        callback.maybe_evaluate(step, accelerator, model=raw)  # rewardkit: logs eval/* through the trackers
    if accelerator.is_main_process and step % cfg.eval_every == 0:
        from torchvision.utils import save_image

        folder = Path(cfg.output_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        save_image(rollouts[0].trajectory.images, folder / f"step-{step}.png", nrow=cfg.group_size)


def main(config: Config | Sequence[str] | None = None) -> list[dict[str, float]]:
    """Train; returns the logged training metrics of every step (for tests)."""
    cfg = config if isinstance(config, Config) else rc.parse_config(Config, config)  # rewardkit: yaml + flags
    accelerator, _ = setup(cfg)
    prompts = rc.load_prompts(cfg)  # rewardkit: .txt / .jsonl (with metadata) or built-in; checked before models load
    models = build_models(cfg, accelerator)
    state = {"denoiser": models["denoiser"], "optimizer": models["optimizer"], "reward": models["reward"]}
    if models["tracker"] is not None:
        state["tracker"] = models["tracker"]  # rewardkit: per-prompt reward history (tracker.pt)
    callbacks = rc.eval_callbacks(cfg, models["pipe"], models["reward"], accelerator)  # rewardkit: eval/*
    # rewardkit: LoRA, optimizer, normaliser, tracker, step, RNG and the callbacks (alarm history, FID reference)
    start = rc.resume(accelerator, cfg, state, callbacks=callbacks, fresh_if_missing=("tracker",))
    progress = rc.progress_bar(accelerator, cfg, initial=start)  # rewardkit:
    history = []
    for step in range(start, cfg.max_steps):
        models["denoiser"].train()
        rollouts, reward_metrics = rollout(cfg, accelerator, models, prompts, step)
        train_metrics = policy_update(cfg, accelerator, models, rollouts)
        done = step + 1
        metrics = {**{f"train/{k}": v for k, v in reward_metrics.items()}, **train_metrics}
        history.append(rc.log_metrics(accelerator, metrics, done, progress,  # rewardkit: trackers + tqdm
                                      postfix=("train/reward/mean", "train/loss", "train/kl")))
        progress.update(1)
        evaluate(cfg, accelerator, models, callbacks, done, rollouts)
        stop = stop_requested(callbacks, done)  # rewardkit: stop_on_hacking_alarm (the same on every rank)
        if done % cfg.checkpoint_every == 0 or done == cfg.max_steps or stop:
            rc.save_checkpoint(accelerator, cfg, done, state, callbacks)  # rewardkit: periodic, final, on a stop
        if stop:
            break
    progress.close()
    accelerator.end_training()
    return history


if __name__ == "__main__":
    main()
