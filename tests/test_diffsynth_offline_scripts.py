"""DiffSynth-Studio scripts run offline on rewardkit after changing only their import.

``rewardkit.testing.build_diffsynth_tree`` writes DiffSynth's ``./models`` tree (the exact relative paths of the
twelve metrics' default ``ModelConfig`` s) with tiny random checkpoints that carry their sizes in a
``rewardkit.json`` sidecar. The script below is written as DiffSynth's documented usage
(``XMetric.from_pretrained(model_config=ModelConfig(...))``, ``.compute``, ``.evaluate``): no ``config=``, no
rewardkit option; only its first line differs from a DiffSynth script (``rewardkit.metrics`` for
``diffsynth.metrics``).
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rewardkit.testing as rkt

REPO = "DiffSynth-Studio/ImageMetrics"

# DiffSynth-style usage of all twelve metric classes; the import is the only line changed.
SCRIPT = '''
from rewardkit.metrics import (AestheticMetric, BioCLIPMetric, CLIPMetric, FIDMetric, HPSv2Metric, HPSv3Metric,
    ImageRewardMetric, LPIPSMetric, ModelConfig, PickScoreMetric, QwenImageBenchMetric, UnifiedReward2Metric,
    UnifiedRewardEditMetric)
from PIL import Image

repo = "DiffSynth-Studio/ImageMetrics"
images = [Image.open(f"images/gen/{i}.png") for i in range(3)]
prompt = "a photo of a cat"
results = {}
for cls, file, processor in [(PickScoreMetric, "PickScore/model.safetensors", "PickScore/"),
                             (CLIPMetric, "CLIP-ViT-H-14-laion2B-s32B-b79K/model.safetensors",
                              "CLIP-ViT-H-14-laion2B-s32B-b79K/"),
                             (HPSv2Metric, "HPSv2/model.safetensors", None),
                             (BioCLIPMetric, "BioCLIPv2/open_clip_model.safetensors", None),
                             (HPSv3Metric, "HPSv3/model.safetensors", "HPSv3/")]:
    metric = cls.from_pretrained(
        model_config=ModelConfig(model_id=repo, origin_file_pattern=file),
        processor_config=ModelConfig(model_id=repo, origin_file_pattern=processor) if processor else None,
        device="cpu")
    results[cls.__name__] = (metric.compute(prompt, images), metric.evaluate(prompt, images))
aesthetic = AestheticMetric.from_pretrained(
    model_config=ModelConfig(model_id=repo, origin_file_pattern="Aesthetic/model.safetensors"), device="cpu")
results["AestheticMetric"] = (aesthetic.compute(images), aesthetic.evaluate(images))
image_reward = ImageRewardMetric.from_pretrained(
    model_config=ModelConfig(model_id=repo, origin_file_pattern="ImageReward/model.safetensors"),
    tokenizer_config=ModelConfig(model_id=repo, origin_file_pattern="ImageReward/"), device="cpu")
results["ImageRewardMetric"] = (image_reward.compute(prompt, images), image_reward.evaluate(prompt, images))
fid = FIDMetric.from_pretrained(model_config=ModelConfig(model_id=repo, origin_file_pattern="FID/model.safetensors"),
                                device="cpu")
results["FIDMetric"] = fid.compute("images/real", "images/gen")
lpips = LPIPSMetric.from_pretrained(net="alex", device="cpu")
results["LPIPSMetric"] = lpips.compute("images/gen/0.png", "images/real/0.png")
ur2 = UnifiedReward2Metric.from_pretrained(device="cpu")
results["UnifiedReward2Metric"] = ur2.evaluate(prompt, images[:1])
edit = UnifiedRewardEditMetric.from_pretrained(device="cpu")
results["UnifiedRewardEditMetric"] = edit.evaluate("make it brighter", [images[0], images[1]])
qib = QwenImageBenchMetric.from_pretrained(device="cpu")
results["QwenImageBenchMetric"] = qib.evaluate(prompt, images[0], dimensions="Quality")
'''
SCORE_CLASSES = ("PickScoreMetric", "CLIPMetric", "HPSv2Metric", "BioCLIPMetric", "HPSv3Metric", "AestheticMetric",
                 "ImageRewardMetric")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny judges are faster on one thread (tests/test_unified_reward.py)
    yield rkt.build_diffsynth_tree(tmp_path_factory.mktemp("diffsynth") / "models")
    torch.set_num_threads(threads)


def _write_images(cwd: Path) -> None:
    """Three smooth 48x40 RGB images in images/gen and three others in images/real (names match for LPIPS)."""
    for folder, seed in (("gen", 0), ("real", 10)):
        for i in range(3):
            pixels = rkt.random_images(1, 48, 40, seed=seed + i)[0].permute(1, 2, 0).numpy()
            path = cwd / "images" / folder / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((pixels * 255).round().astype(np.uint8)).save(path)


def _run(script: str) -> dict:
    namespace: dict = {}
    exec(compile(script, "diffsynth_style_script.py", "exec"), namespace)  # noqa: S102 - our own test script
    return namespace["results"]


def test_tree_has_every_default_path(base: Path) -> None:
    from rewardkit.compat.diffsynth import SIDECAR_NAME

    repo = base / REPO
    for relative in ("PickScore/model.safetensors", "CLIP-ViT-H-14-laion2B-s32B-b79K/model.safetensors",
                     "HPSv2/model.safetensors", "Aesthetic/model.safetensors", "BioCLIPv2/open_clip_model.safetensors",
                     "ImageReward/model.safetensors", "HPSv3/model.safetensors", "FID/model.safetensors",
                     "LPIPS/alexnet.safetensors"):
        assert (repo / relative).is_file(), relative
    for folder in (repo / "UnifiedReward-2.0-qwen35-9b", repo / "UnifiedReward-Edit-qwen3vl-8b",
                   base / "Qwen" / "Qwen-Image-Bench"):  # origin_file_pattern="model-*.safetensors" matches one shard
        assert [p.name for p in folder.glob("model-*.safetensors")] == ["model-00001-of-00001.safetensors"]
        assert (folder / SIDECAR_NAME).is_file()
    assert not (repo / "FID" / SIDECAR_NAME).exists()  # full-size network: nothing to carry
    # the builder's copies of the compat constants (testing sits below compat and does not import it)
    from rewardkit.compat import diffsynth_qwen_image_bench as qib
    from rewardkit.metrics import (AestheticMetric, BioCLIPMetric, CLIPMetric, HPSv2Metric, HPSv3Metric,
                                   ImageRewardMetric, PickScoreMetric, UnifiedReward2Metric, UnifiedRewardEditMetric)
    from rewardkit.testing import diffsynth_tree

    assert (diffsynth_tree.SIDECAR_NAME, diffsynth_tree.QIB_REPO) == (SIDECAR_NAME, qib.QIB_REPO)
    classes = {"pickscore": PickScoreMetric, "clip": CLIPMetric, "hpsv2": HPSv2Metric, "aesthetic": AestheticMetric,
               "bioclip": BioCLIPMetric, "imagereward": ImageRewardMetric, "hpsv3": HPSv3Metric,
               "unified-reward-2": UnifiedReward2Metric, "unified-reward-edit": UnifiedRewardEditMetric}
    for name, cls in classes.items():
        assert cls.model_pattern.split("/")[0] == diffsynth_tree.IMAGE_METRICS_FOLDERS[name], name
    assert not list(base.glob(".rewardkit-staging-*"))
    with pytest.raises(ValueError, match="unknown metrics"):
        rkt.build_diffsynth_tree(base, metrics=["pickscore", "nope"])


def test_diffsynth_style_script_runs_all_twelve_metrics(base: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")  # a miss would raise instead of reaching for the hub
    monkeypatch.chdir(tmp_path)
    _write_images(tmp_path)
    results = _run(SCRIPT)
    assert SCRIPT.count("rewardkit") == 1 and "config=" not in SCRIPT.replace("_config=", "")
    for name in SCORE_CLASSES:
        scores, rows = results[name]
        assert len(scores) == 3 and all(type(x) is float and math.isfinite(x) for x in scores), (name, scores)
        assert [row["score"] for row in rows] == scores
    assert len(set(results["PickScoreMetric"][0])) == 3  # the images move the score
    assert math.isfinite(results["FIDMetric"]) and results["FIDMetric"] >= 0
    assert math.isfinite(results["LPIPSMetric"]) and results["LPIPSMetric"] > 0
    # random judges write random text: the rows are there, unscored, with the reason (never 0)
    (ur2,) = results["UnifiedReward2Metric"]
    (edit,) = results["UnifiedRewardEditMetric"]
    (qib,) = results["QwenImageBenchMetric"]
    assert "score" in ur2 and "raw" in ur2 and "score" in edit and "raw" in edit
    assert "total_score" in qib and "parse_failures" in qib


def test_default_base_is_models_in_the_working_directory(base: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``$DIFFSYNTH_MODEL_BASE_PATH`` the tree is found at ``./models``, as DiffSynth looks for it."""
    (tmp_path / "models").symlink_to(base, target_is_directory=True)
    monkeypatch.delenv("DIFFSYNTH_MODEL_BASE_PATH", raising=False)
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    monkeypatch.chdir(tmp_path)
    _write_images(tmp_path)
    script = ("from rewardkit.metrics import ModelConfig, PickScoreMetric\nfrom PIL import Image\n"
              "repo = 'DiffSynth-Studio/ImageMetrics'\n"
              "metric = PickScoreMetric.from_pretrained(\n"
              "    model_config=ModelConfig(model_id=repo, origin_file_pattern='PickScore/model.safetensors'),\n"
              "    processor_config=ModelConfig(model_id=repo, origin_file_pattern='PickScore/'), device='cpu')\n"
              "results = metric.compute('a cat', [Image.open(f'images/gen/{i}.png') for i in range(3)])\n")
    scores = _run(script)
    assert len(scores) == 3 and all(math.isfinite(x) for x in scores)


def test_sidecar_equals_an_explicit_config(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sidecar only supplies what ``config=`` would: the same model, the same scores; explicit options win."""
    from rewardkit.metrics import ModelConfig, PickScoreMetric

    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base))
    images = [Image.fromarray((rkt.random_images(1, 40, 40, seed=s)[0].permute(1, 2, 0).numpy() * 255)
                              .round().astype(np.uint8)) for s in range(2)]
    from_sidecar = PickScoreMetric.from_pretrained(device="cpu").compute("a dog", images)
    weights = ModelConfig(path=str(base / REPO / "PickScore" / "model.safetensors"))
    explicit = PickScoreMetric.from_pretrained(weights, ModelConfig(path=str(base / REPO / "PickScore")), device="cpu",
                                               config=rkt.tiny_hf_clip_config())
    assert explicit.compute("a dog", images) == from_sidecar


def test_mismatch_names_from_pretrained_and_real_files_read_no_sidecar(base: Path, tmp_path: Path) -> None:
    """A checkpoint/architecture mismatch points to ``from_pretrained(config=...)``, where a compat user passes it,
    not to ``rk.load``; an explicit ``config=`` wins over the sidecar; a folder without a sidecar (DiffSynth's real
    files) adds no option; a malformed sidecar is refused by name."""
    from rewardkit.compat.diffsynth import SIDECAR_NAME, sidecar_options
    from rewardkit.metrics import HPSv2Metric, ModelConfig
    from rewardkit.weights import CheckpointMismatchError

    weights = ModelConfig(path=str(base / REPO / "HPSv2" / "model.safetensors"))
    wider = rkt.tiny_open_clip_config()
    wider["embed_dim"] *= 2  # a cheap wrong architecture (the released default would build a full ViT-H/14)
    with pytest.raises(CheckpointMismatchError, match=r"HPSv2Metric\.from_pretrained") as caught:
        HPSv2Metric.from_pretrained(weights, device="cpu", config=wider)
    assert "shape conflicts" in str(caught.value) and "rk.load" not in str(caught.value)
    bare = tmp_path / "HPSv2" / "model.safetensors"
    bare.parent.mkdir()
    bare.write_bytes((base / REPO / "HPSv2" / "model.safetensors").read_bytes())
    assert sidecar_options(bare) == {} and sidecar_options(f"ms:{REPO}/HPSv2/model.safetensors") == {}
    assert sidecar_options(base / REPO / "HPSv2" / "model.safetensors") == {"config": rkt.tiny_open_clip_config()}
    (bare.parent / SIDECAR_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        HPSv2Metric.from_pretrained(ModelConfig(path=str(bare)), device="cpu")


def test_compat_modules_import_one_way() -> None:
    """``rewardkit.compat.diffsynth`` imports none of its sibling modules (no cycle); the siblings' names still
    resolve from it, and either module can be imported first."""
    code = ("import sys, rewardkit.compat.diffsynth as ds\n"
            "assert not [m for m in sys.modules if m.startswith('rewardkit.compat.diffsynth_')], sorted(sys.modules)\n"
            "import rewardkit.compat.diffsynth_sets as sets\n"
            "assert ds.FIDMetric is sets.FIDMetric and ds.LPIPSMetric is sets.LPIPSMetric\n"
            "assert {'FIDMetric', 'QwenImageBenchMetric'} <= set(dir(ds))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
