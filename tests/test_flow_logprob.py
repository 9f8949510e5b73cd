"""Tests of rewardkit/training/flow_logprob.py: Flow-GRPO's SDE step with log-probabilities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from rewardkit.training import flow_logprob as fl

SIGMAS = torch.tensor([1.0, 0.9, 0.6, 0.3, 0.0])  # a flow-matching schedule: 1 -> 0, N + 1 = 5 values


def _inputs(batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=generator), torch.randn(batch, 4, 8, 8, generator=generator)


def _reference_mean_std(velocity, sample, sigmas, index, eta):
    """The Flow-GRPO SDE transition restated in float64 numpy (module docstring formulas)."""
    s, s_next = float(sigmas[index]), float(sigmas[index + 1])
    s_tilde = float(sigmas[1]) if s == 1 else s
    dt = s_next - s
    s_t = eta * math.sqrt(s / (1 - s_tilde))
    x, v = sample.double().numpy(), velocity.double().numpy()
    mean = x * (1 + s_t**2 * dt / (2 * s)) + v * (1 + s_t**2 * (1 - s) / (2 * s)) * dt
    return mean, s_t * math.sqrt(-dt)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_log_prob_equals_independent_gaussian_density(index: int) -> None:
    velocity, sample = _inputs()
    step = fl.sde_step_with_logprob(velocity, sample, SIGMAS, index, noise_level=0.7,
                                    generator=torch.Generator().manual_seed(3))
    mean, std = _reference_mean_std(velocity, sample, SIGMAS, index, 0.7)
    np.testing.assert_allclose(step.mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(step.std.flatten().numpy(), np.full(3, std), rtol=1e-6)
    density = stats.norm.logpdf(step.prev_sample.double().numpy(), loc=mean, scale=std).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(step.log_prob.numpy(), density, rtol=1e-5, atol=1e-5)  # float32 vs float64
    normal = torch.distributions.Normal(step.mean, step.std)
    torch.testing.assert_close(step.log_prob, normal.log_prob(step.prev_sample).mean(dim=(1, 2, 3)))
    assert step.log_prob.dtype == torch.float32 and step.log_prob.shape == (3,)


def test_sampled_noise_has_the_stated_std() -> None:
    velocity, sample = _inputs(batch=64)
    step = fl.sde_step_with_logprob(velocity, sample, SIGMAS, 1, generator=torch.Generator().manual_seed(0))
    z = ((step.prev_sample - step.mean) / step.std).flatten()
    assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1) < 0.03  # 16384 draws: ~4 standard errors


def test_small_noise_level_is_the_euler_step() -> None:
    velocity, sample = _inputs()
    step = fl.sde_step_with_logprob(velocity, sample, SIGMAS, 1, noise_level=1e-6)
    torch.testing.assert_close(step.prev_sample, fl.euler_step(velocity, sample, SIGMAS, 1), rtol=0, atol=1e-5)


def test_half_precision_inputs_give_float32_and_gradient_reaches_velocity_only() -> None:
    velocity, sample = _inputs()
    velocity = velocity.bfloat16().requires_grad_(True)
    given = torch.randn(3, 4, 8, 8, requires_grad=True)
    step = fl.sde_step_with_logprob(velocity, sample.bfloat16(), SIGMAS, 2, prev_sample=given)
    assert step.log_prob.dtype == step.mean.dtype == torch.float32 and torch.isfinite(step.log_prob).all()
    step.log_prob.sum().backward()
    assert velocity.grad is not None and float(velocity.grad.abs().sum()) > 0 and given.grad is None


def test_per_row_generators_make_rows_batch_independent() -> None:
    velocity, sample = _inputs()
    rows = fl.sde_step_with_logprob(velocity, sample, SIGMAS, 1,
                                    generator=[torch.Generator().manual_seed(s) for s in (5, 6, 7)])
    alone = fl.sde_step_with_logprob(velocity[1:2], sample[1:2], SIGMAS, 1, generator=[torch.Generator().manual_seed(6)])
    torch.testing.assert_close(rows.prev_sample[1:2], alone.prev_sample, rtol=0, atol=1e-6)


def test_gaussian_kl_matches_torch_distributions() -> None:
    velocity, sample = _inputs()
    std = torch.full((3, 1, 1, 1), 0.2)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(velocity, std),
                                                 torch.distributions.Normal(sample, std)).mean(dim=(1, 2, 3))
    torch.testing.assert_close(fl.gaussian_kl(velocity, sample, std), expected)
    assert float(fl.gaussian_kl(velocity, velocity, std).abs().max()) == 0


@pytest.mark.parametrize("case, match", [
    ("shape", "must both be"), ("final", "final step"), ("eta", "noise_level must be > 0"),
    ("index", "step_index must lie"), ("sigmas", "1-D schedule"), ("generators", "generators for a batch"),
    ("prev", "prev_sample"),
])
def test_bad_inputs_raise(case: str, match: str) -> None:
    velocity, sample = _inputs()
    kwargs = dict(velocity=velocity, sample=sample, sigmas=SIGMAS, step_index=1)
    kwargs.update({"shape": dict(velocity=velocity[:, :2]), "final": dict(step_index=3),
                   "eta": dict(noise_level=0.0), "index": dict(step_index=4), "sigmas": dict(sigmas=SIGMAS[None]),
                   "generators": dict(generator=[torch.Generator()]),
                   "prev": dict(prev_sample=sample[:2])}[case])
    with pytest.raises(ValueError, match=match):
        fl.sde_step_with_logprob(**kwargs)


# --- the sampling loop on the tiny SD3 pipeline ------------------------------------------------------

PROMPTS = ["a red cat", "a blue dog"]


def _generators() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in (0, 1)]


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    from rewardkit.testing.pipelines import tiny_sd3_pipeline

    return tiny_sd3_pipeline()


@pytest.fixture(scope="module")
def trajectory(pipe):
    return fl.sample_with_logprob(pipe, PROMPTS, num_inference_steps=4, guidance_scale=4.5, height=32, width=32,
                                  generator=_generators())


def test_trajectory_shapes_and_dtypes(trajectory) -> None:
    assert trajectory.latents.shape == trajectory.next_latents.shape == (2, 3, 4, 16, 16)
    assert trajectory.log_probs.shape == (2, 3) and trajectory.log_probs.dtype == torch.float32
    assert trajectory.latents.dtype == torch.float32 and torch.isfinite(trajectory.log_probs).all()
    assert trajectory.step_indices.tolist() == [0, 1, 2] and trajectory.sigmas.shape == (5,)
    assert trajectory.images.shape == (2, 3, 32, 32) and 0 <= float(trajectory.images.min()) <= 1
    torch.testing.assert_close(trajectory.latents[:, 1:], trajectory.next_latents[:, :-1], rtol=0, atol=0)


def test_small_noise_matches_the_stock_pipeline(pipe) -> None:
    stock = pipe(PROMPTS, height=32, width=32, num_inference_steps=4, guidance_scale=4.5, generator=_generators(),
                 output_type="pt").images
    ours = fl.sample_with_logprob(pipe, PROMPTS, num_inference_steps=4, guidance_scale=4.5, height=32, width=32,
                                  noise_level=1e-7, generator=_generators()).images
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-4)  # same CFG, timesteps and decoding; η ≈ 0


def test_recomputed_log_prob_gives_ratio_exactly_one(pipe, trajectory) -> None:
    for j in range(trajectory.log_probs.shape[1]):
        step = fl.step_log_prob(pipe.transformer, trajectory.latents[:, j], trajectory.next_latents[:, j],
                                trajectory.timesteps[j], trajectory.step_indices[j], trajectory.sigmas,
                                trajectory.text, guidance_scale=4.5)
        ratio = torch.exp(step.log_prob - trajectory.log_probs[:, j])
        assert torch.equal(ratio, torch.ones_like(ratio))  # same model, same batch: bit-identical


def test_log_prob_gradient_reaches_lora_and_changes_ratio(trajectory) -> None:
    from peft import LoraConfig

    from rewardkit.testing.pipelines import tiny_sd3_pipeline

    transformer = tiny_sd3_pipeline().transformer
    # to_out.0 too, and a 0.5 nudge below: on this tiny model a 0.05 nudge of q/v alone moves the log-prob by only
    # ~1e-5 relative, at allclose's own tolerance (it failed with 2 threads on thread-dependent rounding).
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                       target_modules=["to_q", "to_v", "to_out.0"]))
    text = trajectory.text.select(slice(0, 2))
    step = fl.step_log_prob(transformer, trajectory.latents[:, 1], trajectory.next_latents[:, 1], trajectory.timesteps[1],
                            1, trajectory.sigmas, text, guidance_scale=4.5)
    step.log_prob.sum().backward()
    grads = [p.grad for n, p in transformer.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and float(g.abs().sum()) > 0 for g in grads)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.add_(0.5)
        moved = fl.step_log_prob(transformer, trajectory.latents[:, 1], trajectory.next_latents[:, 1],
                                 trajectory.timesteps[1], 1, trajectory.sigmas, text, guidance_scale=4.5)
    assert not torch.allclose(moved.log_prob, trajectory.log_probs[:, 1])


def test_sampling_needs_two_steps(pipe) -> None:
    with pytest.raises(ValueError, match="num_inference_steps >= 2"):
        fl.sample_with_logprob(pipe, PROMPTS, num_inference_steps=1, guidance_scale=1.0, height=32, width=32)
