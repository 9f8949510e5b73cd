"""Seeded image generation with a diffusers pipeline, for evaluation callbacks and renderers.

One ``torch.Generator`` per (prompt, seed) row, so every image depends only on its own prompt and seed,
not on the batch or the rank it was generated on: a sharded evaluation over several processes sees
the same images as a single process (up to float rounding of batched kernels).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["generate_images"]


def generate_images(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], *, num_inference_steps: int = 50,
                    guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
                    **call_kwargs: Any) -> torch.Tensor:
    """Generate one image per (prompt, seed) with a diffusers text-to-image pipeline.

    Args:
        pipe: a diffusers pipeline taking ``prompt``, ``generator``, ``num_inference_steps`` and
            ``output_type="pt"`` (``StableDiffusionPipeline``, ``FluxPipeline``, ...).
        prompts: ``B`` prompts.
        seeds: ``B`` integer seeds, one per prompt.
        num_inference_steps: denoising steps.
        guidance_scale, height, width: passed on when given (``None`` = the pipeline's default).
        **call_kwargs: any other pipeline argument (e.g. ``negative_prompt``).

    Returns:
        float32 ``(B, 3, H, W)`` in ``[0, 1]`` on the pipeline's device; ``(0, 3, H, W)`` for no prompts
        (no pipeline call, so ranks with an empty shard take part without generating).

    Raises:
        ValueError: ``prompts`` and ``seeds`` differ in length.
    """
    prompts, seeds = list(prompts), [int(seed) for seed in seeds]
    if len(prompts) != len(seeds):
        raise ValueError(f"generate_images: got {len(prompts)} prompts and {len(seeds)} seeds; pass one seed "
                         "per prompt (e.g. seeds=range(len(prompts))).")
    device = torch.device(getattr(pipe, "device", "cpu"))
    options = {k: v for k, v in (("guidance_scale", guidance_scale), ("height", height), ("width", width))
               if v is not None}
    if not prompts:
        return torch.zeros(0, 3, height or 0, width or 0, device=device)
    generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
    with torch.no_grad():
        output = pipe(prompt=prompts, generator=generators, num_inference_steps=num_inference_steps,
                      output_type="pt", **options, **call_kwargs)
    return output.images.float()  # diffusers' postprocess already maps to [0, 1]
