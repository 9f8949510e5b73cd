"""Reward backprop: fine-tune a Stable Diffusion (1.x or 3) LoRA by backpropagating a differentiable reward.

Two methods, one loop (reference/rl_integration.md §2.5, §2.6, §3.1):

* ``method: draft``: DRaFT-K (Clark et al., ICLR'24): sample with the whole chain under ``no_grad``
  except the last ``K`` steps (``draft_k``, default 1), decode with grad, ``loss = -reward``.
* ``method: alignprop``: AlignProp (``mihirp1998/AlignProp``; trl 0.23 ``AlignPropTrainer``): the same,
  with ``K`` drawn uniformly from ``[alignprop_k_min, alignprop_k_max]`` every micro-step.

The reward comes from the config (``rewards: {"pickscore": 1.0, "aesthetic": 0.1}``; default PickScore, and
under ``--tiny`` the toy mean-brightness reward, which the tiny random pipeline can visibly move) through
``rk.compose``; every part must be differentiable (the recipe refuses the others by name). Gradient
checkpointing on the denoiser (and optionally the reward's image tower), LoRA (peft) on the UNet
attention, gradient clipping; per-part rewards, loss, grad norm and ``K`` are logged to TensorBoard
(``output_dir/logs``); ``RewardEvalCallback`` (and ``FIDEvalCallback`` with ``fid_reference``) run every
``eval_every`` steps; checkpoints every ``checkpoint_every`` steps resume with ``--resume_from latest``;
at the end ``output_dir/report`` holds an evaluation of the trained LoRA (``results.json``,
``scores.csv``, ``report.html``, the images). The same held-out evaluation (the first ``eval_prompts``
prompts, seeds ``0..N-1``) also runs before the first step, so the report and the console state the
held-out reward before -> after training; the per-step training reward is a different random batch
every step (noisy) and is not that comparison.

Launch (real model; needs the SD 1.5 and PickScore weights):

    accelerate launch recipes/reward_backprop.py --config recipes/configs/reward_backprop.yaml
    accelerate launch --multi_gpu --num_processes 8 recipes/reward_backprop.py \
        --config recipes/configs/reward_backprop.yaml --method alignprop

Demo (tiny random pipeline, toy brightness reward, offline): the held-out reward on 8 fixed prompts x
seeds rises, measured 0.5082 -> 0.5170 (+0.0088; periodic evaluations 0.5095, 0.5139, 0.5152, 0.5172 at
steps 5-20; the 8 images' brightness after training spreads by a std of 0.0006). It is printed at the end
and plotted in output_dir/report/report.html. The 20 steps and 6 evaluations took 8-15 s in-process; with
imports, 111 s of wall time on the shared 2-core machine (load 7) this was written on (not timed idle):

    python recipes/reward_backprop.py --tiny --output_dir rewardkit-demo/train

CPU smoke test (tiny random models, offline; about 15 s of CPU per process, mostly imports):

    ACCELERATE_USE_CPU=1 accelerate launch --num_processes 2 --multi_gpu recipes/reward_backprop.py \
        --tiny --max_steps 2 --output_dir /tmp/rk-draft

Expected runtime: not measured on a GPU (none was available when this recipe was written). A
micro-step costs ``N - K`` no-grad denoiser calls (with CFG, on 2B latents), ``K`` grad calls that are
run twice under checkpointing (forward, then recompute in the backward), one VAE decode with grad and
the reward's forward and backward; with ``K = 1`` the no-grad chain dominates, as in plain sampling.
The tiny run takes well under a second per step on an idle CPU.

The ranks are kept in step by hand instead of DDP (which cannot follow a denoiser used ``K`` times in
one graph under checkpointing): rank 0's initial LoRA weights are broadcast, and the LoRA gradients are
averaged by one all-reduce after the backward pass.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

import torch

from rewardkit.recipe_support import common as rc  # rewardkit:
from rewardkit.training.backprop import reward_loss  # rewardkit:
from rewardkit.recipe_support.models import stop_requested  # rewardkit: stop_on_hacking_alarm
from rewardkit.training.truncated_sampling import draw_num_grad_steps, truncated_sample  # rewardkit:

logger = logging.getLogger("reward_backprop")

PROJECT_NAME = "reward_backprop"
REPORT_FOLDER = "report"  # under output_dir: the final evaluation
SEED_RANGE = 2**31  # per-image noise seeds are drawn in [0, SEED_RANGE)
DEFAULT_REWARDS = {"pickscore": 1.0}
# --tiny: a reward the tiny random pipeline can move (a tiny random PickScore stays flat: 4.6523 -> 4.6522)
TINY_REWARDS = {"rewardkit.testing.toy_rewards:load_brightness": 1.0}
HELD_OUT_KEY = "composed"  # the composed reward's column in the evaluation rows (RecordedReward.name)


@dataclass
class Config(rc.CommonConfig):
    """Reward-backprop fields on top of ``CommonConfig`` (see ``recipes/configs/reward_backprop.yaml``)."""

    method: Literal["draft", "alignprop"] = "draft"  # draft: fixed K; alignprop: K random per micro-step
    family: Literal["sd", "sd3"] = "sd"  # sd: SD 1.x UNet + DDIM; sd3: SD3 transformer + flow-matching Euler
    draft_k: int = 1  # DRaFT's K: final denoising steps backpropagated (Clark et al.: K=1 works best)
    alignprop_k_min: int = 1  # AlignProp: K drawn uniformly in [k_min, k_max] (>= 1: K=0 has no gradient)
    alignprop_k_max: int | None = None  # None = num_inference_steps (trl AlignPropConfig range (0, 50) at 50 steps)
    loss_scale: float = 1.0  # loss = -loss_scale * reward (AlignProp's loss_coeff)
    eta: float = 0.0  # DDIM eta of the training rollouts (0 = deterministic sampler)
    weight_decay: float = 1e-4  # AdamW weight decay (trl AlignPropConfig train_adam_weight_decay)
    checkpoint_denoiser: bool = True  # recompute the UNet in the backward pass of each grad step
    checkpoint_reward: bool = False  # recompute the reward's image-tower blocks (big reward models)
    final_report: bool = True  # evaluate before training and the trained LoRA after it, into output_dir/report
    # None: DEFAULT_REWARDS, or TINY_REWARDS under --tiny (a YAML or flag value wins either way)
    rewards: dict[str, float] | str | None = None

    # --tiny on top of the common tiny settings: 8 held-out prompts x seeds, a learning rate at which
    # 20 DRaFT-1 steps move the toy brightness reward clearly (tests/test_recipe_reward_backprop.py).
    TINY_OVERRIDES: ClassVar[dict[str, Any]] = {**rc.CommonConfig.TINY_OVERRIDES, "learning_rate": 0.1,
                                                "eval_prompts": 8, "eval_every": 5}

    def __post_init__(self) -> None:
        if self.rewards is None:
            self.rewards = dict(TINY_REWARDS if self.tiny else DEFAULT_REWARDS)
        super().__post_init__()
        k_max = self.num_inference_steps if self.alignprop_k_max is None else self.alignprop_k_max
        if not 1 <= self.draft_k <= self.num_inference_steps:
            raise ValueError(f"config: draft_k must be in [1, num_inference_steps={self.num_inference_steps}], "
                             f"got {self.draft_k}")
        if not 1 <= self.alignprop_k_min <= k_max <= self.num_inference_steps:
            raise ValueError(f"config: need 1 <= alignprop_k_min <= alignprop_k_max <= num_inference_steps "
                             f"({self.num_inference_steps}), got [{self.alignprop_k_min}, {self.alignprop_k_max}]")


class RecordedReward(torch.nn.Module):
    """The composed reward, keeping the per-part scores of its last call for logging.

    ``reward_loss`` calls the reward and sees only the total; this wrapper calls ``evaluate`` instead
    and keeps ``details`` (raw part scores, detached), so parts are logged without a second forward.
    """

    def __init__(self, reward: Any) -> None:
        super().__init__()
        self.reward = reward
        self.name, self.part_names = reward.name, list(reward.part_names)
        self.higher_is_better, self.differentiable = reward.higher_is_better, reward.differentiable
        self.requires_prompt = reward.requires_prompt
        self.last_parts: dict[str, torch.Tensor] = {}

    def forward(self, images: torch.Tensor, prompts: Any = None, **context: Any) -> torch.Tensor:
        output = self.reward.evaluate(images, prompts, **context)  # rewardkit: total + per-part details
        self.last_parts = {name: output.details[name] for name in self.part_names}
        return output.scores


def check_differentiable(reward: Any) -> None:
    """Refuse a composed reward with non-differentiable parts, naming them.

    ``reward.differentiable`` is True only if every part is; module parts are in ``reward.parts``, and
    plain-callable parts (not there) are named when the composed reward is not differentiable.
    """
    if reward.differentiable:  # rewardkit: all parts differentiable
        return
    modules = reward.parts  # rewardkit: the composed reward's module members, keyed by part name
    blocked = sorted(name for name in reward.part_names
                     if name not in modules or not getattr(modules[name], "differentiable", False))
    if blocked:
        raise ValueError(f"reward_backprop: rewards {blocked} are not differentiable, so they cannot be "
                         "backpropagated; remove them from `rewards` (use recipes/ddpo.py or flow_grpo.py for "
                         "non-differentiable rewards), or use differentiable ones (pickscore, hpsv2, aesthetic, ...)")


def build_models(cfg: Config, accelerator: Any) -> tuple[Any, list[torch.nn.Parameter], Any, Any]:
    """The frozen pipeline with a LoRA denoiser, its trainable parameters, the reward and the optimizer."""
    dtype = rc.weight_dtype(accelerator)  # rewardkit:
    pipe = rc.load_pipeline(cfg, cfg.family, accelerator.device, dtype)  # rewardkit: tiny pipeline under --tiny
    params = rc.add_lora(rc.denoiser_of(pipe), cfg)  # rewardkit: peft LoRA on to_q/to_k/to_v/to_out.0
    broadcast_parameters(accelerator, params)
    reward = rc.build_reward(cfg, accelerator.device, accelerator)  # rewardkit: rk.compose(cfg.rewards)
    check_differentiable(reward)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    optimizer = accelerator.prepare(optimizer)  # mixed-precision scaling; the UNet is not DDP-wrapped
    n_params = sum(p.numel() for p in params)
    logger.info("LoRA: %d trainable parameters; reward parts: %s", n_params, reward.part_names)
    return pipe, params, RecordedReward(reward), optimizer


def num_grad_steps(cfg: Config, step: int, micro: int) -> int:
    """``K`` for one micro-step; AlignProp's draw is seeded by (seed, step, micro): the same on every rank."""
    rng = random.Random(f"{cfg.seed}-k-{step}-{micro}")
    return draw_num_grad_steps(cfg.method, cfg.num_inference_steps, k=cfg.draft_k,  # rewardkit:
                               k_range=(cfg.alignprop_k_min, cfg.alignprop_k_max or cfg.num_inference_steps), rng=rng)


def sample_prompts(cfg: Config, prompts: Sequence[str], step: int, micro: int,
                   rank: int) -> tuple[list[str], list[int]]:
    """This rank's prompts and noise seeds for one micro-step, a function of (seed, step, micro, rank) only,
    so a resumed run draws what the uninterrupted one would have."""
    rng = random.Random(f"{cfg.seed}-batch-{step}-{micro}-{rank}")
    chosen = [rng.choice(prompts) for _ in range(cfg.train_batch_size)]
    return chosen, [rng.randrange(SEED_RANGE) for _ in chosen]


def micro_step(cfg: Config, accelerator: Any, pipe: Any, reward: RecordedReward, batch: tuple[list[str], list[int]],
               k: int) -> dict[str, float]:
    """Sample with the last ``k`` steps in the graph, score, backpropagate ``loss / accumulation``."""
    prompts, seeds = batch
    generators = [torch.Generator(accelerator.device).manual_seed(seed) for seed in seeds]
    with accelerator.autocast():
        sample = truncated_sample(pipe, prompts, num_grad_steps=k,  # rewardkit: grad through the last k steps
                                  num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                                  height=cfg.resolution, width=cfg.resolution, generator=generators, eta=cfg.eta,
                                  checkpoint=cfg.checkpoint_denoiser)
        loss = reward_loss(reward, sample.images, prompts, dtype=cfg.reward_dtype,  # rewardkit: -scale * reward
                           checkpoint=cfg.checkpoint_reward, scale=cfg.loss_scale)
    accelerator.backward(loss / cfg.gradient_accumulation_steps)
    metrics = {"train/loss": loss.detach(), "train/reward/mean": -loss.detach() / cfg.loss_scale,
               "train/num_grad_steps": float(k)}
    metrics.update({f"train/rewards/{name}/mean": scores.float().mean() for name, scores in reward.last_parts.items()})
    return {key: float(value) for key, value in metrics.items()}


def broadcast_parameters(accelerator: Any, params: list[torch.nn.Parameter]) -> None:
    """Copy rank 0's initial LoRA weights to every rank (DDP's start-up broadcast, done by hand): each rank
    seeds its RNG with ``seed + rank``, so peft's random LoRA init differs between ranks."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast

    flat = broadcast(torch.cat([p.detach().flatten() for p in params]), from_process=0)
    with torch.no_grad():
        for param, chunk in zip(params, flat.split([p.numel() for p in params])):
            param.copy_(chunk.view_as(param))


def average_gradients(accelerator: Any, params: list[torch.nn.Parameter]) -> None:
    """Average the LoRA gradients over processes with one all-reduce (the DDP step, done by hand)."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
    for param, chunk in zip(params, flat.split([p.numel() for p in params])):
        param.grad = chunk.view_as(param).to(param.dtype)


def train_step(cfg: Config, accelerator: Any, models: tuple, prompts: Sequence[str], step: int) -> dict[str, float]:
    """One optimizer step: ``gradient_accumulation_steps`` micro-steps, gradient average, clip, update."""
    pipe, params, reward, optimizer = models
    rows = []
    for micro in range(cfg.gradient_accumulation_steps):
        batch = sample_prompts(cfg, prompts, step, micro, accelerator.process_index)
        rows.append(micro_step(cfg, accelerator, pipe, reward, batch, num_grad_steps(cfg, step, micro)))
    average_gradients(accelerator, params)
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    grad_norm = accelerator.clip_grad_norm_(params, max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    local = {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]}
    keys = sorted(local)
    averaged = accelerator.reduce(torch.tensor([local[k] for k in keys], device=accelerator.device), "mean")
    return {**dict(zip(keys, averaged.tolist())), "train/grad_norm": float(grad_norm)}


def held_out_evaluation(cfg: Config, accelerator: Any, pipe: Any, reward: Any, image_dir: Path | None = None) -> Any:
    """Generate and score the fixed evaluation set: the first ``eval_prompts`` prompts, seeds ``0..N-1``.

    The same rows before and after training, so the two means compare the LoRA and nothing else
    (every rank calls; returns ``run_evaluation``'s ``EvalResult``, the same on every rank).
    """
    from rewardkit.integrations.evaluation import run_evaluation  # rewardkit:

    prompts = rc.load_prompts(cfg)  # rewardkit:
    prompts = [prompts[i % len(prompts)] for i in range(cfg.eval_prompts)]
    call_kwargs = {"num_inference_steps": cfg.num_inference_steps, "guidance_scale": cfg.guidance_scale,
                   "height": cfg.resolution, "width": cfg.resolution}
    set_metrics, references = {}, {}
    if cfg.fid_reference and image_dir is not None:  # FID of the trained model against the reference
        set_metrics, references = {"fid": rc.fid_metric(cfg, accelerator)}, {"fid": cfg.fid_reference}  # rewardkit:
    with torch.no_grad():
        return run_evaluation(pipe, prompts, range(len(prompts)), {reward.name: reward}, set_metrics,  # rewardkit:
                              accelerator=accelerator, references=references, call_kwargs=call_kwargs,
                              image_dir=image_dir)


def held_out_means(result: Any) -> dict[str, float]:
    """``{score column: mean over the finite rows}`` of an evaluation (NaN rows are counted, never averaged)."""
    from rewardkit.eval_report import summarize_scores  # rewardkit:

    return {name: stats["mean"] for name, stats in summarize_scores(result.rows, result.score_names).items()}


def final_evaluation(cfg: Config, accelerator: Any, pipe: Any, reward: Any, history: list[dict[str, float]],
                     before: Any = None, start: int = 0) -> dict[str, Any] | None:
    """Evaluate the trained LoRA on the evaluation prompts into ``output_dir/report`` (every rank calls).

    ``before`` is the same evaluation run at step ``start`` (before training); the report then plots
    before vs after and ``results.json`` holds both under ``"held_out"``, which is also returned.
    """
    from rewardkit.eval_report import write_eval_report  # rewardkit:

    folder = Path(cfg.output_dir) / REPORT_FOLDER
    result = held_out_evaluation(cfg, accelerator, pipe, reward, image_dir=folder / "images")
    held_out = None
    if before is not None:
        first, last = held_out_means(before), held_out_means(result)
        held_out = {"num_images": len(result.rows), "step_before": start, "step_after": history[-1]["step"]
                    if history else start, "before": first, "after": last,
                    "change": {name: last[name] - first[name] for name in last}}
    if accelerator.is_main_process:
        comparison = {name: (held_out["before"][name], held_out["after"][name])
                      for name in result.score_names} if held_out else None
        write_eval_report(folder, result.rows, result.score_names, result.set_metrics,  # rewardkit:
                          config=dataclasses.asdict(cfg), history=history, title="reward backprop: final evaluation",
                          extra={"held_out": held_out} if held_out else None, before_after=comparison)
        logger.info("final evaluation written to %s", folder)
        if held_out:
            first, last = held_out["before"][HELD_OUT_KEY], held_out["after"][HELD_OUT_KEY]
            logger.info("held-out eval reward: %.4f -> %.4f (%+.4f) on %d fixed prompts x seeds (step %d -> %d); "
                        "report: %s", first, last, last - first, held_out["num_images"], held_out["step_before"],
                        held_out["step_after"], folder / "report.html")
    return held_out


def setup(cfg: Config) -> Any:
    """Accelerator, logging, the resolved config file, and the start-up batch arithmetic."""
    accelerator = rc.make_accelerator(cfg, PROJECT_NAME)  # rewardkit: trackers, seeds
    rc.setup_logging(accelerator)  # rewardkit:
    rc.write_config(accelerator, cfg)  # rewardkit:
    k_max = cfg.draft_k if cfg.method == "draft" else cfg.alignprop_k_max or cfg.num_inference_steps
    rc.check_batch_arithmetic(cfg, accelerator, denoising_steps=cfg.num_inference_steps,  # rewardkit:
                              max_backprop_steps=k_max)
    return accelerator


def main(config: Config | Sequence[str] | None = None) -> list[dict[str, float]]:
    """Train; returns the per-step logged metrics (the same on every rank)."""
    cfg = config if isinstance(config, Config) else rc.parse_config(Config, config)  # rewardkit:
    accelerator = setup(cfg)
    models = build_models(cfg, accelerator)
    pipe, _, reward, optimizer = models
    denoiser = rc.denoiser_of(pipe)  # rewardkit: the LoRA UNet / transformer
    state = {"denoiser": denoiser, "optimizer": optimizer, "reward": reward.reward}
    callbacks = rc.eval_callbacks(cfg, pipe, reward.reward, accelerator)  # rewardkit: Reward/FID eval
    # rewardkit: LoRA, optimizer, normaliser, RNG and the callbacks (alarm history, FID reference)
    start = rc.resume(accelerator, cfg, state, callbacks=callbacks)
    prompts = rc.load_prompts(cfg)  # rewardkit:
    progress = rc.progress_bar(accelerator, cfg, initial=start)  # rewardkit:
    history: list[dict[str, float]] = []
    # the fixed held-out set before the first step (after a resume: at the resumed step), for the report
    before = held_out_evaluation(cfg, accelerator, pipe, reward.reward) if cfg.final_report else None
    step = start
    while step < cfg.max_steps:
        metrics = train_step(cfg, accelerator, models, prompts, step)
        step += 1
        rc.log_metrics(accelerator, metrics, step, progress, postfix=("train/reward/mean", "train/loss"))  # rewardkit:
        progress.update(1)
        evaluated: dict[str, float] = {}
        for callback in callbacks:  # rewardkit: every eval_every steps (None otherwise)
            # the step's optimised reward, already averaged over ranks (so every rank records the same mean)
            callback.record_train_reward(metrics["train/reward/mean"])
            evaluated.update(callback.maybe_evaluate(step, accelerator, model=denoiser) or {})
        history.append({"step": step, **metrics, **evaluated})
        stop = stop_requested(callbacks, step)  # rewardkit: stop_on_hacking_alarm, the same on every rank
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or stop:
            rc.save_checkpoint(accelerator, cfg, step, state, callbacks)  # rewardkit:
        if stop:
            break
    progress.close()
    if history:  # one line for logs that are not a terminal; a training batch is not a held-out comparison
        logger.info("trained steps %d-%d; training-batch reward (a different random batch each step, noisy) at the "
                    "last step: %.4f", history[0]["step"], history[-1]["step"], history[-1]["train/reward/mean"])
    if cfg.final_report:
        final_evaluation(cfg, accelerator, pipe, reward.reward, history, before=before, start=start)
    accelerator.end_training()
    return history


if __name__ == "__main__":
    main()
