"""DDPO: fine-tune a Stable Diffusion 1.x LoRA with PPO over stochastic DDIM steps, on rewardkit rewards.

Black et al. 2023, "Training Diffusion Models with Reinforcement Learning" (kvablack/ddpo-pytorch,
``scripts/train.py``). Each epoch samples images with DDIM at ``eta > 0`` while recording every step's
log-prob, scores them with a composed rewardkit reward (the spec comes from the config), turns the scores
into per-prompt advantages over the global batch, and takes ``num_inner_epochs`` PPO-clipped optimizer
steps over the recorded steps. The advantages come from ddpo-pytorch's per-prompt stat tracker by default
(``advantage_tracker``: a history of ``tracker_buffer_size`` rewards per prompt, the batch statistics below
``tracker_min_count``; saved in checkpoints). Logged: total and per-part rewards, the saturation signals
(``train/zero_std_ratio``, ``train/group_std_mean``), the correlation of every two reward parts
(``train/part_corr/<a>_vs_<b>``), loss, approx-KL, clip fraction and
the mean ratio (1 on the first inner epoch: a check that sampling and training compute the same policy),
plus the periodic evaluation callbacks (rewards on fixed prompts; FID with ``fid_reference``) and, with
``hacking_alarm_window``, the reward-hacking alarm (``stop_on_hacking_alarm`` stops at the end of the sampling
epoch). A ``.jsonl`` prompt file's records reach the reward as ``metadata=`` (GenEval), in training and evaluation.

Launch (real model; every size is in the YAML):

    accelerate launch recipes/ddpo.py --config recipes/configs/ddpo.yaml                          # one GPU
    accelerate launch --multi_gpu --num_processes 8 recipes/ddpo.py --config recipes/configs/ddpo.yaml
    ACCELERATE_USE_CPU=1 accelerate launch --num_processes 2 --multi_gpu recipes/ddpo.py \\
        --tiny --max_steps 2 --output_dir /tmp/ddpo-smoke                                         # CPU smoke

Expected runtime: the 2-process CPU smoke run used 31 s of CPU time in all (mostly imports and
building the tiny models; about 15-20 s wall on an idle 2-core machine, longer under load). ``--tiny``
builds a random tiny pipeline and tiny rewards offline (``rewardkit.testing``). Real-model runtime is not
measured (no GPU was available when this recipe was written).
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from rewardkit.training.ddim_logprob import (  # rewardkit: DDIM log-probs and the PPO objective
    ppo_clipped_loss,
    sample_with_logprob,
    step_logprob,
)
from rewardkit.training.group_signals import advantages_with_signals  # rewardkit: advantages + saturation
from rewardkit.recipe_support.common import (  # rewardkit: shared recipe support
    CommonConfig,
    PromptList,
    add_lora,
    build_reward,
    check_batch_arithmetic,
    eval_callbacks,
    gathered_stats,
    k_repeat_prompts,
    load_pipeline,
    load_prompts,
    log_metrics,
    make_accelerator,
    parse_config,
    progress_bar,
    resume,
    save_checkpoint,
    setup_logging,
    weight_dtype,
    write_config,
)
from rewardkit.recipe_support.models import stop_requested  # rewardkit: stop_on_hacking_alarm
from rewardkit.training.trackers import tracker_for  # rewardkit: per-prompt stat trackers (ddpo, flow_grpo)

# Two parts, so per-part logging is exercised.
TINY_REWARDS = {"rewardkit.testing.toy_rewards:load_brightness": 1.0, "hpsv2": 0.5}


@dataclass
class Config(CommonConfig):
    """DDPO fields on top of ``CommonConfig`` (ddpo-pytorch ``config/base.py`` names in brackets)."""

    eta: float = 1.0  # DDIM noise weight while sampling; > 0 gives every step a log-prob [sample.eta]
    images_per_prompt: int = 8  # K images per prompt per epoch, over ALL processes: the advantage group
    num_inner_epochs: int = 1  # optimizer steps on each sampled batch [train.num_inner_epochs]
    clip_range: float = 1e-4  # PPO ratio clip [train.clip_range]
    adv_clip_max: float = 5.0  # advantages clamped to [-adv_clip_max, adv_clip_max] [train.adv_clip_max]
    advantage_std: Literal["group", "global", "none"] = "group"  # per-prompt std, batch std, or centring only
    # per-prompt statistics: "ddpo" (ddpo-pytorch / trl 0.23 PerPromptStatTracker), "flow_grpo", or "none"
    # (stateless, this batch only) [per_prompt_stat_tracking]
    advantage_tracker: Literal["ddpo", "flow_grpo", "none"] = "ddpo"
    tracker_buffer_size: int = 16  # ddpo tracker: rewards kept per prompt [per_prompt_stat_tracking.buffer_size]
    tracker_min_count: int = 16  # ddpo tracker: below this many, batch mean / std [per_prompt_stat_tracking.min_count]
    timestep_fraction: float = 1.0  # fraction of the T steps trained on per sample [train.timestep_fraction]
    learning_rate: float = 3e-4  # [train.learning_rate]
    weight_decay: float = 1e-4  # AdamW weight decay [train.adam_weight_decay]
    guidance_scale: float = 5.0  # CFG while sampling AND while recomputing log-probs [sample.guidance_scale]
    num_inference_steps: int = 20  # DDIM steps T per image (ddpo-pytorch samples with 50)

    TINY_OVERRIDES: ClassVar[dict[str, Any]] = {**CommonConfig.TINY_OVERRIDES, "images_per_prompt": 2,
                                                "rewards": TINY_REWARDS}

    def __post_init__(self) -> None:
        super().__post_init__()
        tracker_for(self.advantage_tracker, self.advantage_std, buffer_size=self.tracker_buffer_size,  # validates
                    min_count=self.tracker_min_count)
        if not self.eta > 0 or not self.clip_range > 0 or not 0 < self.timestep_fraction <= 1:
            raise ValueError("config: need eta > 0, clip_range > 0 and 0 < timestep_fraction <= 1, got "
                             f"eta={self.eta}, clip_range={self.clip_range}, timestep_fraction={self.timestep_fraction}")
        if self.images_per_prompt < 2:
            raise ValueError(f"config: images_per_prompt must be >= 2 (a group of one has no advantage), "
                             f"got {self.images_per_prompt}")
        if self.num_inner_epochs < 1 or self.max_steps % self.num_inner_epochs or \
                self.checkpoint_every % self.num_inner_epochs:
            raise ValueError("config: max_steps and checkpoint_every must be multiples of num_inner_epochs (>= 1), so "
                             "checkpoints fall on sampling-epoch boundaries; got "
                             f"{self.max_steps}, {self.checkpoint_every}, {self.num_inner_epochs}")


@dataclass
class Run:
    """Everything ``setup`` builds."""

    accelerator: Any
    pipe: Any
    unet: Any  # the prepared (possibly DDP-wrapped) LoRA UNet; pipe.unet is the same module unwrapped
    params: list[torch.nn.Parameter]
    optimizer: Any
    reward: Any
    tracker: Any  # PerPromptStatTracker, or None for stateless advantages
    callbacks: list[Any]
    prompts: PromptList  # with each prompt's .jsonl record (metadata_for), if any
    sizes: dict[str, int]
    start_step: int


@dataclass
class Rollout:
    """One epoch's samples on this process (``N`` rows, ``T`` steps)."""

    latents: torch.Tensor  # (N, T, C, h, w) x_t
    next_latents: torch.Tensor  # (N, T, C, h, w) x_{t-1}
    log_probs: torch.Tensor  # (N, T) under the sampling policy
    timesteps: torch.Tensor  # (N, T)
    prompt_embeds: torch.Tensor  # (N, L, D)
    negative_prompt_embeds: torch.Tensor | None  # (N, L, D) with CFG
    advantages: torch.Tensor  # (N,)
    scores: torch.Tensor  # (N,) the optimised (composed) reward, fed to the hacking alarm


def setup(cfg: Config) -> Run:
    """Accelerator, tiny or real pipeline with a LoRA UNet, optimizer, reward, callbacks, resume."""
    from diffusers import DDIMScheduler

    accelerator = make_accelerator(cfg, "ddpo")  # rewardkit: trackers (TensorBoard) + per-rank seeds
    setup_logging(accelerator)  # rewardkit:
    write_config(accelerator, cfg)  # rewardkit:
    pipe = load_pipeline(cfg, "sd", accelerator.device, weight_dtype(accelerator))  # rewardkit: frozen pipeline
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # log-probs need DDIM
    params = add_lora(pipe.unet, cfg)  # rewardkit: peft LoRA on the attention projections
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    unet, optimizer = accelerator.prepare(pipe.unet, optimizer)
    reward = build_reward(cfg, accelerator.device, accelerator)  # rewardkit: rk.compose(cfg.rewards, ...)
    callbacks = eval_callbacks(cfg, pipe, reward, accelerator)  # rewardkit: RewardEval / FIDEval callbacks
    local = cfg.train_batch_size * cfg.gradient_accumulation_steps
    sizes = check_batch_arithmetic(  # rewardkit: prints the derived sizes, raises if uneven
        cfg, accelerator, samples_per_process=local,
        prompts_per_epoch=(local * accelerator.num_processes, cfg.images_per_prompt),
        trained_timesteps=max(1, int(cfg.num_inference_steps * cfg.timestep_fraction)),
        epochs=(cfg.max_steps, cfg.num_inner_epochs))
    tracker = tracker_for(cfg.advantage_tracker, cfg.advantage_std, buffer_size=cfg.tracker_buffer_size,  # rewardkit:
                          min_count=cfg.tracker_min_count)
    start = resume(accelerator, cfg, checkpoint_state(unet, optimizer, reward, tracker),  # rewardkit: + RNG, step,
                   callbacks=callbacks,  # and the callbacks' states (alarm history, FID reference);
                   fresh_if_missing=("tracker",))  # a checkpoint older than tracker.pt resumes with a fresh one
    return Run(accelerator, pipe, unet, params, optimizer, reward, tracker, callbacks, load_prompts(cfg), sizes, start)


def checkpoint_state(unet: Any, optimizer: Any, reward: Any, tracker: Any) -> dict[str, Any]:
    """What a checkpoint holds: LoRA, optimizer, reward normaliser and the tracker's reward history."""
    state = {"denoiser": unet, "optimizer": optimizer, "reward": reward}
    if tracker is not None:
        state["tracker"] = tracker  # tracker.pt
    return state


def sample_epoch(run: Run, cfg: Config, epoch: int) -> tuple[Rollout, dict[str, float]]:
    """Sample this process's share of the epoch with log-probs, score it, compute advantages."""
    accelerator = run.accelerator
    prompts = k_repeat_prompts(run.prompts, cfg.images_per_prompt, run.sizes["prompts_per_epoch"], epoch,  # rewardkit:
                               accelerator.process_index, accelerator.num_processes, cfg.seed)
    # Noise seeds from (seed, epoch, rank) alone: distinct per rank and reproduced exactly after a resume.
    rng = random.Random(f"ddpo/{cfg.seed}/{epoch}/{accelerator.process_index}")
    seeds = [rng.randrange(2**31) for _ in prompts]
    trajectories, scores, parts = [], [], {}
    for start in range(0, len(prompts), cfg.train_batch_size):
        batch = prompts[start:start + cfg.train_batch_size]
        generators = [torch.Generator(accelerator.device).manual_seed(seed)
                      for seed in seeds[start:start + cfg.train_batch_size]]
        with accelerator.autocast():
            trajectory = sample_with_logprob(  # rewardkit: DDIM eta > 0, records (x_t, x_t-1, log p, t)
                run.pipe, batch, generators, num_inference_steps=cfg.num_inference_steps,
                guidance_scale=cfg.guidance_scale, eta=cfg.eta, height=cfg.resolution, width=cfg.resolution)
        rows = run.prompts.metadata_for(batch)  # rewardkit: a .jsonl prompt file's records (None for .txt)
        with torch.no_grad():
            output = run.reward.evaluate(trajectory.images, batch,  # rewardkit: total + every part
                                         **({} if rows is None else {"metadata": rows}))
        trajectories.append(trajectory)
        scores.append(output.scores)
        for name in run.reward.part_names:  # rewardkit: per-part raw scores
            parts.setdefault(name, []).append(output.details[name])
    scores_all, parts_all = torch.cat(scores), {name: torch.cat(values) for name, values in parts.items()}
    advantages, signals = advantages_with_signals(  # rewardkit: gathered groups, tracker update, saturation signals
        scores_all, prompts, parts_all, tracker=run.tracker, std=cfg.advantage_std, clip=cfg.adv_clip_max)
    unscored = torch.isnan(advantages)  # rows no reward part could score: no policy signal (TRL's policy)
    stats = gathered_stats(accelerator, {"train/reward": scores_all,  # rewardkit: mean / std over ranks
                                          **{f"train/rewards/{k}": v for k, v in parts_all.items()}})
    stats.update(signals)
    stats["train/unscored_frac"] = float(accelerator.gather(unscored.float()).mean())
    negative = [t.negative_prompt_embeds for t in trajectories]
    rollout = Rollout(*(torch.cat([getattr(t, name) for t in trajectories]) for name in
                        ("latents", "next_latents", "log_probs", "timesteps", "prompt_embeds")),
                      None if negative[0] is None else torch.cat(negative), advantages.nan_to_num(0.0), scores_all)
    return rollout, stats


def policy_update(run: Run, cfg: Config, rollout: Rollout) -> dict[str, float]:
    """One optimizer step: PPO-clipped loss over shuffled samples and per-sample shuffled timesteps.

    Gradients accumulate over ``gradient_accumulation_steps`` micro-batches x the trained timesteps and
    are all-reduced once, on the last backward (``no_sync`` before it).
    """
    accelerator, scheduler = run.accelerator, run.pipe.scheduler
    device, (rows_total, steps) = rollout.latents.device, rollout.log_probs.shape
    scheduler.set_timesteps(cfg.num_inference_steps, device=device)  # evaluation may have changed them
    order = torch.randperm(rows_total, device=device)
    step_order = torch.stack([torch.randperm(steps) for _ in range(rows_total)]).to(device)  # ddpo-pytorch
    trained, micro_batches = run.sizes["trained_timesteps"], order.split(cfg.train_batch_size)
    records = []
    for m, rows in enumerate(micro_batches):
        for j in range(trained):
            cols = step_order[rows, j]
            last = m == len(micro_batches) - 1 and j == trained - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(run.unet), accelerator.autocast():
                negative = None if rollout.negative_prompt_embeds is None else rollout.negative_prompt_embeds[rows]
                log_prob = step_logprob(  # rewardkit: recomputed log p with the same CFG as sampling
                    run.unet, scheduler, rollout.latents[rows, cols], rollout.next_latents[rows, cols],
                    rollout.timesteps[rows, cols], rollout.prompt_embeds[rows], negative,
                    guidance_scale=cfg.guidance_scale, eta=cfg.eta)
                ppo = ppo_clipped_loss(log_prob, rollout.log_probs[rows, cols], rollout.advantages[rows],  # rewardkit:
                                       cfg.clip_range)
                accelerator.backward(ppo.loss / trained)  # accelerate also divides by the accumulation steps
            records.append(torch.stack([ppo.loss.detach(), ppo.approx_kl, ppo.clipfrac, ppo.ratio]))
    if cfg.max_grad_norm > 0:
        accelerator.clip_grad_norm_(run.params, cfg.max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    means = accelerator.reduce(torch.stack(records).mean(0), reduction="mean")
    return dict(zip(("train/loss", "train/approx_kl", "train/clipfrac", "train/ratio"), means.tolist()))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(Config, argv)  # rewardkit: --config yaml, --tiny, --field value
    run = setup(cfg)
    accelerator, step = run.accelerator, run.start_step
    progress = progress_bar(accelerator, cfg, initial=step)  # rewardkit:
    while step < cfg.max_steps:
        rollout, reward_stats = sample_epoch(run, cfg, epoch=step // cfg.num_inner_epochs)
        for callback in run.callbacks:  # rewardkit: the hacking alarm's training side (this rank's rows)
            callback.record_train_reward(rollout.scores)
        for _ in range(cfg.num_inner_epochs):
            metrics = policy_update(run, cfg, rollout)
            step += 1
            progress.update(1)
            log_metrics(accelerator, {**reward_stats, **metrics}, step, progress,  # rewardkit: trackers + tqdm
                        postfix=("train/reward/mean", "train/loss", "train/clipfrac"))
            for callback in run.callbacks:  # on every rank: the reductions are collectives
                callback.maybe_evaluate(step, accelerator, model=run.pipe.unet)  # rewardkit:
        # stop_on_hacking_alarm: checked at the end of a sampling epoch (checkpoints fall on epoch boundaries)
        stop = stop_requested(run.callbacks, step)  # rewardkit: the same answer on every rank
        if step % cfg.checkpoint_every == 0 or step >= cfg.max_steps or stop:
            save_checkpoint(accelerator, cfg, step,  # rewardkit: LoRA, optimizer, normaliser, tracker, RNG, step
                            checkpoint_state(run.unet, run.optimizer, run.reward, run.tracker), run.callbacks)
        if stop:
            break
    progress.close()
    accelerator.end_training()  # destroys the process group (avoids SIGABRT at exit on gloo)


if __name__ == "__main__":
    main()
