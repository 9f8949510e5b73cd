"""DDIM steps with Gaussian log-probabilities, and a sampling loop that records them (DDPO).

DDPO (kvablack/ddpo-pytorch ``ddpo_pytorch/diffusers_patch/ddim_with_logprob.py`` and
``pipeline_with_logprob.py``) treats every DDIM step with ``eta > 0`` as a Gaussian policy
``x_{t-1} ~ N(mu_theta(x_t, t), sigma_t^2 I)``, where ``mu`` is the deterministic part of DDIM's update
(DDIM paper eq. 12) and ``sigma_t = eta * sqrt(var_t)`` (eq. 16). diffusers exposes no log-prob
(reference/rl_integration.md section 3.3), so this module computes ``mu`` and ``sigma`` itself with the
same formulas and operation order as ``diffusers.DDIMScheduler.step`` (diffusers 0.42,
``schedulers/scheduling_ddim.py``), per sample, so a batch may mix timesteps (ddpo-pytorch shuffles the
step order per sample during training). ``tests/test_ddim_logprob.py`` checks that ``mu`` equals
``DDIMScheduler.step(..., variance_noise=0)`` bit for bit.

The log-prob is the Gaussian log-density *averaged* (not summed) over the latent's ``C x h x w``
elements, as ddpo-pytorch does; ``prev_sample`` is treated as a constant, so gradients flow through the
mean only. Everything here runs in float32 whatever the model's dtype (flow_grpo #177/#204 and
DanceGRPO #57: bf16 log-probs give NaN and PPO ratios != 1).

Classifier-free guidance is applied identically while sampling and while recomputing log-probs for the
policy update (``guided_noise``): ``uncond + g * (text - uncond)`` on a ``[negative, positive]`` batch,
enabled when ``guidance_scale > 1`` as in ``StableDiffusionPipeline``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = ["DDIMTrajectory", "PPOStats", "ddim_mean_std", "ddim_step_with_logprob", "guided_noise",
           "sample_with_logprob", "step_logprob", "gaussian_logprob", "ppo_clipped_loss"]

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)  # normalising constant of a unit Gaussian, per element
_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")  # DDIMScheduler's config.prediction_type values


@dataclass
class DDIMTrajectory:
    """One batch of DDIM samples with everything a DDPO update needs (``T`` = steps).

    Attributes:
        latents: float32 ``(B, T, C, h, w)``, ``x_t`` before each step.
        next_latents: float32 ``(B, T, C, h, w)``, ``x_{t-1}`` drawn at each step.
        log_probs: float32 ``(B, T)``, ``log p(x_{t-1} | x_t)`` under the sampling model.
        timesteps: int64 ``(B, T)``, the scheduler timestep of each step.
        prompt_embeds: ``(B, L, D)`` text embeddings (the denoiser's dtype).
        negative_prompt_embeds: ``(B, L, D)`` or ``None`` when guidance is off.
        images: float32 ``(B, 3, H, W)`` in ``[0, 1]``, the decoded final latents.
    """

    latents: torch.Tensor
    next_latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    images: torch.Tensor


def _check_scheduler(scheduler: Any, need_timesteps: bool = True) -> None:
    if not hasattr(scheduler, "alphas_cumprod") or not hasattr(scheduler, "final_alpha_cumprod"):
        raise TypeError(f"DDIM log-probs need a diffusers DDIMScheduler, got {type(scheduler).__name__}; use "
                        "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)")
    if need_timesteps and scheduler.num_inference_steps is None:
        raise ValueError("the scheduler has no timesteps yet; call scheduler.set_timesteps(num_inference_steps)")
    if scheduler.config.thresholding:
        raise ValueError("DDIM log-probs do not support dynamic thresholding; build the scheduler with "
                         "thresholding=False")
    if scheduler.config.prediction_type not in _PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {scheduler.config.prediction_type!r}; expected one of "
                         f"{_PREDICTION_TYPES}")


def _per_sample_timesteps(timestep: int | torch.Tensor, batch: int, device: torch.device, limit: int) -> torch.Tensor:
    t = torch.as_tensor(timestep, device=device).long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"timestep must be an int or a tensor of shape () or ({batch},), got {tuple(t.shape)}")
    if bool((t < 0).any()) or bool((t >= limit).any()):
        raise ValueError(f"timesteps must lie in [0, {limit}), got {t.tolist()}")
    return t


def ddim_mean_std(scheduler: Any, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
                  eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the DDIM step ``x_t -> x_{t-1}`` (DDIM eq. 12 and 16), float32.

    Args:
        scheduler: a ``diffusers.DDIMScheduler`` after ``set_timesteps``.
        model_output: ``(B, C, h, w)`` denoiser output (noise, sample or v, per ``prediction_type``).
        timestep: the current timestep, an int or a ``(B,)`` tensor (one per sample).
        sample: ``(B, C, h, w)`` the current latents ``x_t``.
        eta: noise weight, ``> 0`` (``0`` is deterministic DDIM, ``1`` is DDPM-like).

    Returns:
        ``(mean, std)``: float32 ``(B, C, h, w)`` and ``(B, 1, 1, 1)``.

    Raises:
        TypeError / ValueError: not a DDIM scheduler, no timesteps set, thresholding on, ``eta <= 0``,
            mismatched shapes or timesteps out of range.
    """
    _check_scheduler(scheduler)
    if not eta > 0:
        raise ValueError(f"eta must be > 0 for a stochastic step with a log-prob, got {eta}; DDPO uses eta=1.0")
    if model_output.shape != sample.shape or sample.ndim != 4:
        raise ValueError(f"model_output and sample must both be (B, C, h, w), got {tuple(model_output.shape)} "
                         f"and {tuple(sample.shape)}")
    config = scheduler.config
    eps_or_x, x_t = model_output.float(), sample.float()
    t = _per_sample_timesteps(timestep, x_t.shape[0], x_t.device, config.num_train_timesteps)
    prev_t = t - config.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod.to(device=x_t.device, dtype=torch.float32)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, device=x_t.device, dtype=torch.float32)
    alpha_prod_t = alphas[t].view(-1, 1, 1, 1)
    alpha_prod_t_prev = torch.where(prev_t >= 0, alphas[prev_t.clamp(min=0)], final).view(-1, 1, 1, 1)
    beta_prod_t = 1 - alpha_prod_t
    if config.prediction_type == "epsilon":
        pred_x0 = (x_t - beta_prod_t ** (0.5) * eps_or_x) / alpha_prod_t ** (0.5)
        pred_eps = eps_or_x
    elif config.prediction_type == "sample":
        pred_x0 = eps_or_x
        pred_eps = (x_t - alpha_prod_t ** (0.5) * pred_x0) / beta_prod_t ** (0.5)
    else:  # v_prediction
        pred_x0 = (alpha_prod_t**0.5) * x_t - (beta_prod_t**0.5) * eps_or_x
        pred_eps = (alpha_prod_t**0.5) * eps_or_x + (beta_prod_t**0.5) * x_t
    if config.clip_sample:
        pred_x0 = pred_x0.clamp(-config.clip_sample_range, config.clip_sample_range)
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std = eta * variance ** (0.5)
    direction = (1 - alpha_prod_t_prev - std**2) ** (0.5) * pred_eps
    mean = alpha_prod_t_prev ** (0.5) * pred_x0 + direction
    return mean, std


def gaussian_logprob(value: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``log N(value; mean, std^2)`` averaged over every dimension but the first: ``(B, ...)`` -> ``(B,)``.

    ``value`` is detached (the sample is data; the gradient goes to ``mean``). Float32.
    """
    value, mean, std = value.detach().float(), mean.float(), std.float()
    log_density = -((value - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return log_density.mean(dim=tuple(range(1, log_density.ndim)))


def ddim_step_with_logprob(
    scheduler: Any,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    *,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One stochastic DDIM step and its log-prob (ddpo-pytorch's ``ddim_step_with_logprob`` contract).

    Args:
        scheduler, model_output, timestep, sample, eta: as in ``ddim_mean_std``.
        prev_sample: ``(B, C, h, w)`` a given ``x_{t-1}`` to score (training); ``None`` draws one.
        generator: generator(s) for the drawn noise (one per sample keeps rows batch-independent);
            only without ``prev_sample``.

    Returns:
        ``(prev_sample, log_prob)``: float32 ``(B, C, h, w)`` and float32 ``(B,)``.
    """
    mean, std = ddim_mean_std(scheduler, model_output, timestep, sample, eta)
    if prev_sample is None:
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        prev_sample = mean + std * noise
    elif generator is not None:
        raise ValueError("pass either prev_sample (to score a given step) or generator (to draw one), not both")
    elif prev_sample.shape != mean.shape:
        raise ValueError(f"prev_sample must have the sample's shape {tuple(mean.shape)}, "
                         f"got {tuple(prev_sample.shape)}")
    prev_sample = prev_sample.float()
    return prev_sample, gaussian_logprob(prev_sample, mean, std)


def guided_noise(denoiser: Any, latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor,
                 negative_prompt_embeds: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
    """The denoiser's output with classifier-free guidance, float32 ``(B, C, h, w)``.

    ``latents`` ``(B, C, h, w)``, ``timesteps`` ``(B,)``; guidance runs when ``guidance_scale > 1`` and
    ``negative_prompt_embeds`` is given: one batched call on ``[negative, positive]`` rows, then
    ``uncond + guidance_scale * (text - uncond)`` (diffusers ``StableDiffusionPipeline``).
    """
    dtype = prompt_embeds.dtype
    if guidance_scale > 1 and negative_prompt_embeds is not None:
        model_input = torch.cat([latents, latents]).to(dtype)
        out = denoiser(model_input, torch.cat([timesteps, timesteps]),
                       encoder_hidden_states=torch.cat([negative_prompt_embeds, prompt_embeds])).sample.float()
        uncond, text = out.chunk(2)
        return uncond + guidance_scale * (text - uncond)
    return denoiser(latents.to(dtype), timesteps, encoder_hidden_states=prompt_embeds).sample.float()


def step_logprob(denoiser: Any, scheduler: Any, latents: torch.Tensor, next_latents: torch.Tensor,
                 timesteps: torch.Tensor, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor | None,
                 *, guidance_scale: float, eta: float) -> torch.Tensor:
    """Recompute ``log p(next_latents | latents)`` under ``denoiser`` (the PPO ratio's numerator).

    Args:
        latents, next_latents: ``(B, C, h, w)`` one recorded step per sample (``DDIMTrajectory[:, j]``).
        timesteps: ``(B,)`` their timesteps (may differ per sample).
        prompt_embeds, negative_prompt_embeds: as recorded in the trajectory.
        guidance_scale, eta: the sampling values (the same CFG as sampling; ratio is 1 for the same model).

    Returns:
        float32 ``(B,)`` log-probs, differentiable with respect to the denoiser's parameters.
    """
    noise_pred = guided_noise(denoiser, latents, timesteps, prompt_embeds, negative_prompt_embeds, guidance_scale)
    _, log_prob = ddim_step_with_logprob(scheduler, noise_pred, timesteps, latents, eta=eta, prev_sample=next_latents)
    return log_prob


@dataclass
class PPOStats:
    """``ppo_clipped_loss`` output: ``loss`` (differentiable), and detached ``approx_kl``, ``clipfrac``, ``ratio``."""

    loss: torch.Tensor
    approx_kl: torch.Tensor
    clipfrac: torch.Tensor
    ratio: torch.Tensor


def ppo_clipped_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                     clip_range: float) -> PPOStats:
    """DDPO's per-step PPO objective (ddpo-pytorch ``scripts/train.py``), all ``(B,)`` float32.

    ``ratio = exp(logp - logp_old)``; ``loss = mean(max(-A * ratio, -A * clamp(ratio, 1 - c, 1 + c)))``;
    ``approx_kl = mean((logp - logp_old)^2) / 2``; ``clipfrac = mean(|ratio - 1| > c)``.
    """
    if not (log_prob.shape == old_log_prob.shape == advantages.shape) or log_prob.ndim != 1:
        raise ValueError(f"ppo_clipped_loss: log_prob, old_log_prob and advantages must all be (B,), got "
                         f"{[tuple(t.shape) for t in (log_prob, old_log_prob, advantages)]}")
    if not clip_range > 0:
        raise ValueError(f"ppo_clipped_loss: clip_range must be > 0, got {clip_range}; DDPO uses 1e-4")
    delta = log_prob.float() - old_log_prob.float()
    ratio = torch.exp(delta)
    advantages = advantages.float()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    stats = (0.5 * (delta**2).mean(), ((ratio - 1.0).abs() > clip_range).float().mean(), ratio.mean())
    return PPOStats(loss, *(value.detach() for value in stats))


def _decode(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    vae = pipe.vae
    image = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pt", do_denormalize=[True] * image.shape[0]).float()


@torch.no_grad()
def sample_with_logprob(
    pipe: Any,
    prompts: Sequence[str],
    generators: Sequence[torch.Generator],
    *,
    num_inference_steps: int,
    guidance_scale: float,
    eta: float = 1.0,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | Sequence[str] | None = None,
    denoiser: Any = None,
) -> DDIMTrajectory:
    """Sample ``B`` images with stochastic DDIM and record every step (ddpo-pytorch ``pipeline_with_logprob``).

    Draws the initial latents and each step's noise from the per-sample ``generators`` in the same
    order as ``StableDiffusionPipeline(..., eta=eta, generator=generators)``, so with the same model it
    reproduces that pipeline's images; each row depends only on its own prompt and generator.

    Args:
        pipe: an SD 1.x/2.x-style diffusers pipeline (``encode_prompt``, ``unet``, ``vae``,
            ``image_processor``) whose scheduler is a ``DDIMScheduler``.
        prompts: ``B`` prompts.
        generators: ``B`` ``torch.Generator`` on the pipeline's device, one per row.
        num_inference_steps: DDIM steps ``T``.
        guidance_scale: CFG scale (``<= 1`` turns guidance off).
        eta: DDIM noise weight, ``> 0``.
        height, width: output size in pixels (default: ``unet.config.sample_size * vae_scale_factor``).
        negative_prompt: one string or ``B`` strings (default: the empty prompt).
        denoiser: the denoiser to sample with (e.g. the unwrapped training UNet); default ``pipe.unet``.

    Returns:
        A ``DDIMTrajectory``.

    Raises:
        ValueError: ``prompts`` and ``generators`` differ in length or are empty; see ``ddim_mean_std``.
    """
    prompts = list(prompts)
    if not prompts or len(prompts) != len(generators):
        raise ValueError(f"sample_with_logprob: need B >= 1 prompts and B generators, got {len(prompts)} and "
                         f"{len(generators)}")
    from diffusers.utils.torch_utils import randn_tensor

    denoiser = pipe.unet if denoiser is None else denoiser
    device, scheduler, cfg = pipe._execution_device, pipe.scheduler, guidance_scale > 1
    _check_scheduler(scheduler, need_timesteps=False)
    prompt_embeds, negative_embeds = pipe.encode_prompt(prompts, device, 1, cfg, negative_prompt=negative_prompt)
    scale = pipe.vae_scale_factor
    default = pipe.unet.config.sample_size * scale
    shape = (len(prompts), pipe.unet.config.in_channels, (height or default) // scale, (width or default) // scale)
    latents = randn_tensor(shape, generator=list(generators), device=device, dtype=prompt_embeds.dtype).float()
    scheduler.set_timesteps(num_inference_steps, device=device)
    latents = latents * scheduler.init_noise_sigma
    steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for t in scheduler.timesteps:
        t_batch = t.expand(shape[0]).to(device)
        model_input = scheduler.scale_model_input(latents, t)
        noise_pred = guided_noise(denoiser, model_input, t_batch, prompt_embeds, negative_embeds if cfg else None,
                                  guidance_scale)
        next_latents, log_prob = ddim_step_with_logprob(scheduler, noise_pred, t_batch, latents, eta=eta,
                                                        generator=list(generators))
        steps.append((latents, next_latents, log_prob, t_batch))
        latents = next_latents
    stacked = [torch.stack(parts, dim=1) for parts in zip(*steps)]
    return DDIMTrajectory(stacked[0], stacked[1], stacked[2], stacked[3].long(), prompt_embeds,
                          negative_embeds if cfg else None, _decode(pipe, latents))

