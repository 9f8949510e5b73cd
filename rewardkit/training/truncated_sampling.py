"""Truncated-backprop sampling for reward backprop (DRaFT-K, AlignProp) on SD 1.x and SD3 pipelines.

The whole denoising chain runs under ``torch.no_grad`` except its last ``K`` steps, which run with
grad (optionally gradient-checkpointed), followed by a VAE decode with grad. The returned images
``(B, 3, H, W)`` in ``[0, 1]`` therefore carry a graph to the denoiser's trainable parameters (e.g.
LoRA) through exactly those ``K`` steps, and nothing is stored for the prefix.

* **DRaFT-K** (Clark et al., ICLR'24, "Directly Fine-Tuning Diffusion Models on Differentiable
  Rewards"; NeMo-Aligner ``conf/draftp_sd.yaml`` ``truncation_steps: 1``): a fixed ``K`` (``K = 1`` is
  the paper's recommended setting). ``draw_num_grad_steps("draft", ...)``.
* **AlignProp** (``mihirp1998/AlignProp`` ``sd_pipeline.py``; trl 0.23
  ``modeling_sd_base.py::pipeline_step_with_grad``): a random truncation step ``i0`` drawn uniformly
  from ``truncated_rand_backprop_minmax`` each iteration; the steps ``i >= i0`` keep their graph, so
  ``K = N - i0``. Here the range is given in ``K`` itself (``k_range=(lo, hi)``, inclusive):
  AlignProp's ``(0, 50)`` with 50 steps is ``k_range=(0, 50)``. AlignProp computes the prefix with grad
  and detaches the noise prediction; running it under ``no_grad`` gives the same gradients and stores
  nothing. ``draw_num_grad_steps("alignprop", ...)``.
* ReFL (one grad step from a random mid timestep, then ``x0`` prediction) and DRaFT-LV (re-noised
  copies of the last step) are not implemented here.

The prefix and the suffix call the same code as ``diffusers.StableDiffusionPipeline.__call__``
(``pipeline_stable_diffusion.py``: ``encode_prompt``, ``prepare_latents``, ``prepare_extra_step_kwargs``,
CFG ``uncond + g * (text - uncond)``, ``scheduler.step``, ``vae.decode(latents / scaling_factor)``,
``VaeImageProcessor.denormalize``) and ``StableDiffusion3Pipeline.__call__``
(``pipeline_stable_diffusion_3.py``: pooled text projections, ``timestep.expand(B)``, flow-matching Euler
step, ``vae.decode(latents / scaling_factor + shift_factor)``), so with the same generators the images
equal a plain pipeline call (``tests/test_truncated_sampling.py`` checks both). Not reproduced: SD3's
skip-layer guidance, T5 ``max_sequence_length`` other than the default, dynamic shifting (Flux-style).
The text encoder and VAE weights are never trained here: prompts are encoded without grad; the decode
is differentiable with respect to the latents only (pixels clamped to ``[0, 1]`` get no gradient, as in
diffusers' postprocessing and AlignProp).

Gradient checkpointing wraps the denoiser's ``forward`` with ``rewardkit.training.backprop.
gradient_checkpointing`` (non-reentrant ``torch.utils.checkpoint``; only active when grad is on), so
each grad step stores the denoiser's inputs and recomputes its activations in the backward pass, as
AlignProp's ``checkpoint.checkpoint(unet, ...)`` does.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from rewardkit.training.backprop import gradient_checkpointing

__all__ = ["TruncatedSample", "truncated_sample", "draw_num_grad_steps", "DRAFT_DEFAULT_K", "METHODS"]

Method = Literal["draft", "alignprop"]
METHODS = ("draft", "alignprop")
DRAFT_DEFAULT_K = 1  # Clark et al. (DRaFT-K): K = 1 works best; NeMo-Aligner draftp_sd.yaml truncation_steps: 1
_PIXEL_HALF = 0.5  # diffusers VaeImageProcessor.denormalize: [-1, 1] -> [0, 1] is x * 0.5 + 0.5, clamped


@dataclass
class TruncatedSample:
    """The result of ``truncated_sample``.

    Attributes:
        images: float32 ``(B, 3, H, W)`` in ``[0, 1]``; carries a graph to the denoiser's parameters
            through the last ``num_grad_steps`` steps (none when ``num_grad_steps == 0``).
        latents: the final latents ``(B, C, h, w)`` before decoding (same graph).
        num_grad_steps: ``K``, the number of denoising steps that ran with grad.
        timesteps: the scheduler's timesteps ``(N,)``; the grad steps are the last ``K``.
    """

    images: torch.Tensor
    latents: torch.Tensor
    num_grad_steps: int
    timesteps: torch.Tensor


def draw_num_grad_steps(method: Method, num_inference_steps: int, *, k: int = DRAFT_DEFAULT_K,
                        k_range: tuple[int, int] | None = None, rng: random.Random | None = None) -> int:
    """The number ``K`` of final denoising steps to backpropagate through in one training iteration.

    Args:
        method: ``"draft"`` (fixed ``K = k``) or ``"alignprop"`` (``K`` uniform in ``k_range``, inclusive).
        num_inference_steps: ``N``, the length of the sampling chain.
        k: DRaFT's ``K``, ``0 <= k <= N``.
        k_range: AlignProp's ``(lo, hi)`` with ``0 <= lo <= hi <= N``; default ``(0, N)`` (AlignProp's
            ``truncated_rand_backprop_minmax=(0, 50)`` at 50 steps).
        rng: the random source for AlignProp (seed it identically on every rank for reproducible runs).

    Returns:
        ``K`` as an int in ``[0, N]``.

    Raises:
        ValueError: an unknown method, or ``k`` / ``k_range`` outside ``[0, N]``.
    """
    if num_inference_steps < 1:
        raise ValueError(f"draw_num_grad_steps: num_inference_steps must be >= 1, got {num_inference_steps}")
    if method == "draft":
        if not 0 <= k <= num_inference_steps:
            raise ValueError(f"draw_num_grad_steps: DRaFT needs 0 <= k <= num_inference_steps "
                             f"({num_inference_steps}), got k={k}")
        return int(k)
    if method == "alignprop":
        lo, hi = k_range if k_range is not None else (0, num_inference_steps)
        if not 0 <= lo <= hi <= num_inference_steps:
            raise ValueError(f"draw_num_grad_steps: AlignProp needs 0 <= lo <= hi <= num_inference_steps "
                             f"({num_inference_steps}), got k_range={k_range}")
        return (rng or random).randint(int(lo), int(hi))
    raise ValueError(f"draw_num_grad_steps: method must be one of {METHODS}, got {method!r}")


def truncated_sample(
    pipe: Any,
    prompts: Sequence[str],
    *,
    num_grad_steps: int,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    eta: float = 0.0,
    negative_prompt: str | list[str] | None = None,
    denoiser: nn.Module | None = None,
    checkpoint: bool | Sequence[nn.Module] = True,
) -> TruncatedSample:
    """Sample with an SD 1.x or SD3 pipeline, keeping the graph of the last ``num_grad_steps`` steps only.

    Args:
        pipe: a ``diffusers.StableDiffusionPipeline`` (UNet, any diffusers scheduler) or
            ``StableDiffusion3Pipeline`` (transformer, flow-matching Euler), or a pipeline with the same
            components and ``encode_prompt`` / ``prepare_latents`` methods.
        prompts: ``B`` prompts.
        num_grad_steps: ``K`` in ``[0, N]`` (``draw_num_grad_steps``). ``0`` gives images without a graph.
        num_inference_steps: ``N``.
        guidance_scale: classifier-free guidance scale (``<= 1`` disables CFG, as in diffusers).
        height, width: output size in pixels (default: the pipeline's default size).
        generator: one generator, or one per prompt (each image then depends only on its own seed).
        eta: DDIM's eta (``0`` = deterministic sampling); ignored by schedulers without it (and by SD3).
        negative_prompt: the CFG negative prompt(s) (default: empty).
        denoiser: the module called in place of ``pipe.unet`` / ``pipe.transformer`` (e.g. a wrapper).
        checkpoint: ``True`` checkpoints the denoiser on the grad steps; a sequence of modules
            checkpoints those instead (e.g. ``[pipe.unet, pipe.vae.decoder]``); ``False`` stores all
            activations.

    Returns:
        A ``TruncatedSample``. The grad steps run with grad only if grad is enabled at the call (under an
        outer ``torch.no_grad()`` every step is grad-free).

    Raises:
        ValueError: ``num_grad_steps`` outside ``[0, N]``, no prompts, or an unsupported pipeline (no
            ``unet`` / ``transformer``, a UNet guidance embedding, a dynamically shifted flow schedule).
    """
    if not 0 <= num_grad_steps <= num_inference_steps:
        raise ValueError(f"truncated_sample: num_grad_steps must be in [0, num_inference_steps="
                         f"{num_inference_steps}], got {num_grad_steps}")
    ctx = _sampling_context(pipe, list(prompts), guidance_scale, height, width, generator, eta, negative_prompt,
                            num_inference_steps)
    denoiser = denoiser if denoiser is not None else ctx.denoiser
    grad_allowed = torch.is_grad_enabled()
    latents, first_grad = ctx.latents, num_inference_steps - num_grad_steps
    wrap = _checkpointing(denoiser, checkpoint) if num_grad_steps else contextlib.nullcontext()
    with wrap:
        for index, timestep in enumerate(ctx.timesteps):
            with torch.set_grad_enabled(grad_allowed and index >= first_grad):
                latents = _denoise_step(pipe, denoiser, latents, timestep, ctx)
        with torch.set_grad_enabled(grad_allowed and num_grad_steps > 0):
            images = _decode(pipe, latents, generator, ctx.flow)
    return TruncatedSample(images=images, latents=latents, num_grad_steps=int(num_grad_steps),
                           timesteps=ctx.timesteps)


@dataclass
class _Context:
    denoiser: nn.Module  # the pipeline's UNet or transformer
    flow: bool  # SD3 (transformer, flow matching) rather than SD 1.x (UNet)
    conditioning: dict[str, torch.Tensor]  # the denoiser's text inputs, [negative; positive] rows with CFG
    latents: torch.Tensor  # initial noise (B, C, h, w), times the scheduler's init_noise_sigma
    timesteps: torch.Tensor
    cfg: bool
    guidance_scale: float
    step_kwargs: dict[str, Any]


def _family(pipe: Any) -> tuple[nn.Module, bool]:
    """``(denoiser, flow)``; refuses what the loop does not reproduce."""
    unet, transformer = getattr(pipe, "unet", None), getattr(pipe, "transformer", None)
    if unet is not None:
        if getattr(unet.config, "time_cond_proj_dim", None) is not None:
            raise ValueError("truncated_sample: UNets with a guidance embedding (time_cond_proj_dim, LCM-style) are "
                             "not supported; use a standard SD 1.x / 2.x UNet")
        return unet, False
    if transformer is not None and hasattr(pipe, "text_encoder_2"):
        if pipe.scheduler.config.get("use_dynamic_shifting", False):
            raise ValueError("truncated_sample: flow schedulers with use_dynamic_shifting are not supported; "
                             "use a fixed-shift FlowMatchEulerDiscreteScheduler (SD3 / SD3.5)")
        return transformer, True
    raise ValueError(f"truncated_sample: {type(pipe).__name__} is neither an SD 1.x-style pipeline (unet) nor an "
                     "SD3-style one (transformer + text_encoder_2)")


def _conditioning(pipe: Any, prompts: list[str], device: Any, cfg: bool, negative_prompt: Any,
                  flow: bool) -> dict[str, torch.Tensor]:
    """Text inputs of the denoiser as the pipelines build them (negative rows first under CFG)."""
    if not flow:
        positive, negative = pipe.encode_prompt(prompts, device, 1, cfg, negative_prompt)
        return {"encoder_hidden_states": torch.cat([negative, positive]) if cfg else positive}
    positive, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=cfg,
        negative_prompt=negative_prompt)
    if cfg:
        positive, pooled = torch.cat([negative, positive]), torch.cat([negative_pooled, pooled])
    return {"encoder_hidden_states": positive, "pooled_projections": pooled}


def _sampling_context(pipe: Any, prompts: list[str], guidance_scale: float, height: int | None, width: int | None,
                      generator: Any, eta: float, negative_prompt: Any, num_inference_steps: int) -> _Context:
    """Text conditioning, timesteps and initial noise, as the pipelines' ``__call__`` make them."""
    if not prompts:
        raise ValueError("truncated_sample: got no prompts; pass at least one")
    denoiser, flow = _family(pipe)
    size = pipe.default_sample_size if flow else denoiser.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    height, width = height or size[0] * pipe.vae_scale_factor, width or size[1] * pipe.vae_scale_factor
    device = pipe._execution_device
    cfg = guidance_scale > 1.0  # diffusers: do_classifier_free_guidance = guidance_scale > 1
    with torch.no_grad():
        conditioning = _conditioning(pipe, prompts, device, cfg, negative_prompt, flow)
        pipe.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = pipe.prepare_latents(len(prompts), denoiser.config.in_channels, height, width,
                                       conditioning["encoder_hidden_states"].dtype, device, generator)
    step_kwargs = {} if flow else pipe.prepare_extra_step_kwargs(generator, eta)
    return _Context(denoiser=denoiser, flow=flow, conditioning=conditioning, latents=latents,
                    timesteps=pipe.scheduler.timesteps, cfg=cfg, guidance_scale=float(guidance_scale),
                    step_kwargs=step_kwargs)


def _denoise_step(pipe: Any, denoiser: nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
                  ctx: _Context) -> torch.Tensor:
    """One CFG-guided step ``x_t -> x_{t-1}`` (the body of the diffusers SD / SD3 loops, without rescale)."""
    model_input = torch.cat([latents] * 2) if ctx.cfg else latents
    if ctx.flow:
        prediction = denoiser(hidden_states=model_input, timestep=timestep.expand(model_input.shape[0]),
                              **ctx.conditioning, return_dict=False)[0]
    else:
        model_input = pipe.scheduler.scale_model_input(model_input, timestep)
        prediction = denoiser(model_input, timestep, **ctx.conditioning, return_dict=False)[0]
    if ctx.cfg:
        uncond, text = prediction.chunk(2)
        prediction = uncond + ctx.guidance_scale * (text - uncond)
    return pipe.scheduler.step(prediction, timestep, latents, **ctx.step_kwargs, return_dict=False)[0]


def _decode(pipe: Any, latents: torch.Tensor, generator: Any, flow: bool) -> torch.Tensor:
    """VAE decode to float32 ``(B, 3, H, W)`` in ``[0, 1]`` (differentiable where not clamped)."""
    latents = latents / pipe.vae.config.scaling_factor
    if flow:  # SD3's VAE latents are shifted as well as scaled
        decoded = pipe.vae.decode(latents + pipe.vae.config.shift_factor, return_dict=False)[0]
    else:
        decoded = pipe.vae.decode(latents, return_dict=False, generator=generator)[0]
    return (decoded * _PIXEL_HALF + _PIXEL_HALF).clamp(0, 1).float()


def _checkpointing(denoiser: nn.Module, checkpoint: bool | Sequence[nn.Module]) -> Any:
    if checkpoint is False:
        return contextlib.nullcontext()
    modules = [denoiser] if checkpoint is True else list(checkpoint)
    return gradient_checkpointing(denoiser, modules)
