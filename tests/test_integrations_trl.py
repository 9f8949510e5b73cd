"""TRL 1.x ``reward_funcs`` adapter: the call contract, then one real ``trl.GRPOTrainer`` step.

The contract tests call the adapter exactly as trl 1.16 ``GRPOTrainer._calculate_rewards`` does
(``trl/trainer/grpo_trainer.py`` L1583-L1598, L1626-L1628: keyword call, per-row dataset columns,
``trainer_state``, ``log_extra``, ``log_metric``). The trainer test renders the policy's completions
with a tiny diffusers pipeline and scores them with tiny PickScore (sync) and aesthetic (async).
"""

from __future__ import annotations

import asyncio
import math
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

import rewardkit.testing as rkt
from rewardkit.compose import compose
from rewardkit.integrations.trl import as_reward_func, message_text, pipeline_renderer

PROMPTS = ["a photo of a cat", "a photo of a cat", "a red car", "a red car"]
COMPLETIONS = ["a fluffy cat on a sofa", "cat, oil painting", "a red sports car", "car"]
IMAGES = rkt.random_images(4, 32, 32, seed=3)


def _render(prompts, completions, **kwargs):
    return IMAGES[: len(prompts)]


class _Recorder:
    """Collects what TRL's ``log_metric`` / ``log_extra`` hooks receive."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.extra: dict[str, list] = {}

    def log_metric(self, name: str, value: float) -> None:
        self.metrics[name] = value

    def log_extra(self, column: str, values: list) -> None:
        self.extra[column] = values


class _HalfNaN:
    """A prompt-free callable reward (not an nn.Module) that cannot score odd rows."""

    name, higher_is_better, differentiable, requires_prompt = "half", True, False, False

    def __call__(self, images, prompts=None):
        scores = images.mean(dim=(1, 2, 3))
        scores[1::2] = float("nan")
        return scores


def test_plain_text_scores_equal_the_reward(tiny_reward) -> None:
    reward = tiny_reward("pickscore")
    fn = as_reward_func(reward, render=_render)
    out = fn(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=[[1]] * 4, trainer_state=None)
    assert fn.__name__ == "pickscore" and all(isinstance(v, float) for v in out)
    torch.testing.assert_close(torch.tensor(out), reward(IMAGES, PROMPTS))
    by_completion = as_reward_func(reward, render=_render, prompt_from="completion")(prompts=PROMPTS, completions=COMPLETIONS)
    torch.testing.assert_close(torch.tensor(by_completion), reward(IMAGES, COMPLETIONS))


def test_conversational_inputs_and_prompt_column(tiny_reward) -> None:
    seen = {}

    def render(prompts, completions, **kwargs):
        seen.update(prompts=prompts, completions=completions)
        return IMAGES

    prompts = [[{"role": "system", "content": "Rewrite the prompt."}, {"role": "user", "content": f"Rewrite: {p}"}]
               for p in PROMPTS]
    completions = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    reward = tiny_reward("pickscore")
    fn = as_reward_func(reward, render=render, prompt_from="subject")
    out = fn(prompts=prompts, completions=completions, subject=PROMPTS, trainer_state=None)
    assert seen == {"prompts": [f"Rewrite: {p}" for p in PROMPTS], "completions": COMPLETIONS}
    torch.testing.assert_close(torch.tensor(out), reward(IMAGES, PROMPTS))  # scored against the raw prompt
    blocks = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert message_text(blocks, "user") == "a b" and message_text("plain", "user") == "plain"


def test_nan_rows_become_none_and_name_is_trl_log_name() -> None:
    from trl.trainer.utils import get_callable_name, is_async_callable

    fn = as_reward_func(_HalfNaN(), render=_render, prompt_from=None, name="brightness")
    out = fn(prompts=PROMPTS, completions=COMPLETIONS)
    assert out[1] is None and out[3] is None and all(isinstance(v, float) for v in out[::2])
    assert get_callable_name(fn) == "brightness" and not is_async_callable(fn)
    assert is_async_callable(as_reward_func(_HalfNaN(), render=_render, asynchronous=True))


def test_dataset_columns_reach_render_sliced_per_batch(tiny_reward) -> None:
    calls = []
    state = SimpleNamespace(global_step=7)

    def render(prompts, completions, seed, trainer_state):
        calls.append((list(prompts), list(seed), trainer_state.global_step))
        return IMAGES[:2] if seed[0] == 10 else IMAGES[2:]

    reward = tiny_reward("pickscore")
    fn = as_reward_func(reward, render=render, batch_size=2)
    out = fn(prompts=PROMPTS, completions=COMPLETIONS, seed=[10, 10, 20, 20], trainer_state=state)
    assert calls == [(PROMPTS[:2], [10, 10], 7), (PROMPTS[2:], [20, 20], 7)]
    torch.testing.assert_close(torch.tensor(out), reward(IMAGES, PROMPTS))


def test_images_from_a_column(tiny_reward) -> None:
    reward = tiny_reward("aesthetic")
    fn = as_reward_func(reward, image_key="rendered", prompt_from=None)
    out = fn(prompts=PROMPTS, completions=COMPLETIONS, rendered=list(IMAGES))
    torch.testing.assert_close(torch.tensor(out), reward(IMAGES))
    chunked = as_reward_func(reward, image_key="rendered", prompt_from=None, batch_size=3)
    assert chunked(prompts=PROMPTS, completions=COMPLETIONS, rendered=IMAGES) == pytest.approx(out, rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match="image_key='rendered' is not among"):
        fn(prompts=PROMPTS, completions=COMPLETIONS, other=[0] * 4)
    with pytest.raises(ValueError, match="vision-model input"):
        as_reward_func(reward, image_key="images")


def test_composed_parts_are_logged_through_trl_hooks(tiny_reward) -> None:
    total = compose({tiny_reward("pickscore"): 1.0, tiny_reward("aesthetic"): 0.5})
    recorder = _Recorder()
    fn = as_reward_func(total, render=_render, name="total")
    out = fn(prompts=PROMPTS, completions=COMPLETIONS, log_metric=recorder.log_metric, log_extra=recorder.log_extra)
    assert {"rewards/total/frac_none", "rewards/total/pickscore/mean", "rewards/total/aesthetic/mean"} <= set(recorder.metrics)
    assert recorder.extra["total/pickscore"] == pytest.approx(total.evaluate(IMAGES, PROMPTS).details["pickscore"].tolist())
    assert len(out) == 4


def test_bad_inputs_raise_clear_errors(tiny_reward) -> None:
    reward = tiny_reward("pickscore")
    with pytest.raises(ValueError, match="4 prompts and 3 completions"):
        as_reward_func(reward, render=_render)(prompts=PROMPTS, completions=COMPLETIONS[:3])
    with pytest.raises(ValueError, match=r"expected a float tensor \(4, 3, H, W\)"):
        as_reward_func(reward, render=lambda p, c, **k: IMAGES[:2])(prompts=PROMPTS, completions=COMPLETIONS)

    def broken(prompts, completions, **kwargs):
        raise OSError("pipeline offline")

    with pytest.raises(RuntimeError, match="render.*failed on 4 rows: OSError: pipeline offline") as info:
        as_reward_func(reward, render=broken)(prompts=PROMPTS, completions=COMPLETIONS)
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(ValueError, match="prompt_from='subject' names no column"):
        as_reward_func(reward, render=_render, prompt_from="subject")(prompts=PROMPTS, completions=COMPLETIONS)
    with pytest.raises(ValueError, match="exactly one of render"):
        as_reward_func(reward)
    with pytest.raises(TypeError, match="pipeline_renderer"):
        as_reward_func(reward, render="not callable")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="asynchronous=True"):
        as_reward_func(reward, render=_render, executor=ThreadPoolExecutor(1))


def test_async_variant_scores_in_a_worker_thread(tiny_reward) -> None:
    pickscore, aesthetic = tiny_reward("pickscore"), tiny_reward("aesthetic")  # one instance per concurrent function
    threads = []

    def render(prompts, completions, **kwargs):
        threads.append((threading.get_ident(), torch.is_inference_mode_enabled()))
        return IMAGES

    with ThreadPoolExecutor(max_workers=2) as pool:
        first = as_reward_func(pickscore, render=render, asynchronous=True, executor=pool)
        second = as_reward_func(aesthetic, render=render, prompt_from=None, asynchronous=True, executor=pool)

        async def both():  # as GRPOTrainer awaits its async reward functions (asyncio.gather)
            return await asyncio.gather(first(prompts=PROMPTS, completions=COMPLETIONS),
                                        second(prompts=PROMPTS, completions=COMPLETIONS))

        by_pickscore, by_aesthetic = asyncio.run(both())
        picklable = as_reward_func(pickscore, render=_render, asynchronous=True, executor=pool)
        clone = pickle.loads(pickle.dumps(picklable))
    torch.testing.assert_close(torch.tensor(by_pickscore), pickscore(IMAGES, PROMPTS))
    torch.testing.assert_close(torch.tensor(by_aesthetic), aesthetic(IMAGES))
    assert len(threads) == 2 and all(ident != threading.get_ident() and inference for ident, inference in threads)
    assert clone.executor is None and clone.__name__ == "pickscore"


def test_pipeline_renderer_seeds_rows() -> None:
    from rewardkit.testing.pipelines import generate_images, tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    render = pipeline_renderer(pipe, seed_key="seed", num_inference_steps=2, height=32, width=32)
    images = render(PROMPTS[:2], COMPLETIONS[:2], seed=[5, 6])
    assert images.shape == (2, 3, 32, 32)
    torch.testing.assert_close(images, generate_images(pipe, COMPLETIONS[:2], seeds=[5, 6]), atol=1e-5, rtol=1e-5)


def test_grpo_trainer_step_logs_rewards(tiny_reward, tmp_path) -> None:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rewardkit.testing.language import tiny_causal_lm
    from rewardkit.testing.pipelines import generate_images, tiny_sd_pipeline

    pipe, calls = tiny_sd_pipeline(), []

    def render(prompts, completions, seed, **kwargs):
        images = generate_images(pipe, completions, seeds=seed)
        calls.append(SimpleNamespace(prompts=list(prompts), completions=list(completions), seeds=list(seed),
                                     shape=tuple(images.shape), thread=threading.get_ident(), keys=sorted(kwargs)))
        return images

    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "a cat"}], [{"role": "user", "content": "a dog"}]],
                                 "seed": [1, 2]})
    args = GRPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, max_steps=1, learning_rate=1e-3,
                      per_device_train_batch_size=4, num_generations=2, max_completion_length=8, report_to=[],
                      logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, gradient_checkpointing=False)
    funcs = [as_reward_func(tiny_reward("pickscore"), render=render),
             as_reward_func(tiny_reward("aesthetic"), render=render, prompt_from=None, asynchronous=True)]
    trainer = GRPOTrainer(model=str(tiny_causal_lm(tmp_path)), reward_funcs=funcs, args=args, train_dataset=dataset)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reference/rl_integration.md §3.2: one thread is faster and steadier on 2 vCPUs
    try:
        trainer.train()
    finally:
        torch.set_num_threads(threads)

    assert len(calls) == 2  # one per reward function, 4 rows = 2 prompts x 2 generations
    for call in calls:
        assert call.shape == (4, 3, 32, 32) and len(call.completions) == 4 and call.keys == ["trainer_state"]
        assert sorted(call.prompts) == ["a cat", "a cat", "a dog", "a dog"] and sorted(call.seeds) == [1, 1, 2, 2]
        assert all(isinstance(c, str) for c in call.completions)
    assert calls[0].thread == threading.get_ident() != calls[1].thread  # the async one scored in a worker thread
    logged = trainer.state.log_history[0]
    for key in ("rewards/pickscore/mean", "rewards/pickscore/std", "rewards/aesthetic/mean", "rewards/aesthetic/std",
                "reward", "rewards/pickscore/cosine/mean", "rewards/pickscore/frac_none"):
        assert math.isfinite(logged[key]), key
    assert logged["rewards/pickscore/frac_none"] == 0.0
