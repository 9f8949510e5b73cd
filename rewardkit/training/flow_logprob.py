"""Flow-GRPO's stochastic sampling step with log-probabilities, for flow-matching pipelines (SD3 style).

diffusers' ``FlowMatchEulerDiscreteScheduler`` has no log-prob API (reference/rl_integration.md §3.3),
so GRPO on flow matching replaces the deterministic Euler step ``x' = x + (σ' - σ) v`` by the SDE
step of Flow-GRPO (``yifan123/flow_grpo`` ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``,
``sde_step_with_logprob``; maths restated here, code our own). With ``dt = σ' - σ < 0`` and noise
level ``η``::

    s_t   = η · sqrt(σ / (1 - σ̃))          σ̃ = σ, except σ̃ = σ_1 (the second sigma) where σ = 1
    mean  = x · (1 + s_t² dt / (2σ)) + v · (1 + s_t² (1 - σ) / (2σ)) · dt
    std   = s_t · sqrt(-dt)
    x'    = mean + std · ε,   ε ~ N(0, I)
    log p = mean over C, H, W of  -(x' - mean)² / (2 std²) - log std - log sqrt(2π)

``η → 0`` gives the Euler step. The final step (``σ' = 0``) is taken deterministically and not
recorded (its transition has no density under the scheduler's schedule; reference §3.3). Everything
here is computed in float32 whatever the model's dtype (flow_grpo #177 / #204: bf16 log-probs give
NaN and on-policy ratios away from 1).

``sample_with_logprob`` runs a ``StableDiffusion3Pipeline``-style pipeline (``encode_prompt`` returning
4 tensors, ``transformer``, ``vae`` with ``shift_factor``) with classifier-free guidance exactly as
``guided_velocity`` applies it in training, and records every stochastic transition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch

__all__ = ["DEFAULT_NOISE_LEVEL", "SDEStep", "PromptEmbeds", "FlowTrajectory", "sde_step_with_logprob",
           "euler_step", "gaussian_kl", "encode_prompts", "guided_velocity", "step_log_prob", "sample_with_logprob"]

DEFAULT_NOISE_LEVEL = 0.7  # flow_grpo sde_step_with_logprob default (config/grpo.py)
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class SDEStep:
    """One stochastic transition. Tensors are float32; ``log_prob`` is ``(B,)``, ``std`` ``(B, 1, 1, 1)``."""

    prev_sample: torch.Tensor  # x_{t-1}, (B, C, h, w)
    log_prob: torch.Tensor  # log p(x_{t-1} | x_t), averaged over C, h, w
    mean: torch.Tensor  # (B, C, h, w)
    std: torch.Tensor  # the transition's standard deviation s_t · sqrt(-dt)


def _sigma_pair(sigmas: torch.Tensor, step_index: int | torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"flow step: sigmas must be the scheduler's 1-D schedule (N+1 values), got {tuple(sigmas.shape)}")
    index = torch.as_tensor(step_index, device=sigmas.device).long().reshape(-1).expand(batch)
    if bool((index < 0).any()) or bool((index >= sigmas.numel() - 1).any()):
        raise ValueError(f"flow step: step_index must lie in [0, {sigmas.numel() - 2}], got {index.tolist()}")
    sigmas = sigmas.float()
    return sigmas[index].view(-1, 1, 1, 1), sigmas[index + 1].view(-1, 1, 1, 1)


def _check_pair(velocity: torch.Tensor, sample: torch.Tensor) -> None:
    if velocity.shape != sample.shape or velocity.ndim != 4:
        raise ValueError(f"flow step: velocity and sample must both be (B, C, h, w), got {tuple(velocity.shape)} "
                         f"and {tuple(sample.shape)}")


def _randn(shape: torch.Size, generator: Any, device: torch.device) -> torch.Tensor:
    """Standard normal noise; a list of generators draws each row from its own generator."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"flow step: got {len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in generator]).to(device)
    return torch.randn(shape, generator=generator, device=getattr(generator, "device", device)).to(device)


def sde_step_with_logprob(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigmas: torch.Tensor,
    step_index: int | torch.Tensor,
    *,
    noise_level: float = DEFAULT_NOISE_LEVEL,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> SDEStep:
    """Flow-GRPO's SDE step from ``sigmas[i]`` to ``sigmas[i + 1]`` and the log-density of the result.

    Args:
        velocity: the (guided) model output ``v``, ``(B, C, h, w)``, any float dtype.
        sample: ``x_t``, ``(B, C, h, w)``.
        sigmas: the scheduler's ``sigmas`` ``(N + 1,)``, decreasing from about 1 to 0.
        step_index: ``i`` (an int, or ``(B,)`` indices); ``sigmas[i + 1]`` must be > 0.
        noise_level: ``η > 0``.
        prev_sample: a given ``x_{t-1}`` to score (training); ``None`` samples one.
        generator: noise generator, or one per row.

    Returns:
        ``SDEStep`` in float32; ``log_prob`` carries gradient to ``velocity`` (never through ``prev_sample``).

    Raises:
        ValueError: mismatched shapes, a bad index, ``noise_level <= 0``, or a final step (``σ' = 0``).
    """
    _check_pair(velocity, sample)
    if not noise_level > 0:
        raise ValueError(f"sde_step_with_logprob: noise_level must be > 0, got {noise_level}; use euler_step for η = 0")
    sigma, sigma_next = _sigma_pair(sigmas, step_index, sample.shape[0])
    if bool((sigma_next <= 0).any()):
        raise ValueError("sde_step_with_logprob: the final step (next sigma 0) is deterministic and has no density; "
                         "take it with euler_step")
    sigma, sigma_next = sigma.to(sample.device), sigma_next.to(sample.device)
    velocity, sample = velocity.float(), sample.float()
    dt = sigma_next - sigma
    sigma_one = sigmas.float()[1].to(sample.device)  # stands in for σ = 1, where σ / (1 - σ) is infinite
    s_t = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_one, sigma)))
    mean = sample * (1 + s_t**2 * dt / (2 * sigma)) + velocity * (1 + s_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = s_t * torch.sqrt(-dt)
    if prev_sample is None:
        prev_sample = mean.detach() + std * _randn(sample.shape, generator, sample.device)
    elif prev_sample.shape != sample.shape:
        raise ValueError(f"sde_step_with_logprob: prev_sample {tuple(prev_sample.shape)} != sample {tuple(sample.shape)}")
    prev_sample = prev_sample.detach().float()
    density = -((prev_sample - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return SDEStep(prev_sample, density.mean(dim=(1, 2, 3)), mean, std)


def euler_step(velocity: torch.Tensor, sample: torch.Tensor, sigmas: torch.Tensor,
               step_index: int | torch.Tensor) -> torch.Tensor:
    """The deterministic flow-matching step ``x + (σ' - σ) v`` in float32, ``(B, C, h, w)``."""
    _check_pair(velocity, sample)
    sigma, sigma_next = _sigma_pair(sigmas, step_index, sample.shape[0])
    return sample.float() + (sigma_next - sigma).to(sample.device) * velocity.float()


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``KL(N(mean, std²) || N(ref_mean, std²))`` per element, averaged over C, h, w: ``(B,)`` float32.

    flow_grpo divides by ``2 s_t²`` instead of ``2 std²`` (a factor ``-dt`` apart); this is the exact KL
    of the two transitions.
    """
    return (((mean.float() - ref_mean.float()) ** 2) / (2 * std.float() ** 2)).mean(dim=(1, 2, 3))


@dataclass
class PromptEmbeds:
    """Text conditioning of a batch (SD3 ``encode_prompt`` outputs); negatives are ``None`` without CFG."""

    embeds: torch.Tensor  # (B, L, D)
    pooled: torch.Tensor  # (B, P)
    negative: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None

    def select(self, rows: Any) -> PromptEmbeds:
        """The rows ``rows`` (an index tensor, list or slice) of every tensor."""
        return PromptEmbeds(*(None if t is None else t[rows] for t in (getattr(self, f.name) for f in fields(self))))


def encode_prompts(pipe: Any, prompts: Sequence[str], guidance_scale: float, max_sequence_length: int = 256) -> PromptEmbeds:
    """``pipe.encode_prompt`` (no grad) for ``prompts``, with empty-prompt negatives when ``guidance_scale > 1``."""
    cfg = guidance_scale > 1
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=pipe._execution_device,
            do_classifier_free_guidance=cfg, max_sequence_length=max_sequence_length)
    return PromptEmbeds(embeds, pooled, negative if cfg else None, negative_pooled if cfg else None)


def guided_velocity(denoiser: Any, latents: torch.Tensor, timestep: torch.Tensor, text: PromptEmbeds,
                    guidance_scale: float) -> torch.Tensor:
    """The denoiser's velocity with classifier-free guidance ``u + w (c - u)``, float32 ``(B, C, h, w)``.

    ``timestep`` is the scheduler's timestep (``1000 σ``), a scalar or ``(B,)``. The unconditional and
    conditional halves run as one batch, as in the stock pipeline.
    """
    batch = latents.shape[0]
    model_input, embeds, pooled = latents, text.embeds, text.pooled
    if text.negative is not None:
        model_input = torch.cat([latents, latents])
        embeds, pooled = torch.cat([text.negative, text.embeds]), torch.cat([text.negative_pooled, text.pooled])
    timesteps = torch.as_tensor(timestep, device=latents.device).float().reshape(-1).expand(batch)
    timesteps = timesteps.repeat(model_input.shape[0] // batch)
    output = denoiser(hidden_states=model_input.to(embeds.dtype), timestep=timesteps, encoder_hidden_states=embeds,
                      pooled_projections=pooled, return_dict=False)[0].float()
    if text.negative is None:
        return output
    uncond, cond = output.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def step_log_prob(denoiser: Any, latents: torch.Tensor, next_latents: torch.Tensor, timestep: torch.Tensor,
                  step_index: int | torch.Tensor, sigmas: torch.Tensor, text: PromptEmbeds, guidance_scale: float,
                  noise_level: float = DEFAULT_NOISE_LEVEL) -> SDEStep:
    """Re-score a recorded transition ``latents -> next_latents`` under ``denoiser`` (training side)."""
    velocity = guided_velocity(denoiser, latents, timestep, text, guidance_scale)
    return sde_step_with_logprob(velocity, latents, sigmas, step_index, noise_level=noise_level,
                                 prev_sample=next_latents)


@dataclass
class FlowTrajectory:
    """What ``sample_with_logprob`` records; ``T`` = the number of stochastic steps (all but the last)."""

    latents: torch.Tensor  # (B, T, C, h, w) x_t before each stochastic step, float32
    next_latents: torch.Tensor  # (B, T, C, h, w) x_{t-1} after it
    log_probs: torch.Tensor  # (B, T) float32
    timesteps: torch.Tensor  # (T,) the scheduler timesteps (1000 σ)
    step_indices: torch.Tensor  # (T,) long indices into sigmas
    sigmas: torch.Tensor  # (N + 1,) float32 schedule
    text: PromptEmbeds
    images: torch.Tensor  # (B, 3, H, W) float32 in [0, 1]


def _set_timesteps(pipe: Any, num_inference_steps: int, latents: torch.Tensor) -> None:
    options = {}
    if pipe.scheduler.config.get("use_dynamic_shifting", False):  # SD3.5-style resolution-dependent shift
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        patch = pipe.transformer.config.patch_size
        length = (latents.shape[-2] // patch) * (latents.shape[-1] // patch)
        config = pipe.scheduler.config
        options["mu"] = calculate_shift(length, config.get("base_image_seq_len", 256),
                                        config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                        config.get("max_shift", 1.16))
    pipe.scheduler.set_timesteps(num_inference_steps, device=latents.device, **options)


def _decode(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    vae = pipe.vae
    scaled = latents / vae.config.scaling_factor + vae.config.shift_factor
    images = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(images, output_type="pt").float()


@torch.no_grad()
def sample_with_logprob(pipe: Any, prompts: Sequence[str], *, num_inference_steps: int, guidance_scale: float,
                        height: int, width: int, noise_level: float = DEFAULT_NOISE_LEVEL,
                        generator: torch.Generator | Sequence[torch.Generator] | None = None,
                        denoiser: Any = None, latents: torch.Tensor | None = None,
                        max_sequence_length: int = 256) -> FlowTrajectory:
    """Sample images with the SDE step, recording every stochastic transition (no gradient).

    Args:
        pipe: a ``StableDiffusion3Pipeline``-style pipeline.
        prompts: ``B`` prompts.
        num_inference_steps: ``N >= 2`` steps; the first ``N - 1`` are stochastic and recorded.
        guidance_scale: CFG scale (``<= 1``: no CFG), applied as in ``guided_velocity``.
        height, width: image size in pixels.
        noise_level: ``η > 0``.
        generator: initial-latent and SDE noise generator, or one per prompt (images then depend
            only on their own generator).
        denoiser: the model to run (default ``pipe.transformer``), e.g. an ``accelerate``-wrapped one.
        latents: initial noise ``(B, C, h, w)`` (e.g. shared by a prompt's group, flow_grpo's
            ``same_latent``); ``None`` draws it from ``generator``.

    Returns:
        ``FlowTrajectory``.
    """
    if num_inference_steps < 2:
        raise ValueError(f"sample_with_logprob: need num_inference_steps >= 2 (one stochastic step), got "
                         f"{num_inference_steps}")
    denoiser = pipe.transformer if denoiser is None else denoiser
    text = encode_prompts(pipe, prompts, guidance_scale, max_sequence_length)
    device = text.embeds.device
    latents = pipe.prepare_latents(len(prompts), pipe.transformer.config.in_channels, height, width,
                                   torch.float32, device, generator, latents).float()
    _set_timesteps(pipe, num_inference_steps, latents)
    sigmas, timesteps = pipe.scheduler.sigmas.float().to(device), pipe.scheduler.timesteps.to(device)
    before, after, log_probs = [], [], []
    for index, timestep in enumerate(timesteps):
        velocity = guided_velocity(denoiser, latents, timestep, text, guidance_scale)
        if index == len(timesteps) - 1:
            latents = euler_step(velocity, latents, sigmas, index)
            break
        step = sde_step_with_logprob(velocity, latents, sigmas, index, noise_level=noise_level, generator=generator)
        before.append(latents)
        latents = step.prev_sample
        after.append(latents)
        log_probs.append(step.log_prob)
    count = len(timesteps) - 1
    return FlowTrajectory(torch.stack(before, 1), torch.stack(after, 1), torch.stack(log_probs, 1),
                          timesteps[:count].float(), torch.arange(count, device=device), sigmas, text,
                          _decode(pipe, latents))
