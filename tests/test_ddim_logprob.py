"""Tests of rewardkit.training.ddim_logprob: DDIM steps with log-probs and the recording sampler."""

from __future__ import annotations

import math

import pytest
import torch

from rewardkit.training.ddim_logprob import (
    ddim_mean_std,
    ddim_step_with_logprob,
    gaussian_logprob,
    ppo_clipped_loss,
    sample_with_logprob,
    step_logprob,
)

PROMPTS = ["a red cat", "a blue dog"]
STEPS = 3
GUIDANCE = 5.0
LOGPROB_ATOL = 1e-5  # float32 Gaussian log-density, averaged over C*h*w elements


def _scheduler(prediction_type: str = "epsilon", steps: int = STEPS, **options):
    from diffusers import DDIMScheduler

    settings = {"clip_sample": False, **options}
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type, **settings)
    scheduler.set_timesteps(steps)
    return scheduler


def _tensors(seed: int = 0, shape=(3, 4, 8, 8)):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


@pytest.fixture(scope="module")
def pipe():
    from rewardkit.testing.pipelines import tiny_sd_pipeline

    return tiny_sd_pipeline(seed=3)


def _generators(seeds=(0, 1)):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_mean_equals_the_deterministic_part_of_diffusers_step_exactly(prediction_type):
    scheduler = _scheduler(prediction_type)
    model_output, sample = _tensors()
    noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(7))
    for t in scheduler.timesteps:
        mean, std = ddim_mean_std(scheduler, model_output, int(t), sample, eta=0.7)
        zero = scheduler.step(model_output, t, sample, eta=0.7, variance_noise=torch.zeros_like(sample)).prev_sample
        noisy = scheduler.step(model_output, t, sample, eta=0.7, variance_noise=noise).prev_sample
        assert torch.equal(mean, zero)  # tolerance 0: same formulas, same operation order
        assert torch.equal(mean + std * noise, noisy)
        expected_std = 0.7 * math.sqrt(float(scheduler._get_variance(int(t), int(t) - 1000 // STEPS)))
        assert std.shape == (3, 1, 1, 1) and torch.allclose(std, torch.full_like(std, expected_std), rtol=1e-6)


def test_mean_follows_clip_sample_like_diffusers():
    scheduler = _scheduler(steps=2, clip_sample=True, clip_sample_range=0.5)
    model_output, sample = _tensors(1)
    t = scheduler.timesteps[0]
    mean, _ = ddim_mean_std(scheduler, model_output * 5, t, sample, eta=1.0)
    zero = scheduler.step(model_output * 5, t, sample, eta=1.0, variance_noise=torch.zeros_like(sample)).prev_sample
    assert torch.equal(mean, zero)


def test_logprob_equals_the_gaussian_density_recomputed_independently():
    scheduler = _scheduler()
    model_output, sample = _tensors(2)
    t = int(scheduler.timesteps[1])
    prev, log_prob = ddim_step_with_logprob(scheduler, model_output, t, sample, eta=1.0,
                                            generator=torch.Generator().manual_seed(0))
    mean = scheduler.step(model_output, t, sample, eta=1.0, variance_noise=torch.zeros_like(sample)).prev_sample
    std = math.sqrt(float(scheduler._get_variance(t, t - 1000 // STEPS)))
    expected = torch.distributions.Normal(mean.double(), std).log_prob(prev.double()).mean(dim=(1, 2, 3))
    assert log_prob.dtype == torch.float32 and log_prob.shape == (3,)
    torch.testing.assert_close(log_prob.double(), expected, atol=LOGPROB_ATOL, rtol=0)
    # scoring the drawn sample again gives the same log-prob
    _, again = ddim_step_with_logprob(scheduler, model_output, t, sample, eta=1.0, prev_sample=prev)
    assert torch.equal(again, log_prob)


def test_per_sample_timesteps_match_one_call_per_sample():
    scheduler = _scheduler()
    model_output, sample = _tensors(3)
    prev = torch.randn(sample.shape, generator=torch.Generator().manual_seed(5))
    timesteps = torch.stack([scheduler.timesteps[2], scheduler.timesteps[0], scheduler.timesteps[1]])
    _, batched = ddim_step_with_logprob(scheduler, model_output, timesteps, sample, eta=1.0, prev_sample=prev)
    single = [ddim_step_with_logprob(scheduler, model_output[i : i + 1], int(timesteps[i]), sample[i : i + 1], eta=1.0,
                                     prev_sample=prev[i : i + 1])[1] for i in range(3)]
    torch.testing.assert_close(batched, torch.cat(single), atol=0, rtol=0)


def test_logprob_is_float32_and_differentiable_for_half_inputs():
    scheduler = _scheduler()
    model_output, sample = _tensors(4)
    model_output = model_output.bfloat16().requires_grad_(True)
    _, log_prob = ddim_step_with_logprob(scheduler, model_output, scheduler.timesteps[0], sample.bfloat16(), eta=1.0,
                                         prev_sample=sample)
    assert log_prob.dtype == torch.float32
    log_prob.sum().backward()
    assert model_output.grad is not None and bool(torch.isfinite(model_output.grad.float()).all())


def test_gaussian_logprob_of_the_mean_is_the_normalising_constant():
    mean = torch.zeros(2, 3, 4, 4)
    std = torch.full((2, 1, 1, 1), 0.5)
    expected = -math.log(0.5) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(gaussian_logprob(mean, mean, std), torch.full((2,), expected), atol=1e-6, rtol=0)


def test_ppo_clipped_loss_hand_computed():
    # rows: ratio 1 (A=1), ratio 1.5 clipped to 1.2 (A=2), ratio 0.5 clipped to 0.8 (A=-1)
    log_prob = torch.tensor([0.0, math.log(1.5), math.log(0.5)], requires_grad=True)
    stats = ppo_clipped_loss(log_prob, torch.zeros(3), torch.tensor([1.0, 2.0, -1.0]), clip_range=0.2)
    assert abs(stats.loss.item() - (-1.0 - 2.4 + 0.8) / 3) < 1e-6
    assert abs(stats.approx_kl.item() - 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3) < 1e-6
    assert abs(stats.clipfrac.item() - 2 / 3) < 1e-6 and abs(stats.ratio.item() - 1.0) < 1e-6
    stats.loss.backward()
    # clipped rows carry no gradient; the unclipped one gets -A * ratio / B
    torch.testing.assert_close(log_prob.grad, torch.tensor([-1 / 3, 0.0, 0.0]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"must all be \(B,\)"):
        ppo_clipped_loss(log_prob, torch.zeros(2), torch.zeros(3), clip_range=0.2)
    with pytest.raises(ValueError, match="clip_range must be > 0"):
        ppo_clipped_loss(log_prob, torch.zeros(3), torch.zeros(3), clip_range=0.0)


def test_sampler_reproduces_the_stock_pipeline_with_eta(pipe):
    trajectory = sample_with_logprob(pipe, PROMPTS, _generators(), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                                     eta=1.0, height=32, width=32)
    reference = pipe(prompt=PROMPTS, generator=_generators(), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                     eta=1.0, height=32, width=32, output_type="pt").images
    assert trajectory.images.shape == (2, 3, 32, 32)
    torch.testing.assert_close(trajectory.images, reference.float(), atol=1e-5, rtol=0)
    assert trajectory.latents.shape == trajectory.next_latents.shape == (2, STEPS, 4, 16, 16)
    assert trajectory.log_probs.shape == trajectory.timesteps.shape == (2, STEPS)
    assert trajectory.log_probs.dtype == torch.float32 and trajectory.timesteps.dtype == torch.int64
    assert torch.equal(trajectory.latents[:, 1:], trajectory.next_latents[:, :-1])
    assert torch.equal(trajectory.timesteps[0], pipe.scheduler.timesteps.long())


@pytest.mark.parametrize("guidance_scale", [1.0, GUIDANCE])
def test_ratio_is_one_when_recomputed_with_the_same_model(pipe, guidance_scale):
    trajectory = sample_with_logprob(pipe, PROMPTS, _generators((4, 5)), num_inference_steps=STEPS,
                                     guidance_scale=guidance_scale, eta=1.0)
    assert (trajectory.negative_prompt_embeds is None) == (guidance_scale <= 1)
    for j in range(STEPS):
        log_prob = step_logprob(pipe.unet, pipe.scheduler, trajectory.latents[:, j], trajectory.next_latents[:, j],
                                trajectory.timesteps[:, j], trajectory.prompt_embeds,
                                trajectory.negative_prompt_embeds, guidance_scale=guidance_scale, eta=1.0)
        ratio = torch.exp(log_prob - trajectory.log_probs[:, j])
        torch.testing.assert_close(ratio, torch.ones(2), atol=1e-6, rtol=0)
    # a different model gives a different log-prob (the test above is not vacuous)
    with torch.no_grad():
        pipe.unet.conv_out.bias.add_(0.5)
    try:
        changed = step_logprob(pipe.unet, pipe.scheduler, trajectory.latents[:, 0], trajectory.next_latents[:, 0],
                               trajectory.timesteps[:, 0], trajectory.prompt_embeds, trajectory.negative_prompt_embeds,
                               guidance_scale=guidance_scale, eta=1.0)
    finally:
        with torch.no_grad():
            pipe.unet.conv_out.bias.sub_(0.5)
    assert not torch.allclose(changed, trajectory.log_probs[:, 0], atol=1e-3)


def test_rows_depend_only_on_their_own_generator(pipe):
    pair = sample_with_logprob(pipe, PROMPTS, _generators((8, 9)), num_inference_steps=2, guidance_scale=GUIDANCE)
    alone = sample_with_logprob(pipe, PROMPTS[1:], _generators((9,)), num_inference_steps=2, guidance_scale=GUIDANCE)
    # batched kernels round differently: 1e-4 absolute on latents of unit scale
    torch.testing.assert_close(pair.next_latents[1:], alone.next_latents, atol=1e-4, rtol=0)


def test_bad_inputs_raise_with_a_fix():
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    scheduler = _scheduler()
    model_output, sample = _tensors()
    t = int(scheduler.timesteps[0])
    with pytest.raises(ValueError, match="eta must be > 0"):
        ddim_mean_std(scheduler, model_output, t, sample, eta=0.0)
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        ddim_mean_std(scheduler, model_output[:2], t, sample, eta=1.0)
    with pytest.raises(ValueError, match="timestep must be"):
        ddim_mean_std(scheduler, model_output, torch.tensor([t, t]), sample, eta=1.0)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1000\)"):
        ddim_mean_std(scheduler, model_output, 1000, sample, eta=1.0)
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_mean_std(DDIMScheduler(), model_output, t, sample, eta=1.0)
    with pytest.raises(ValueError, match="thresholding"):
        ddim_mean_std(_scheduler(thresholding=True), model_output, t, sample, eta=1.0)
    flow = FlowMatchEulerDiscreteScheduler()
    flow.set_timesteps(STEPS)
    with pytest.raises(TypeError, match="DDIMScheduler.from_config"):
        ddim_mean_std(flow, model_output, t, sample, eta=1.0)
    with pytest.raises(ValueError, match="not both"):
        ddim_step_with_logprob(scheduler, model_output, t, sample, eta=1.0, prev_sample=sample,
                               generator=torch.Generator())
    with pytest.raises(ValueError, match="prev_sample must have"):
        ddim_step_with_logprob(scheduler, model_output, t, sample, eta=1.0, prev_sample=sample[:1])


def test_sampler_bad_inputs(pipe):
    with pytest.raises(ValueError, match="B generators"):
        sample_with_logprob(pipe, PROMPTS, _generators((0,)), num_inference_steps=2, guidance_scale=GUIDANCE)
    with pytest.raises(ValueError, match="B generators"):
        sample_with_logprob(pipe, [], [], num_inference_steps=2, guidance_scale=GUIDANCE)
