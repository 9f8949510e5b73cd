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

__all__ = ["TINY_PIPELINE_SIZE", "DEFAULT_GUIDANCE_SCALE", "tiny_sd_pipeline", "tiny_sd3_pipeline", "generate_images"]

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


# ---------------------------------------------------------------------------------------------------
# Stable Diffusion 3 style flow-matching pipeline (recipes: Flow-GRPO). Settings from
# reference/rl_integration.md section 3.2 and Appendix A: SD3Transformer2DModel with one joint block,
# two CLIP text encoders with projection (pooled 32 + 32 = 64 = pooled_projection_dim), no T5
# (text_encoder_3=None: the pipeline fills its embeddings with zeros of width joint_attention_dim,
# which must be >= 2 x the CLIP width), FlowMatchEulerDiscreteScheduler(shift=3.0), the tiny VAE
# without quant convs with SD3's shift/scale factors.
# ---------------------------------------------------------------------------------------------------
_SD3_FOLDER = "tiny-sd3"
_SD3_JOINT_DIM = 64  # joint_attention_dim: >= 2 * _TEXT_WIDTH (the CLIP embeddings are padded up to it)
_SD3_POOLED_DIM = 2 * _TEXT_WIDTH  # two pooled CLIP projections concatenated
_SD3_HEADS, _SD3_HEAD_DIM = 4, 8
_SD3_SHIFT = 3.0  # stabilityai/stable-diffusion-3-medium scheduler_config.json
_SD3_VAE_SHIFT, _SD3_VAE_SCALING = 0.0609, 1.5035  # stabilityai/stable-diffusion-3-medium vae/config.json
# A VAE whose image statistics the latents can move, so that RL tests can show a learning signal (measured on
# 16 random 8x8 latents). With 32 groups, every GroupNorm removes per-channel offsets and random decoders map
# every latent to nearly the same mid-grey mean (brightness std 0.002; a +1 offset of any latent channel moves
# it by < 0.005). One group keeps the channels' relative offsets (+1 on a channel: up to 0.12) and a 4x
# conv_out uses the [0, 1] range (brightness std 0.029).
_SD3_VAE_GROUPS = 1
_SD3_DECODER_GAIN = 4.0


def _sd3_components(tokenizer: Any) -> dict[str, Any]:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    def text_encoder() -> Any:
        config = CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=_TEXT_WIDTH, intermediate_size=_TEXT_MLP,
            num_hidden_layers=_TEXT_LAYERS, num_attention_heads=_TEXT_HEADS, projection_dim=_TEXT_WIDTH,
            max_position_embeddings=_CONTEXT_LENGTH, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        return CLIPTextModelWithProjection(config)

    transformer = SD3Transformer2DModel(
        sample_size=_UNET_SAMPLE_SIZE, patch_size=1, in_channels=_LATENT_CHANNELS, out_channels=_LATENT_CHANNELS,
        num_layers=1, attention_head_dim=_SD3_HEAD_DIM, num_attention_heads=_SD3_HEADS,
        caption_projection_dim=_SD3_HEADS * _SD3_HEAD_DIM, joint_attention_dim=_SD3_JOINT_DIM,
        pooled_projection_dim=_SD3_POOLED_DIM,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=_LATENT_CHANNELS, block_out_channels=_BLOCKS,
        norm_num_groups=_SD3_VAE_GROUPS, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=TINY_PIPELINE_SIZE, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=_SD3_VAE_SHIFT, scaling_factor=_SD3_VAE_SCALING,
    )
    with torch.no_grad():  # a high-contrast decoder: image statistics (brightness) then depend on the latents
        vae.decoder.conv_out.weight.mul_(_SD3_DECODER_GAIN)
    return {"transformer": transformer, "scheduler": FlowMatchEulerDiscreteScheduler(shift=_SD3_SHIFT), "vae": vae,
            "text_encoder": text_encoder(), "tokenizer": tokenizer, "text_encoder_2": text_encoder(),
            "tokenizer_2": tokenizer, "text_encoder_3": None, "tokenizer_3": None}


def tiny_sd3_pipeline(root: str | Path | None = None, seed: int = 0) -> Any:
    """A random-weight ``diffusers.StableDiffusion3Pipeline`` (flow matching) on CPU in float32, 32×32.

    Same conventions as ``tiny_sd_pipeline``: weights drawn under ``torch.random.fork_rng`` from
    ``seed``; ``root`` round-trips through ``save_pretrained`` / ``from_pretrained`` (folder ``tiny-sd3``).

    Args:
        root: Optional folder to save the pipeline in and reload it from.
        seed: Seed of the random weights.

    Returns:
        The pipeline (every module in eval mode, progress bar off, no T5 encoder).
    """
    from diffusers import StableDiffusion3Pipeline

    with tempfile.TemporaryDirectory() as scratch, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        components = _sd3_components(_tokenizer(Path(root or scratch) / _SD3_FOLDER / "tokenizer"))
        pipe = StableDiffusion3Pipeline(**components)
    if root is not None:
        folder = Path(root) / _SD3_FOLDER
        pipe.save_pretrained(str(folder), safe_serialization=True)
        pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), local_files_only=True, text_encoder_3=None,
                                                        tokenizer_3=None)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
