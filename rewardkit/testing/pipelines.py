"""A tiny, seeded, offline Stable Diffusion 1.x pipeline built from the real diffusers classes.

For tests and benchmarks of the training integrations (callbacks, TRL ``render=``, recipes): the
pipeline is ``diffusers.StableDiffusionPipeline`` with random weights (~1.7M parameters, the real
49408-token CLIP BPE tokenizer written by ``rewardkit.testing.clip.write_clip_tokenizer``), so it runs
the real sampling code in well under a second per call on CPU.

Sources: component settings from ``reference/rl_integration.md`` section 3.2 and Appendix A (verified
there with diffusers + transformers 5 on 2 vCPUs): UNet ``sample_size=8``, VAE with two blocks
(``vae_scale_factor=2``), DDIM scheduler with SD's ``scaled_linear`` betas, ``steps_offset=1``;
``.eval()`` on every component (the constructors leave dropout on).

Example:
    >>> pipe = tiny_sd_pipeline()
    >>> images = generate_images(pipe, ["a red cat", "a blue dog"], seeds=[0, 1])  # (2, 3, 32, 32) in [0, 1]
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["TINY_PIPELINE_SIZE", "DEFAULT_GUIDANCE_SCALE", "tiny_sd_pipeline", "generate_images"]

TINY_PIPELINE_SIZE = 32  # output side in pixels: latent 16 x vae_scale_factor 2
DEFAULT_GUIDANCE_SCALE = 7.5  # diffusers StableDiffusionPipeline.__call__ default
_PIPELINE_FOLDER = "tiny-sd"  # under ``root``: a save_pretrained folder, reloaded by from_pretrained
_TEXT_WIDTH, _TEXT_LAYERS, _TEXT_HEADS, _TEXT_MLP = 32, 2, 4, 37  # reference Appendix A
_CONTEXT_LENGTH = 77  # SD 1.x tokenizer.model_max_length
_BLOCKS = (32, 64)
_GROUPS = 32
_LATENT_CHANNELS = 4
_UNET_SAMPLE_SIZE = 8
_ATTENTION_HEAD_DIM = 8
# DDIM as SD 1.x ships it (runwayml/stable-diffusion-v1-5 scheduler_config.json).
_BETA_START, _BETA_END = 0.00085, 0.012
_SD_VAE_SCALING = 0.18215


def _tokenizer(folder: Path) -> Any:
    from transformers import CLIPTokenizer

    from rewardkit.testing.clip import write_clip_tokenizer

    return CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(folder)))


def _components(tokenizer: Any) -> dict[str, Any]:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=_TEXT_WIDTH, intermediate_size=_TEXT_MLP,
        num_hidden_layers=_TEXT_LAYERS, num_attention_heads=_TEXT_HEADS,
        max_position_embeddings=_CONTEXT_LENGTH, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    unet = UNet2DConditionModel(
        sample_size=_UNET_SAMPLE_SIZE, in_channels=_LATENT_CHANNELS, out_channels=_LATENT_CHANNELS,
        layers_per_block=1, block_out_channels=_BLOCKS, norm_num_groups=_GROUPS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=_TEXT_WIDTH, attention_head_dim=_ATTENTION_HEAD_DIM,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=_LATENT_CHANNELS, block_out_channels=_BLOCKS,
        norm_num_groups=_GROUPS, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=TINY_PIPELINE_SIZE,
        scaling_factor=_SD_VAE_SCALING,
    )
    scheduler = DDIMScheduler(
        beta_start=_BETA_START, beta_end=_BETA_END, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    return {"vae": vae, "text_encoder": CLIPTextModel(text_config), "tokenizer": tokenizer, "unet": unet,
            "scheduler": scheduler}


def tiny_sd_pipeline(root: str | Path | None = None, seed: int = 0) -> Any:
    """A random-weight ``diffusers.StableDiffusionPipeline`` on CPU in float32, outputs 32×32.

    Weights are drawn under ``torch.random.fork_rng`` from ``seed``, so building never changes the
    caller's global RNG state and the same ``seed`` gives the same pipeline.

    Args:
        root: If given, the pipeline is written there with ``save_pretrained`` (folder ``tiny-sd``) and
            reloaded with ``from_pretrained``, exercising diffusers' real loading code. ``None`` builds
            in memory (the tokenizer files go through a temporary folder).
        seed: Seed of the random weights.

    Returns:
        The pipeline (every module in eval mode, progress bar off, no safety checker).
    """
    from diffusers import StableDiffusionPipeline

    with tempfile.TemporaryDirectory() as scratch, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        components = _components(_tokenizer(Path(root or scratch) / _PIPELINE_FOLDER / "tokenizer"))
        pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    if root is not None:
        folder = Path(root) / _PIPELINE_FOLDER
        pipe.save_pretrained(str(folder), safe_serialization=True)
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate_images(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int = 2,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    height: int = TINY_PIPELINE_SIZE,
    width: int = TINY_PIPELINE_SIZE,
) -> torch.Tensor:
    """``rewardkit.integrations.generation.generate_images`` with the tiny pipeline's defaults.

    Each image's initial noise comes from its own ``torch.Generator(pipe.device).manual_seed(seed)``, so
    an image depends only on its prompt and seed, not on the batch it was generated in (up to float
    rounding of batched kernels). Works with any diffusers pipeline taking ``prompt``, ``generator``,
    ``num_inference_steps``, ``guidance_scale``, ``height``, ``width`` and ``output_type="pt"``.

    Args:
        pipe: A diffusers pipeline (e.g. from ``tiny_sd_pipeline``).
        prompts: ``B`` prompts.
        seeds: ``B`` integer seeds, one per prompt.
        num_inference_steps: Denoising steps.
        guidance_scale: Classifier-free guidance scale (``<= 1`` disables CFG).
        height: Output height in pixels (a multiple of ``8 * pipe.vae_scale_factor`` for real SD;
            of ``2 * vae_scale_factor`` for the tiny pipeline).
        width: Output width in pixels.

    Returns:
        Float32 tensor ``(B, 3, height, width)`` in ``[0, 1]`` on the pipeline's device; ``(0, 3, H, W)``
        when ``prompts`` is empty (no pipeline call, so ranks with an empty shard still work).

    Raises:
        ValueError: If ``prompts`` and ``seeds`` differ in length.
    """
    from rewardkit.integrations.generation import generate_images as generate

    return generate(pipe, prompts, seeds, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                    height=height, width=width)
