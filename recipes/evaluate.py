"""Benchmark a text-to-image pipeline (optionally with a LoRA from a training run): rewards and FID / KID / CMMD.

Generates ``seeds_per_prompt`` images for every prompt of a prompt set with fixed seeds (each image
depends only on its prompt and seed, so any number of processes gives the same images), saves them,
scores each with every reward of the config (the composed total and each part), measures the set
metrics against a reference (``.npz`` statistics from ``rewardkit fid-stats`` or an image folder), and
writes ``results.json``, ``scores.csv`` and ``report.html`` (grid, histograms, summary, training curve)
into ``output_dir``. A summary table is printed at the end. Metrics and rewards come from the config.
A ``.jsonl`` prompt file's records (flow_grpo's GenEval files) reach the rewards as ``metadata=``.

Launch (real models; references made once with ``rewardkit fid-stats REF_DIR --out ref.npz --features``):

    accelerate launch recipes/evaluate.py --config recipes/configs/evaluate.yaml --output_dir runs/eval
    accelerate launch --num_processes 8 --multi_gpu recipes/evaluate.py --config recipes/configs/evaluate.yaml \
        --output_dir runs/eval-lora --lora runs/ddpo/checkpoints/checkpoint-500 --training_run runs/ddpo

CPU smoke test (tiny random pipeline, rewards and extractors from ``rewardkit.testing``; builds its own
tiny reference folder; ~20 s of CPU time per process, mostly imports and building the tiny models):

    ACCELERATE_USE_CPU=1 accelerate launch --num_processes 2 --multi_gpu recipes/evaluate.py --tiny --output_dir D

Expected runtime (unmeasured estimate): SD 1.5 at 512 px, 25 steps, 16 prompts x 4 seeds with PickScore,
ImageReward, FID and KID: a few minutes on one A100, dominated by sampling. FID needs thousands of
images to be meaningful (it is biased at small n); the report states n with every set metric.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from rewardkit.recipe_support import common as rc  # rewardkit: shared recipe support

PROJECT = "rewardkit-evaluate"
LORA_SUFFIX = ".lora.safetensors"  # rewardkit.recipe_support.checkpoint's adapter files
TINY_REFERENCE_IMAGES = 12  # random smooth images written as the --tiny reference folder
TINY_FEATURE_DIM = 16  # rewardkit.testing.PixelFeatures width for --tiny FID / KID


@dataclass
class EvalConfig(rc.CommonConfig):
    """Evaluation fields; the shared ones (rewards, pipeline, resolution, steps, ...) are in CommonConfig.

    ``train_batch_size`` is used here as the images per process per pipeline call (per GPU!).
    """

    family: str = "sd"  # pipeline family: "sd" (StableDiffusionPipeline) or "sd3"
    lora: str | None = None  # a training run's checkpoint folder (its *.lora.safetensors) or that file
    prompt_file: str | None = None  # .txt (one prompt per line) or .jsonl ({"prompt": ...} per line); None = `prompts`
    num_prompts: int | None = None  # use only the first N prompts (None = all)
    seeds_per_prompt: int = 4  # images per prompt, seeds first_seed .. first_seed + K - 1
    first_seed: int = 0
    # set metrics: {"fid"|"kid"|"cmmd"|other distribution metric: {"reference": .npz or folder, **options}}
    set_metrics: dict[str, dict] | str | None = field(default_factory=dict)
    save_images: bool = True  # write every image to output_dir/images (needed for the report's grid)
    report_max_images: int = 64  # thumbnails embedded in report.html (scores.csv has every row)
    training_run: str | None = None  # a training run's output_dir: its TensorBoard scalars become curves
    title: str = "rewardkit evaluation"

    TINY_OVERRIDES: ClassVar[dict[str, Any]] = {
        **rc.CommonConfig.TINY_OVERRIDES, "num_inference_steps": 2, "num_prompts": 4, "seeds_per_prompt": 2,
        "train_batch_size": 4, "rewards": {"pickscore": 1.0, "aesthetic": 0.5},
        "set_metrics": {"fid": {}, "kid": {"subsets": 10, "subset_size": 4}, "cmmd": {}},
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        self.set_metrics = rc.json_field("set_metrics", self.set_metrics)  # rewardkit: YAML mapping or CLI JSON
        if self.seeds_per_prompt < 1 or (self.num_prompts is not None and self.num_prompts < 1):
            raise ValueError("config: seeds_per_prompt and num_prompts must be >= 1")
        if self.family not in ("sd", "sd3"):
            raise ValueError(f"config: family must be 'sd' or 'sd3', got {self.family!r}")


# ----------------------------------------------------------------------------------------------- phases
def load_prompt_rows(cfg: EvalConfig) -> tuple[rc.PromptList, list[int]]:
    """The flat (prompt, seed) rows: every prompt ``seeds_per_prompt`` times, prompt-major.

    Prompts come from ``prompt_file`` (else ``prompts`` or the built-in set) through ``load_prompts``: a
    ``.jsonl`` file's records stay with their prompts (``rows.metadata_for``), so rewards that need them
    (GenEval) are scored with ``metadata=``.
    """
    if cfg.prompt_file is not None:
        path = Path(cfg.prompt_file)
        if not path.is_file() or path.suffix not in (".txt", ".jsonl"):
            raise ValueError(f"config: prompt_file must be an existing .txt or .jsonl file, got {cfg.prompt_file!r}")
    source = cfg if cfg.prompt_file is None else dataclasses.replace(cfg, prompts=cfg.prompt_file)
    prompts = rc.load_prompts(source)  # rewardkit: .txt / .jsonl (with records) or BUILTIN_PROMPTS
    chosen = prompts[: cfg.num_prompts] if cfg.num_prompts else list(prompts)
    if not chosen:
        raise ValueError("config: the prompt set is empty")
    seeds = range(cfg.first_seed, cfg.first_seed + cfg.seeds_per_prompt)
    return rc.PromptList([p for p in chosen for _ in seeds], prompts.records), [s for _ in chosen for s in seeds]


class MetadataReward(rc.PromptMetadataReward):
    """``PromptMetadataReward`` that also shows ``run_evaluation`` the reward's ``stateful`` flag, so a z-score
    composition is scored with its statistics frozen (``update_stats=False``) as without metadata."""

    @property
    def stateful(self) -> bool:
        return bool(getattr(self.reward, "stateful", False))


def load_lora(cfg: EvalConfig, pipe: Any) -> int | None:
    """Add the checkpoint's LoRA adapter to the denoiser; returns the checkpoint's step (if recorded)."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(str(cfg.lora))
    files = sorted(path.glob(f"*{LORA_SUFFIX}")) if path.is_dir() else [path]
    if len(files) != 1 or not files[0].is_file():
        raise ValueError(f"config: lora must be a checkpoint folder with exactly one *{LORA_SUFFIX} file, or that "
                         f"file; {path} has {[f.name for f in files]}")
    weights = load_file(str(files[0]))
    ranks = {t.shape[0] for k, t in weights.items() if "lora_A" in k}
    if len(ranks) != 1:
        raise ValueError(f"{files[0]}: expected one LoRA rank in its lora_A weights, found {sorted(ranks)}")
    run_config = files[0].parent.parent.parent / "config.yaml"  # output_dir/checkpoints/checkpoint-N/
    alpha = cfg.lora_alpha
    if run_config.is_file():
        import yaml

        alpha = float(yaml.safe_load(run_config.read_text()).get("lora_alpha", alpha))
    lora_cfg = dataclasses.replace(cfg, lora_rank=ranks.pop(), lora_alpha=alpha)
    denoiser = rc.denoiser_of(pipe)  # rewardkit:
    rc.add_lora(denoiser, lora_cfg)  # rewardkit: the training recipes' adapter layout
    missing = sorted(set(get_peft_model_state_dict(denoiser)) ^ set(weights))
    if missing:
        raise ValueError(f"{files[0]}: LoRA keys do not match the pipeline's denoiser: {missing[:5]}")
    set_peft_model_state_dict(denoiser, {k: v.to(denoiser.dtype) for k, v in weights.items()})
    denoiser.to(dtype=next(iter(pipe.vae.parameters())).dtype).eval()
    meta = files[0].parent / "meta.json"
    return int(json.loads(meta.read_text())["step"]) if meta.is_file() else None


def tiny_reference(cfg: EvalConfig, accelerator: Any) -> Path:
    """A folder of random smooth images as the --tiny reference set (written by the main process)."""
    from rewardkit.eval_report import save_png  # rewardkit:
    from rewardkit.testing import random_images  # rewardkit:

    folder = Path(cfg.output_dir) / "tiny-reference"
    if accelerator.is_main_process:
        images = random_images(TINY_REFERENCE_IMAGES, cfg.resolution, cfg.resolution, seed=cfg.seed + 1)
        for index, image in enumerate(images):
            save_png(image, folder / f"{index:03d}.png")  # rewardkit:
    accelerator.wait_for_everyone()
    return folder


def build_set_metrics(cfg: EvalConfig, accelerator: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``({name: metric}, {name: reference source})`` from ``cfg.set_metrics``; FID and KID share one
    extractor when their presets match (each image is embedded once)."""
    from rewardkit.metrics.fid import FrechetDistance
    from rewardkit.metrics.kid import KID
    from rewardkit.registry import load
    from rewardkit.testing import load_tiny
    from rewardkit.testing.metrics import PixelFeatures

    metrics, references, shared = {}, {}, {}
    # transformers 5's save_pretrained writes on torch.distributed rank 0 only (distributed/mixin.py
    # should_save_on_this_rank): the main process builds the tiny HF folders first, the others reuse them.
    tiny_root = Path(cfg.output_dir) / rc.TINY_WEIGHTS_FOLDER / "set-metrics"
    reference = tiny_reference(cfg, accelerator) if cfg.tiny and cfg.set_metrics else None
    for name, spec in cfg.set_metrics.items():
        options = dict(spec or {})
        references[name] = reference if cfg.tiny else options.pop("reference", None)
        if references[name] is None:
            raise ValueError(f"config: set_metrics.{name} needs reference: a .npz from `rewardkit fid-stats` or a folder")
        if name in ("fid", "kid"):
            preset = options.pop("preset", "clean")
            if preset not in shared:  # rewardkit: FID-Inception (tiny: pixel features), shared by FID and KID
                shared[preset] = (PixelFeatures(TINY_FEATURE_DIM).freeze() if cfg.tiny
                                  else load("fid", preset=preset, device=accelerator.device).extractor)
            cls = FrechetDistance if name == "fid" else KID
            metrics[name] = cls(shared[preset], **options)  # rewardkit:
        elif cfg.tiny:
            with accelerator.main_process_first():
                metrics[name] = load_tiny(name, tiny_root, **options).to(accelerator.device)  # rewardkit:
        else:
            metrics[name] = load(name, device=accelerator.device, **options)  # rewardkit:
    return metrics, references


def training_history(run_dir: str | None) -> list[dict[str, float]]:
    """Scalars of a training run's TensorBoard logs as rows ``{"step": s, tag: value, ...}``."""
    if not run_dir:
        return []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    by_step: dict[int, dict[str, float]] = {}
    for events in sorted(Path(run_dir).rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags().get("scalars", []):
            for event in accumulator.Scalars(tag):
                by_step.setdefault(int(event.step), {"step": int(event.step)})[tag] = float(event.value)
    if not by_step:
        raise ValueError(f"config: training_run {run_dir} has no TensorBoard scalars (events.out.tfevents.*)")
    return [by_step[s] for s in sorted(by_step)]


def write_outputs(cfg: EvalConfig, accelerator: Any, result: Any, step: int | None) -> None:
    """Main process: results.json / scores.csv / report.html, tracker logs and the printed summary."""
    from rewardkit.eval_report import summarize_scores, summary_text, write_eval_report  # rewardkit:

    metrics = {f"eval/{name}_mean": s["mean"] for name, s in summarize_scores(result.rows, result.score_names).items()}
    metrics.update({f"eval/{name}": m["value"] for name, m in result.set_metrics.items()})
    rc.log_metrics(accelerator, {k: v for k, v in metrics.items() if math.isfinite(v)}, step=step or 0)  # rewardkit:
    if not accelerator.is_main_process:
        return
    extra = {"num_processes": result.num_processes, "lora_step": step}
    paths = write_eval_report(cfg.output_dir, result.rows, result.score_names, result.set_metrics,  # rewardkit:
                              config=dataclasses.asdict(cfg), history=training_history(cfg.training_run),
                              title=cfg.title, max_images=cfg.report_max_images, extra=extra)
    print(summary_text(result.rows, result.score_names, result.set_metrics))  # rewardkit:
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def main(argv: list[str] | None = None) -> None:
    from rewardkit.integrations.evaluation import run_evaluation  # rewardkit:

    cfg = rc.parse_config(EvalConfig, argv)  # rewardkit: --config yaml, --tiny, --field overrides
    accelerator = rc.make_accelerator(cfg, PROJECT)  # rewardkit: trackers + seeding
    rc.setup_logging(accelerator)
    rc.write_config(accelerator, cfg)
    prompts, seeds = load_prompt_rows(cfg)
    world = accelerator.num_processes
    rc.check_batch_arithmetic(cfg, accelerator, images=len(prompts),  # rewardkit: printed at start-up
                              max_images_per_process=math.ceil(len(prompts) / world),
                              pipeline_calls_per_process=math.ceil(math.ceil(len(prompts) / world) / cfg.train_batch_size))
    pipe = rc.load_pipeline(cfg, cfg.family, accelerator.device, rc.weight_dtype(accelerator))  # rewardkit:
    step = load_lora(cfg, pipe) if cfg.lora else None
    reward = rc.build_reward(cfg, accelerator.device, accelerator)  # rewardkit: rk.compose of cfg.rewards
    set_metrics, references = build_set_metrics(cfg, accelerator)
    call_kwargs = {"num_inference_steps": cfg.num_inference_steps, "guidance_scale": cfg.guidance_scale,
                   "height": cfg.resolution, "width": cfg.resolution}
    image_dir = Path(cfg.output_dir) / "images" if cfg.save_images else None
    scored = MetadataReward(reward, prompts) if prompts.records else reward  # rewardkit: .jsonl records as metadata=
    result = run_evaluation(pipe, prompts, seeds, {"reward": scored}, set_metrics,  # rewardkit: sharded, reduced
                            accelerator=accelerator, references=references, batch_size=cfg.train_batch_size,
                            call_kwargs=call_kwargs, image_dir=image_dir)
    write_outputs(cfg, accelerator, result, step)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # reference/rl_integration.md section 4: avoids SIGABRT at exit on gloo


if __name__ == "__main__":
    main()
