"""Tests for rewardkit.training.truncated_sampling (DRaFT-K / AlignProp truncated backprop)."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from rewardkit.training.backprop import saved_activations
from rewardkit.training.truncated_sampling import draw_num_grad_steps, truncated_sample
from rewardkit.testing.pipelines import TINY_PIPELINE_SIZE as SIZE, tiny_sd3_pipeline, tiny_sd_pipeline

PROMPTS = ["a red cat", "a blue dog"]
SEEDS = (0, 1)
STEPS = 3
GUIDANCE = 7.5
IMAGE_ATOL = 1e-6  # same kernels, same order: the images agree to float32 rounding (observed: exactly)
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-8  # two computations of the same graph (recomputed vs stored activations)


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return tiny_sd_pipeline(seed=0)


@pytest.fixture(scope="module")
def sd3_pipe():
    torch.set_num_threads(1)
    return tiny_sd3_pipeline(seed=0)


@pytest.fixture(params=["sd", "sd3"])
def any_pipe(request):
    """The SD 1.x (UNet, DDIM) and SD3 (transformer, flow-matching Euler) tiny pipelines."""
    return request.getfixturevalue("pipe" if request.param == "sd" else "sd3_pipe")


def _generators() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in SEEDS]


def _sample(pipe, k: int, **options):
    return truncated_sample(pipe, PROMPTS, num_grad_steps=k, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                            height=SIZE, width=SIZE, generator=_generators(), **options)


def _denoiser(pipe) -> nn.Module:
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def _unet_grads(pipe) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in pipe.unet.named_parameters() if p.grad is not None}


class StepGain(nn.Module):
    """The denoiser with one extra scalar per denoising step: ``prediction * (1 + gain[i])`` at step ``i``.

    The gain of step ``i`` is used only in step ``i``, so its gradient says whether step ``i`` is in the graph.
    """

    def __init__(self, denoiser: nn.Module, timesteps: torch.Tensor) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.gain = nn.Parameter(torch.zeros(len(timesteps)))
        self.index = {round(float(t), 3): i for i, t in enumerate(timesteps)}

    def forward(self, *args, **kwargs):
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]  # SD3: keyword (B,); UNet: positional
        prediction = self.denoiser(*args, **kwargs)[0]
        return (prediction * (1 + self.gain[self.index[round(float(timestep.flatten()[0]), 3)]]),)


@pytest.mark.parametrize("k", [0, 1, STEPS])
def test_images_equal_a_plain_pipeline_call_with_the_same_seeds(any_pipe, k):
    pipe = any_pipe
    with torch.no_grad():
        reference = pipe(PROMPTS, generator=_generators(), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                         height=SIZE, width=SIZE, output_type="pt").images
    images = _sample(pipe, k).images
    assert images.shape == (2, 3, SIZE, SIZE) and images.dtype == torch.float32
    torch.testing.assert_close(images.detach(), reference, rtol=0, atol=IMAGE_ATOL)
    assert images.requires_grad == (k > 0)


# The first grad step's input (latents from the no-grad prefix) does not require grad, so torch warns that
# conv_in's full backward hook sees output gradients only; it still fires once per backward through the UNet.
@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.parametrize("k", [0, 1, 2, STEPS])
def test_gradient_reaches_exactly_the_last_k_steps(any_pipe, k):
    pipe, denoiser = any_pipe, _denoiser(any_pipe)
    pipe.scheduler.set_timesteps(STEPS)
    wrapper = StepGain(denoiser, pipe.scheduler.timesteps.clone())
    backward_calls = []
    first_layer = denoiser.conv_in if hasattr(denoiser, "conv_in") else denoiser.pos_embed.proj
    hook = first_layer.register_full_backward_hook(lambda *args: backward_calls.append(1))
    try:
        out = _sample(pipe, k, denoiser=wrapper)
        if k == 0:
            assert not out.images.requires_grad and not out.latents.requires_grad
            return
        out.images.mean().backward()
    finally:
        hook.remove()
        denoiser.zero_grad(set_to_none=True)
    grad = wrapper.gain.grad
    assert torch.equal(grad[: STEPS - k], torch.zeros(STEPS - k)), "a no-grad prefix step reached the graph"
    assert bool((grad[STEPS - k :] != 0).all()), f"a grad step is missing from the graph: {grad}"
    assert len(backward_calls) == k  # the denoiser is back-propagated through once per grad step, never in the prefix
    assert out.num_grad_steps == k


def _explicit_suffix_loss(pipe, k: int) -> torch.Tensor:
    """The same loss from an independent loop: the pipeline's own latents before step N-k, then k steps by hand."""
    captured = {}

    def grab(pipeline, index, timestep, tensors):
        if index == STEPS - k - 1:
            captured["latents"] = tensors["latents"].clone()
        return tensors

    with torch.no_grad():
        pipe(PROMPTS, generator=_generators(), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
             height=SIZE, width=SIZE, output_type="pt", callback_on_step_end=grab)
        positive, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    latents = captured["latents"]
    for timestep in pipe.scheduler.timesteps[STEPS - k :]:
        embeds = torch.cat([negative, positive])
        eps = pipe.unet(torch.cat([latents] * 2), timestep, encoder_hidden_states=embeds).sample
        uncond, text = eps.chunk(2)
        latents = pipe.scheduler.step(uncond + GUIDANCE * (text - uncond), timestep, latents).prev_sample
    images = (pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    return images.mean()


def test_gradients_equal_an_explicit_loop_over_the_last_k_steps(pipe):
    k = 2
    _explicit_suffix_loss(pipe, k).backward()
    expected = _unet_grads(pipe)
    pipe.unet.zero_grad(set_to_none=True)
    _sample(pipe, k).images.mean().backward()
    got = _unet_grads(pipe)
    pipe.unet.zero_grad(set_to_none=True)
    assert got.keys() == expected.keys() and len(got) > 0
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name)


def test_checkpointing_gives_the_same_gradients_and_stores_less(pipe):
    grads, stored = {}, {}
    for checkpoint in (False, True):
        with saved_activations(exclude=pipe.unet) as stats:
            images = _sample(pipe, STEPS, checkpoint=checkpoint).images
        images.mean().backward()
        grads[checkpoint], stored[checkpoint] = _unet_grads(pipe), stats.bytes
        pipe.unet.zero_grad(set_to_none=True)
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 0
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name)
    assert stored[True] < stored[False] / 2, stored  # the UNet's activations are recomputed, not stored


def test_an_outer_no_grad_leaves_every_step_without_graph(pipe):
    with torch.no_grad():
        out = _sample(pipe, STEPS)
    assert not out.images.requires_grad
    assert pipe.unet.forward.__func__ is type(pipe.unet).forward  # the checkpoint patch was removed


def test_bad_num_grad_steps_is_refused(pipe):
    with pytest.raises(ValueError, match="num_grad_steps must be in"):
        _sample(pipe, STEPS + 1)
    with pytest.raises(ValueError, match="got no prompts"):
        truncated_sample(pipe, [], num_grad_steps=1, num_inference_steps=STEPS)


def test_draft_uses_the_fixed_k():
    assert draw_num_grad_steps("draft", 50) == 1
    assert draw_num_grad_steps("draft", 50, k=5) == 5
    with pytest.raises(ValueError, match="0 <= k <= num_inference_steps"):
        draw_num_grad_steps("draft", 4, k=5)


def test_alignprop_draws_k_uniformly_in_its_inclusive_range_reproducibly():
    draws = [draw_num_grad_steps("alignprop", 10, k_range=(2, 4), rng=random.Random(7)) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same draw
    rng = random.Random(0)
    values = [draw_num_grad_steps("alignprop", 10, k_range=(2, 4), rng=rng) for _ in range(300)]
    assert set(values) == {2, 3, 4}
    assert set(draw_num_grad_steps("alignprop", 3, rng=rng) for _ in range(200)) == {0, 1, 2, 3}  # default (0, N)


@pytest.mark.parametrize(("method", "k_range"), [("alignprop", (3, 2)), ("alignprop", (0, 11)), ("reinforce", None)])
def test_bad_method_or_range_is_refused(method, k_range):
    with pytest.raises(ValueError, match="draw_num_grad_steps"):
        draw_num_grad_steps(method, 10, k_range=k_range)
