"""Online Diffusion-DPO: fine-tune a Stable Diffusion 1.x LoRA on preference pairs labelled by rewardkit rewards.

Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference Optimization"
(SalesforceAIResearch/DiffusionDPO ``train.py``; diffusers ``examples/research_projects/diffusion_dpo``).
Instead of a fixed preference data set, every micro-step generates ``images_per_prompt`` images per
prompt with the current model, labels the best one chosen and the worst one rejected with a composed
rewardkit reward (AI feedback, DiffusionDPO's ``--choice_model``), VAE-encodes both, noises them with
the same noise and timestep, and applies the DPO loss to the trained model's versus the frozen
reference's denoising errors. The reference is the same UNet with its LoRA adapters disabled (the
diffusers example). Logged: loss, implicit accuracy, the reward margin of the pairs, the implicit reward
margin, model / reference MSE, the fraction of valid pairs, total and per-part rewards, and the periodic
evaluation callbacks (with ``hacking_alarm_window``: the reward-hacking alarm, fed the labelling reward). A
``.jsonl`` prompt file's records reach the reward as ``metadata=`` (GenEval), in training and evaluation.

Launch (real model; every size is in the YAML):

    accelerate launch recipes/diffusion_dpo.py --config recipes/configs/diffusion_dpo.yaml                # one GPU
    accelerate launch --multi_gpu --num_processes 8 recipes/diffusion_dpo.py --config recipes/configs/diffusion_dpo.yaml
    ACCELERATE_USE_CPU=1 accelerate launch --num_processes 2 --multi_gpu recipes/diffusion_dpo.py \\
        --tiny --max_steps 2 --output_dir /tmp/dpo-smoke                                                # CPU smoke

Expected runtime: the 2-process CPU smoke run used 26 s of CPU time in all (mostly imports and
building the tiny models; about 15-20 s wall on an idle 2-core machine, longer under load). ``--tiny``
builds a random tiny pipeline and tiny rewards offline (``rewardkit.testing``). Real-model runtime is not
measured (no GPU was available when this recipe was written).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from rewardkit.integrations.generation import generate_images  # rewardkit: seeded generation, one seed per image
from rewardkit.training.preference import (  # rewardkit: pair labelling and the DPO loss
    diffusion_dpo_loss,
    label_pairs,
    per_sample_mse,
)
from rewardkit.recipe_support.models import stop_requested  # rewardkit: stop_on_hacking_alarm
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

# Two parts, so per-part logging is exercised.
TINY_REWARDS = {"rewardkit.testing.toy_rewards:load_brightness": 1.0, "hpsv2": 0.5}


@dataclass
class Config(CommonConfig):
    """Diffusion-DPO fields on top of ``CommonConfig``."""

    beta: float = 5000.0  # DPO KL weight; 5000 with "paper" = 2500 with "diffusers" (the references' defaults)
    dpo_convention: Literal["paper", "diffusers"] = "paper"  # which published formula (preference.py docstring)
    images_per_prompt: int = 2  # images generated per prompt; its best and worst form the pair (>= 2)
    min_margin: float = 0.0  # a pair needs a reward gap above this to count (0: only exact ties are dropped)
    nan_loses: bool = False  # an image no reward could score may be the rejected one (never the chosen one)
    learning_rate: float = 5e-4  # diffusers train_diffusion_dpo.py default (LoRA)
    weight_decay: float = 1e-2  # AdamW weight decay, diffusers train_diffusion_dpo.py default
    lora_rank: int = 4  # diffusers train_diffusion_dpo.py --rank default (lora_alpha = rank there)
    lora_alpha: float = 4.0
    guidance_scale: float = 7.5  # CFG of the online generation (the training loss itself is unguided)
    num_inference_steps: int = 20  # generation steps per image
    train_batch_size: int = 8  # images generated per process per micro-step (per GPU!) = pairs x images_per_prompt

    TINY_OVERRIDES: ClassVar[dict[str, Any]] = {**CommonConfig.TINY_OVERRIDES, "rewards": TINY_REWARDS}

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0 or self.images_per_prompt < 2 or not self.min_margin >= 0:
            raise ValueError("config: need beta > 0, images_per_prompt >= 2 and min_margin >= 0, got "
                             f"beta={self.beta}, images_per_prompt={self.images_per_prompt}, min_margin={self.min_margin}")


@dataclass
class Run:
    """Everything ``setup`` builds."""

    accelerator: Any
    pipe: Any
    unet: Any  # the prepared (possibly DDP-wrapped) LoRA UNet; pipe.unet is the same module unwrapped
    noise_scheduler: Any  # DDPM training noise schedule of the pipeline's betas
    params: list[torch.nn.Parameter]
    optimizer: Any
    reward: Any
    callbacks: list[Any]
    prompts: PromptList  # with each prompt's .jsonl record (metadata_for), if any
    sizes: dict[str, int]
    start_step: int


def setup(cfg: Config) -> Run:
    """Accelerator, tiny or real pipeline with a LoRA UNet, optimizer, reward, callbacks, resume."""
    from diffusers import DDPMScheduler

    accelerator = make_accelerator(cfg, "diffusion_dpo")  # rewardkit: trackers (TensorBoard) + per-rank seeds
    setup_logging(accelerator)  # rewardkit:
    write_config(accelerator, cfg)  # rewardkit:
    pipe = load_pipeline(cfg, "sd", accelerator.device, weight_dtype(accelerator))  # rewardkit: frozen pipeline
    if pipe.scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"diffusion_dpo: prediction_type {pipe.scheduler.config.prediction_type!r} is not supported; "
                         "use an epsilon or v-prediction model")
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    params = add_lora(pipe.unet, cfg)  # rewardkit: peft LoRA; disabling it gives the frozen reference
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    unet, optimizer = accelerator.prepare(pipe.unet, optimizer)
    reward = build_reward(cfg, accelerator.device, accelerator)  # rewardkit: rk.compose(cfg.rewards, ...)
    callbacks = eval_callbacks(cfg, pipe, reward, accelerator)  # rewardkit: RewardEval / FIDEval callbacks
    sizes = check_batch_arithmetic(  # rewardkit: prints the derived sizes, raises if uneven
        cfg, accelerator, pairs_per_process=(cfg.train_batch_size, cfg.images_per_prompt),
        pairs_per_optimizer_step=(cfg.train_batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps,
                                  cfg.images_per_prompt))
    state = {"denoiser": unet, "optimizer": optimizer, "reward": reward}
    start = resume(accelerator, cfg, state, callbacks=callbacks)  # rewardkit: LoRA, optimizer, normaliser, RNG, step,
    # and the callbacks' states (last evaluated step, hacking-alarm history, FID reference)
    return Run(accelerator, pipe, unet, noise_scheduler, params, optimizer, reward, callbacks, load_prompts(cfg), sizes,
               start)


def make_pairs(run: Run, cfg: Config, micro_step: int) -> dict[str, Any]:
    """Generate ``images_per_prompt`` images for each of this process's prompts, score, label pairs."""
    accelerator, pairs = run.accelerator, run.sizes["pairs_per_process"]
    rank, world = accelerator.process_index, accelerator.num_processes
    distinct = k_repeat_prompts(run.prompts, 1, pairs * world, micro_step, rank, world, cfg.seed)  # rewardkit:
    prompts = [prompt for prompt in distinct for _ in range(cfg.images_per_prompt)]  # groups stay on one rank
    rng = random.Random(f"dpo/{cfg.seed}/{micro_step}/{rank}")  # distinct per rank, reproduced after a resume
    seeds = [rng.randrange(2**31) for _ in prompts]
    with accelerator.autocast():
        images = generate_images(run.pipe, prompts, seeds, num_inference_steps=cfg.num_inference_steps,  # rewardkit:
                                 guidance_scale=cfg.guidance_scale, height=cfg.resolution, width=cfg.resolution)
    rows = run.prompts.metadata_for(prompts)  # rewardkit: a .jsonl prompt file's records (None for .txt)
    with torch.no_grad():
        output = run.reward.evaluate(images, prompts,  # rewardkit: total + every part
                                     **({} if rows is None else {"metadata": rows}))
    labelled = label_pairs(output.scores, prompts, min_margin=cfg.min_margin,  # rewardkit: NaN never wins
                           nan_loses=cfg.nan_loses)
    parts = {name: output.details[name] for name in run.reward.part_names}  # rewardkit: per-part raw scores
    return {"chosen": images[labelled.chosen], "rejected": images[labelled.rejected], "pairs": labelled,
            "scores": output.scores, "parts": parts}


def dpo_step(run: Run, cfg: Config, batch: dict[str, Any]) -> Any:
    """VAE-encode chosen + rejected, shared noise and timestep, model vs reference MSE, DPO loss."""
    pipe, accelerator = run.pipe, run.accelerator
    pairs = batch["pairs"]
    with torch.no_grad():
        pixels = torch.cat([batch["chosen"], batch["rejected"]]) * 2 - 1  # [0, 1] -> the VAE's [-1, 1]
        latents = pipe.vae.encode(pixels.to(pipe.vae.dtype)).latent_dist.sample() * pipe.vae.config.scaling_factor
        latents = latents.float()
        count = len(pairs.prompts)
        noise = torch.randn_like(latents[:count]).repeat(2, 1, 1, 1)  # the same noise for winner and loser
        timesteps = torch.randint(0, run.noise_scheduler.config.num_train_timesteps, (count,),
                                  device=latents.device).repeat(2)  # and the same timestep
        noisy = run.noise_scheduler.add_noise(latents, noise, timesteps)
        embeds = pipe.encode_prompt(pairs.prompts, accelerator.device, 1, False)[0].repeat(2, 1, 1)
        v_target = run.noise_scheduler.config.prediction_type == "v_prediction"
        target = run.noise_scheduler.get_velocity(latents, noise, timesteps) if v_target else noise
    with accelerator.autocast():
        model_pred = run.unet(noisy.to(embeds.dtype), timesteps, encoder_hidden_states=embeds).sample
    model_w, model_l = per_sample_mse(model_pred, target).chunk(2)  # rewardkit: float32 per-sample MSE
    reference = accelerator.unwrap_model(run.unet)
    reference.disable_adapters()  # the frozen base model is the reference
    try:
        with torch.no_grad(), accelerator.autocast():
            ref_pred = reference(noisy.to(embeds.dtype), timesteps, encoder_hidden_states=embeds).sample
    finally:
        reference.enable_adapters()
    ref_w, ref_l = per_sample_mse(ref_pred, target).chunk(2)  # rewardkit:
    return diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, beta=cfg.beta,  # rewardkit: the DPO loss
                              convention=cfg.dpo_convention, mask=pairs.valid.to(model_w.device))


def _nanmean_across(accelerator: Any, values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over processes, NaN (e.g. no valid pair on a rank) left out."""
    every = accelerator.gather(torch.tensor([list(values.values())], device=accelerator.device, dtype=torch.float64))
    return dict(zip(values, every.nanmean(dim=0).tolist()))


def train_step(run: Run, cfg: Config, step: int) -> dict[str, float]:
    """One optimizer step over ``gradient_accumulation_steps`` freshly generated and labelled micro-batches."""
    accelerator, records, scores, parts = run.accelerator, [], [], {}
    for micro in range(cfg.gradient_accumulation_steps):
        batch = make_pairs(run, cfg, step * cfg.gradient_accumulation_steps + micro)
        with accelerator.accumulate(run.unet):
            out = dpo_step(run, cfg, batch)
            accelerator.backward(out.loss)
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(run.params, cfg.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        pairs, valid = batch["pairs"], batch["pairs"].valid
        none = float("nan")  # a micro-batch without a valid pair has no loss value to log (its loss is 0 * graph)
        records.append({
            "train/loss": out.loss.item() if valid.any() else none, "train/implicit_acc": out.implicit_acc.item(),
            "train/reward_margin": float(pairs.margin[valid].nanmean()) if valid.any() else none,
            "train/implicit_reward_margin": float(out.inside[valid].mean()) if valid.any() else none,
            "train/model_mse_margin": float(out.model_margin.mean()),
            "train/ref_mse_margin": float(out.ref_margin.mean()),
            "train/valid_pair_frac": float(valid.float().mean())})
        scores.append(batch["scores"])
        for name, values in batch["parts"].items():
            parts.setdefault(name, []).append(values)
    for callback in run.callbacks:  # rewardkit: the hacking alarm's training side (this rank's images)
        callback.record_train_reward(torch.cat(scores))
    local = {key: float(torch.tensor([r[key] for r in records]).nanmean()) for key in records[0]}
    return {**_nanmean_across(accelerator, local),
            **gathered_stats(accelerator, {"train/reward": torch.cat(scores),
                                            **{f"train/rewards/{k}": torch.cat(v) for k, v in parts.items()}})}


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(Config, argv)  # rewardkit: --config yaml, --tiny, --field value
    run = setup(cfg)
    accelerator, step = run.accelerator, run.start_step
    progress = progress_bar(accelerator, cfg, initial=step)  # rewardkit:
    while step < cfg.max_steps:
        metrics = train_step(run, cfg, step)
        step += 1
        progress.update(1)
        log_metrics(accelerator, metrics, step, progress,  # rewardkit: trackers + tqdm
                    postfix=("train/loss", "train/implicit_acc", "train/reward_margin"))
        for callback in run.callbacks:  # on every rank: the reductions are collectives
            callback.maybe_evaluate(step, accelerator, model=run.pipe.unet)  # rewardkit:
        stop = stop_requested(run.callbacks, step)  # rewardkit: stop_on_hacking_alarm, the same on every rank
        if step % cfg.checkpoint_every == 0 or step >= cfg.max_steps or stop:
            save_checkpoint(accelerator, cfg, step,  # rewardkit: LoRA, optimizer, normaliser, RNG, step, callbacks
                            {"denoiser": run.unet, "optimizer": run.optimizer, "reward": run.reward}, run.callbacks)
        if stop:
            break
    progress.close()
    accelerator.end_training()  # destroys the process group (avoids SIGABRT at exit on gloo)


if __name__ == "__main__":
    main()
