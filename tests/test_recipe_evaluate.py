"""recipes/evaluate.py --tiny under `accelerate launch` with 1 and 2 real CPU processes (gloo): exit 0, artefacts,
TensorBoard keys; its numbers equal the metrics called directly on the same tiny pipeline + LoRA, prompts and
seeds; and 1 process equals 2 processes. Config parsing and prompt files are checked in-process."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from recipe_harness import import_recipe, scalar_events, start_launch

LORA_STEP = 7
LORA_STD = 0.3  # random LoRA weights large enough to change the tiny pipeline's images visibly
PROMPTS, SEEDS = 3, 3  # 9 images: uneven shards over 2 ranks (5 + 4), the case where unpadded gathers fail
BATCH = 1  # images per pipeline call: the same batches in every launch and in the direct computation
# Measured here: 1 vs 2 processes: rewards and PNGs identical, FID 1.6e-9 relative (float64 sums in another
# order), KID / CMMD identical. Recipe vs direct calls: PickScore 1.4e-6 absolute on scores ~4 (3.6e-7 relative;
# the recipe scores 1 image per call, the direct call all 9), KID 2.7e-7, FID 1.2e-8, CMMD 6.4e-9 relative
# (features extracted in other batches). Stated tolerances:
REWARD_TOL = {"rel": 1e-5, "abs": 1e-6}
SET_METRIC_REL_TOL = 1e-5

recipe = import_recipe("evaluate")


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread, as the launches run (OMP_NUM_THREADS=1): the direct computation then uses the same
    BLAS blocking (with 2 threads one pixel in 8 images moved by 1/255 here), and it is faster on 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _lora_pipeline(checkpoint: Path):
    """The tiny SD pipeline (seed 0, as the recipe builds it) with a random LoRA, saved as a training checkpoint."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from rewardkit.recipe_support.common import add_lora
    from rewardkit.testing.pipelines import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=0)
    params = add_lora(pipe.unet, SimpleNamespace(lora_rank=4, lora_alpha=4.0))
    generator = torch.Generator().manual_seed(11)
    for param in params:
        param.data = torch.randn(param.shape, generator=generator) * LORA_STD
    pipe.unet.eval()
    checkpoint.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(pipe.unet).items()},
              str(checkpoint / "denoiser.lora.safetensors"))
    (checkpoint / "meta.json").write_text(json.dumps({"step": LORA_STEP}))
    return pipe


def _launch(output_dir: Path, checkpoint: Path, processes: int) -> subprocess.Popen:
    return start_launch("evaluate", processes, output_dir, "--lora", str(checkpoint), "--num_prompts", str(PROMPTS),
                        "--seeds_per_prompt", str(SEEDS), "--train_batch_size", str(BATCH))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Both launches, run side by side; plus the LoRA pipeline they evaluate."""
    root = tmp_path_factory.mktemp("rk-recipe-evaluate")
    checkpoint = root / "train" / "checkpoints" / f"checkpoint-{LORA_STEP}"
    pipe = _lora_pipeline(checkpoint)
    launched = {n: _launch(root / f"p{n}", checkpoint, n) for n in (1, 2)}
    logs = {n: process.communicate(timeout=420)[0] for n, process in launched.items()}
    for n, process in launched.items():
        assert process.returncode == 0, f"{n}-process launch failed:\n{logs[n][-4000:]}"
    return {"pipe": pipe, "dirs": {n: root / f"p{n}" for n in (1, 2)}, "logs": logs, "root": root}


def _read(folder: Path) -> tuple[dict, list[dict]]:
    with (folder / "scores.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return json.loads((folder / "results.json").read_text()), rows


def test_artefacts_logs_and_summary(runs: dict) -> None:
    for processes, folder in runs["dirs"].items():
        results, rows = _read(folder)
        assert results["num_processes"] == processes and results["lora_step"] == LORA_STEP
        assert results["num_images"] == len(rows) == 9 and len(list((folder / "images").glob("*.png"))) == 9
        assert set(results["set_metrics"]) == {"fid", "kid", "cmmd"}
        assert results["config"]["lora"].endswith(f"checkpoint-{LORA_STEP}")
        page = (folder / "report.html").read_text()
        assert "<svg" in page and 'class="grid"' in page and "cmmd" in page
        tags = {tag for run in scalar_events(folder) for tag in run}
        assert {"eval/reward_mean", "eval/pickscore_mean", "eval/aesthetic_mean", "eval/fid", "eval/kid",
                "eval/cmmd"} <= tags
        printed = runs["logs"][processes]
        header = [line for line in printed.splitlines() if line.split()[:3] == ["score", "mean", "std"]]
        assert len(header) == 1 and "preset=pixels" in printed and "wrote " in printed  # main process only


def test_one_process_equals_two_processes(runs: dict) -> None:
    (one, rows_one), (two, rows_two) = _read(runs["dirs"][1]), _read(runs["dirs"][2])
    assert [(r["prompt"], r["seed"]) for r in rows_one] == [(r["prompt"], r["seed"]) for r in rows_two]
    for a, b in zip(rows_one, rows_two):
        for name in ("reward", "pickscore", "aesthetic"):
            assert float(a[name]) == pytest.approx(float(b[name]), **REWARD_TOL)
        assert Path(a["path"]).read_bytes() == Path(b["path"]).read_bytes()  # identical PNGs
    for name, metric in one["set_metrics"].items():
        assert metric["value"] == pytest.approx(two["set_metrics"][name]["value"], rel=SET_METRIC_REL_TOL)
        assert metric["n"] == two["set_metrics"][name]["n"] == 9 and metric["n_reference"] == 12


def test_numbers_equal_the_metrics_called_directly(runs: dict, tmp_path: Path) -> None:
    import rewardkit.testing as rkt
    from rewardkit.image_io import load_image, pil_to_tensor
    from rewardkit.integrations.generation import generate_images
    from rewardkit.metrics.fid import FrechetDistance
    from rewardkit.metrics.kid import KID
    from rewardkit.testing.metrics import PixelFeatures

    folder = runs["dirs"][1]
    results, rows = _read(folder)
    prompts, seeds = [r["prompt"] for r in rows], [int(r["seed"]) for r in rows]
    assert prompts == [p for p in recipe.rc.BUILTIN_PROMPTS[:PROMPTS] for _ in range(SEEDS)]
    assert seeds == list(range(SEEDS)) * PROMPTS
    options = {"num_inference_steps": 2, "guidance_scale": 4.5, "height": 32, "width": 32}
    images = torch.cat([generate_images(runs["pipe"], prompts[i:i + BATCH], seeds[i:i + BATCH], **options)
                        for i in range(0, len(rows), BATCH)])
    for row, image in zip(rows, images):
        assert torch.equal(pil_to_tensor(load_image(row["path"])) * 255, (image * 255).round())
    runs["pipe"].unet.disable_adapters()
    without_lora = generate_images(runs["pipe"], prompts[:1], seeds[:1], **options)
    runs["pipe"].unet.enable_adapters()
    assert (without_lora - images[:1]).abs().max() > 1e-2  # the LoRA was applied

    for name in ("pickscore", "aesthetic"):
        direct = rkt.load_tiny(name, tmp_path)(images, prompts)
        assert [float(r[name]) for r in rows] == pytest.approx(direct.tolist(), **REWARD_TOL)
    reference = folder / "tiny-reference"
    extractor = PixelFeatures(recipe.TINY_FEATURE_DIM).freeze()
    direct_metrics = {"fid": FrechetDistance(extractor), "kid": KID(extractor, subsets=10, subset_size=4),
                      "cmmd": rkt.load_tiny("cmmd", tmp_path)}
    for name, metric in direct_metrics.items():
        metric.update(reference, real=True)
        metric.update(images, real=False)
        expected = metric.compute().reshape(-1).tolist()
        got = results["set_metrics"][name]
        assert [got["value"]] + ([got["std"]] if name == "kid" else []) == pytest.approx(expected, rel=SET_METRIC_REL_TOL)


def test_config_prompt_files_and_errors(tmp_path: Path) -> None:
    base = ["--output_dir", str(tmp_path), "--seeds_per_prompt", "3", "--first_seed", "5"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n\n{"prompt": "a dog", "tag": 1}\n')
    cfg = recipe.rc.parse_config(recipe.EvalConfig, base + ["--prompt_file", str(tmp_path / "p.jsonl")])
    assert recipe.load_prompt_rows(cfg) == (["a cat"] * 3 + ["a dog"] * 3, [5, 6, 7, 5, 6, 7])
    (tmp_path / "p.txt").write_text("one\n two \n\nthree\n")
    cfg = recipe.rc.parse_config(recipe.EvalConfig, base + ["--prompt_file", str(tmp_path / "p.txt"), "--num_prompts", "2"])
    assert recipe.load_prompt_rows(cfg)[0] == ["one"] * 3 + ["two"] * 3
    cfg = recipe.rc.parse_config(recipe.EvalConfig, base + ["--set_metrics", '{"fid": {"reference": "r.npz"}}'])
    assert cfg.set_metrics == {"fid": {"reference": "r.npz"}}
    tiny = recipe.rc.parse_config(recipe.EvalConfig, ["--output_dir", str(tmp_path), "--tiny", "--num_prompts", "3"])
    assert tiny.num_prompts == 3 and tiny.seeds_per_prompt == 2 and set(tiny.set_metrics) == {"fid", "kid", "cmmd"}
    with pytest.raises(ValueError, match="prompt_file must be an existing .txt or .jsonl"):
        recipe.load_prompt_rows(recipe.rc.parse_config(recipe.EvalConfig, base + ["--prompt_file", "missing.csv"]))
    with pytest.raises(ValueError, match="family must be"):
        recipe.rc.parse_config(recipe.EvalConfig, base + ["--family", "flux"])
    accelerator = SimpleNamespace(process_index=0, device=torch.device("cpu"), is_main_process=True)
    cfg = recipe.rc.parse_config(recipe.EvalConfig, base + ["--set_metrics", '{"fid": {}}'])
    with pytest.raises(ValueError, match="set_metrics.fid needs reference"):
        recipe.build_set_metrics(cfg, accelerator)
    with pytest.raises(ValueError, match="exactly one \\*.lora.safetensors"):
        recipe.load_lora(recipe.rc.parse_config(recipe.EvalConfig, base + ["--lora", str(tmp_path)]), None)


def test_training_history_reads_tensorboard_scalars(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "run" / "logs" / "proj"))
    for step, loss in ((0, 1.0), (2, 0.5)):
        writer.add_scalar("train/loss", loss, step)
    writer.add_scalar("eval/fid", 3.0, 2)
    writer.close()
    assert recipe.training_history(str(tmp_path / "run")) == [
        {"step": 0, "train/loss": 1.0}, {"step": 2, "train/loss": 0.5, "eval/fid": 3.0}]
    assert recipe.training_history(None) == []
    with pytest.raises(ValueError, match="no TensorBoard scalars"):
        recipe.training_history(str(tmp_path / "empty"))
