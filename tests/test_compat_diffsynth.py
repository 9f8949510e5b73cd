"""rewardkit.compat.diffsynth: DiffSynth-Studio's metrics API over the core rewards, on tiny checkpoints.

One tiny ``DiffSynth-Studio/ImageMetrics`` tree (DiffSynth's file layout, written by ``rewardkit.testing``)
serves every test; scores must equal the core reward's exact path bit for bit.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import rewardkit as rk
import rewardkit.testing as rkt
from rewardkit.compat import diffsynth as ds
from rewardkit.metrics import (
    AestheticMetric,
    BioCLIPMetric,
    CLIPMetric,
    HPSv2Metric,
    ModelConfig,
    PickScoreMetric,
)

REPO = "DiffSynth-Studio/ImageMetrics"
CLIP_FOLDER = "CLIP-ViT-H-14-laion2B-s32B-b79K"
PROMPTS = ["a photo of a cat", "a red bicycle", "an oil painting of a lighthouse"]


@pytest.fixture(autouse=True)
def _no_diffsynth_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("DIFFSYNTH_MODEL_BASE_PATH", "DIFFSYNTH_DOWNLOAD_SOURCE", "DIFFSYNTH_SKIP_DOWNLOAD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray ./models from the working directory


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<base>/DiffSynth-Studio/ImageMetrics/{PickScore,CLIP-...,HPSv2,Aesthetic,BioCLIPv2}/``."""
    root = tmp_path_factory.mktemp("diffsynth-models")
    repo = root / REPO
    for builder in (rkt.tiny_pickscore, rkt.tiny_hpsv2, rkt.tiny_aesthetic, rkt.tiny_bioclip):
        builder(repo, layout="diffsynth")
    shutil.copytree(repo / "PickScore", repo / CLIP_FOLDER)  # same HF-keys + position_ids format
    return root


@pytest.fixture(scope="module")
def repo(base: Path) -> Path:
    return base / REPO


# name -> (metric class, registry name, weights file, processor folder or None, config builder, extra rk.load options)
CASES = {
    "pickscore": (PickScoreMetric, "pickscore", "PickScore/model.safetensors", "PickScore", rkt.tiny_hf_clip_config, {}),
    "clip": (CLIPMetric, "clip-score", f"{CLIP_FOLDER}/model.safetensors", CLIP_FOLDER, rkt.tiny_hf_clip_config,
             {"scale": 100.0}),
    "hpsv2": (HPSv2Metric, "hpsv2", "HPSv2/model.safetensors", None, rkt.tiny_open_clip_config, {}),
    "aesthetic": (AestheticMetric, "aesthetic", "Aesthetic/model.safetensors", None,
                  lambda: rkt.tiny_hf_clip_config("quick_gelu"), {}),
    "bioclip": (BioCLIPMetric, "bioclip", "BioCLIPv2/open_clip_model.safetensors", None, rkt.tiny_open_clip_config, {}),
}


@pytest.fixture(scope="module")
def pair(repo: Path):
    """``pair(name)`` -> (metric built by from_pretrained, the same reward built by rk.load), cached."""
    cache: dict[str, tuple] = {}

    def build(name: str):
        if name not in cache:
            cls, registry, weights, processor, config, extra = CASES[name]
            processor_config = ModelConfig(path=str(repo / processor)) if processor else None
            metric = cls.from_pretrained(model_config=ModelConfig(path=str(repo / weights)),
                                         processor_config=processor_config, device="cpu", config=config())
            options = {**extra, **({"processor": str(repo / processor)} if processor else {})}
            reference = rk.load(registry, weights=str(repo / weights), config=config(), **options)
            cache[name] = (metric, reference)
        return cache[name]

    return build


def _images(seed: int = 0) -> list[Image.Image]:
    sizes = [(48, 40), (40, 56), (64, 64)]  # (H, W); none has a 32-px long side (HPS letterbox keeps it unpadded)
    out = []
    for i, (h, w) in enumerate(sizes):
        array = rkt.random_images(1, h, w, seed=seed + i)[0].permute(1, 2, 0).mul(255).round().byte().numpy()
        out.append(Image.fromarray(array))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_compute_equals_exact_path(pair, name: str) -> None:
    metric, reference = pair(name)
    images = _images()
    prompts = None if name == "aesthetic" else PROMPTS
    expected = reference.evaluate_pil(images, prompts).scores.tolist()
    args = (images,) if name == "aesthetic" else (PROMPTS, images)
    for got in (metric.compute(*args), metric.score(*args), metric.forward(*args), metric(*args)):
        assert got == expected
        assert isinstance(got, list) and all(type(x) is float for x in got)
    rows = metric.evaluate(*args)
    assert [row["score"] for row in rows] == expected
    if name in ("pickscore", "clip", "bioclip"):
        assert all(isinstance(row["cosine"], float) for row in rows)


@pytest.mark.parametrize("name", ["pickscore", "clip", "hpsv2", "bioclip"])
def test_broadcasting_and_pairing(pair, name: str) -> None:
    metric, reference = pair(name)
    images = _images(seed=10)
    broadcast = metric.compute(PROMPTS[0], images)
    assert broadcast == reference.evaluate_pil(images, PROMPTS[0]).scores.tolist()
    assert metric.compute([PROMPTS[0]], images) == broadcast  # a one-item list broadcasts too
    paired = metric.compute(PROMPTS, images)
    assert paired == reference.evaluate_pil(images, PROMPTS).scores.tolist()
    one_image = metric.compute(PROMPTS, images[0])  # N prompts x 1 image, as DiffSynth's CLIP/HPSv2
    assert one_image == reference.evaluate_pil([images[0]] * 3, PROMPTS).scores.tolist()
    with pytest.raises(ValueError, match="2 prompts and 3 images"):
        metric.compute(PROMPTS[:2], images)


def test_paths_and_input_errors(pair, tmp_path: Path) -> None:
    metric, _ = pair("pickscore")
    images = _images(seed=20)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    assert metric.compute(PROMPTS, [str(paths[0]), paths[1], images[2]]) == metric.compute(PROMPTS, images)
    rgba = images[0].convert("RGBA")
    assert metric.compute(PROMPTS[0], rgba) == metric.compute(PROMPTS[0], images[0])
    with pytest.raises(TypeError, match="PIL image or an image path"):
        metric.compute(PROMPTS[0], torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="at least one image"):
        metric.compute(PROMPTS[0], [])
    with pytest.raises(ValueError, match="needs a prompt"):
        metric.compute(None, images)


def test_aesthetic_takes_images_only(pair) -> None:
    metric, reference = pair("aesthetic")
    image = _images(seed=30)[0]
    assert metric.compute(image) == reference.evaluate_pil([image]).scores.tolist()
    assert list(metric.evaluate([image, image])[0]) == ["score"]


def test_pickscore_probabilities(pair) -> None:
    metric, reference = pair("pickscore")
    images = _images(seed=40)
    probs = metric.probabilities(PROMPTS[0], images)
    assert math.isclose(sum(probs), 1.0, rel_tol=1e-6)
    expected = torch.softmax(reference.evaluate_pil(images, PROMPTS[0]).scores, dim=-1).tolist()
    assert probs == expected
    assert metric.calc_probs(PROMPTS[0], images) == probs
    rows = metric.probabilities(PROMPTS[:2], images)  # a list of prompts: one softmax row per prompt
    assert len(rows) == 2 and all(len(row) == 3 for row in rows)
    assert all(math.isclose(sum(row), 1.0, rel_tol=1e-6) for row in rows)
    assert rows[0] == pytest.approx(probs, abs=1e-6)


def test_similarity_matrices(pair) -> None:
    images = _images(seed=50)
    clip, _ = pair("clip")
    matrix = clip.similarity_matrix(PROMPTS[:2], images)
    assert len(matrix) == 2 and all(len(row) == 3 for row in matrix)
    for i, prompt in enumerate(PROMPTS[:2]):
        cosines = [row["cosine"] for row in clip.evaluate(prompt, images)]
        assert matrix[i] == pytest.approx([100.0 * c for c in cosines], abs=1e-4)  # scale * cos, no clamp
    assert len(clip.similarity_matrix(PROMPTS[0], images)) == 1  # a str prompt gives one row, as DiffSynth
    bioclip, _ = pair("bioclip")
    matrix = bioclip.similarity_matrix(PROMPTS, images)
    assert len(matrix) == 3 and all(len(row) == 3 for row in matrix)
    diagonal = [matrix[i][i] for i in range(3)]
    assert diagonal == pytest.approx(bioclip.compute(PROMPTS, images), abs=1e-4)


def test_default_configs_use_the_local_diffsynth_tree(base: Path, pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """DiffSynth's default ModelConfigs resolve to ``$DIFFSYNTH_MODEL_BASE_PATH`` copies; no download."""
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base))
    images = _images(seed=60)
    expected = pair("pickscore")[0].compute(PROMPTS, images)
    metric = PickScoreMetric.from_pretrained(device="cpu", config=rkt.tiny_hf_clip_config())
    assert metric.compute(PROMPTS, images) == expected
    seen: dict = {}

    def spy(name, **kwargs):
        seen.update(kwargs)
        return load(name, **kwargs)

    load = ds._load
    monkeypatch.setattr(ds, "_load", spy)
    explicit = ModelConfig(model_id=REPO, origin_file_pattern="PickScore/model.safetensors")
    metric = PickScoreMetric.from_pretrained(explicit, device="cpu", config=rkt.tiny_hf_clip_config())
    assert metric.compute(PROMPTS, images) == expected
    assert Path(seen["processor"]) == base / REPO / "PickScore"  # ImageMetrics weights come with its processor
    assert Path(seen["weights"]) == base / REPO / "PickScore" / "model.safetensors"
    metric = BioCLIPMetric.from_pretrained(device="cpu", config=rkt.tiny_open_clip_config(),
                                           tokenizer_config=ModelConfig(model_id=REPO, origin_file_pattern="BioCLIPv2/"))
    assert metric.compute(PROMPTS, images) == pair("bioclip")[0].compute(PROMPTS, images)


def test_clip_metric_defaults_to_laion_h14_for_single_files(repo: Path) -> None:
    from rewardkit.nets.clip import LAION_VIT_H_14

    for weights in (str(repo / CLIP_FOLDER / "model.safetensors"), f"ms:{REPO}/{CLIP_FOLDER}/model.safetensors"):
        options: dict = {}
        CLIPMetric._add_options(weights, options)
        assert options == {"scale": 100.0, "config": LAION_VIT_H_14}
    options = {"scale": 2.5}
    CLIPMetric._add_options(str(repo / CLIP_FOLDER), options)  # a folder brings its own config.json
    assert options == {"scale": 2.5}


def test_torch_dtype_and_options(repo: Path) -> None:
    assert ds._rewardkit_dtype(None) is None and ds._rewardkit_dtype(torch.float32) is None
    assert ds._rewardkit_dtype(torch.bfloat16) == "bf16" and ds._rewardkit_dtype(torch.float16) == "fp16"
    with pytest.raises(ValueError, match="not supported"):
        ds._rewardkit_dtype(torch.float64)
    weights = ModelConfig(path=str(repo / "HPSv2" / "model.safetensors"))
    metric = HPSv2Metric.from_pretrained(weights, None, torch.bfloat16, "cpu", config=rkt.tiny_open_clip_config())
    assert metric.reward.autocast_dtype == torch.bfloat16
    assert all(math.isfinite(x) for x in metric.compute(PROMPTS[0], _images()))
    with pytest.raises(ValueError, match="max_length"):
        PickScoreMetric.from_pretrained(weights, device="cpu", max_length=64)
    with pytest.raises(ValueError, match="processor_kwargs"):
        PickScoreMetric.from_pretrained(weights, device="cpu", processor_kwargs={"use_fast": False})
    with pytest.warns(UserWarning, match="vram_limit"):
        HPSv2Metric.from_pretrained(weights, device="cpu", vram_limit=4.0, config=rkt.tiny_open_clip_config())


# ---------------------------------------------------------------------------------------------------
# ModelConfig -> weight spec
# ---------------------------------------------------------------------------------------------------


def test_model_config_hub_specs(monkeypatch: pytest.MonkeyPatch) -> None:
    def spec(**kwargs) -> str:
        return ModelConfig(**kwargs).to_spec()

    assert spec(path="/some/file.safetensors") == "/some/file.safetensors"
    assert spec(path=["/some/file.safetensors"]) == "/some/file.safetensors"
    file = "PickScore/model.safetensors"
    assert spec(model_id=REPO, origin_file_pattern=file) == f"ms:{REPO}/{file}"
    assert spec(model_id=REPO, origin_file_pattern=file, download_source="huggingface") == f"hf:{REPO}/{file}"
    assert spec(model_id=REPO, origin_file_pattern="PickScore/") == f"ms:{REPO}/PickScore/"
    for whole in (None, "", "./"):
        assert spec(model_id=REPO, origin_file_pattern=whole) == f"ms:{REPO}"
    monkeypatch.setenv("DIFFSYNTH_DOWNLOAD_SOURCE", "HuggingFace")
    assert spec(model_id=REPO, origin_file_pattern=file) == f"hf:{REPO}/{file}"
    assert spec(model_id=REPO, origin_file_pattern=file, download_source="ModelScope") == f"ms:{REPO}/{file}"
    with pytest.raises(ValueError, match="download_source"):
        spec(model_id=REPO, origin_file_pattern=file, download_source="github")
    with pytest.raises(ValueError, match="model_id"):
        spec()
    with pytest.raises(ValueError, match="one file or folder"):
        spec(path=["a.safetensors", "b.safetensors"])
    with pytest.raises(ValueError, match="state_dict"):
        spec(path="a.safetensors", state_dict={})


def test_model_config_local_hits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tmp_path / "models" / REPO / "PickScore" / "model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"x")
    file = ModelConfig(model_id=REPO, origin_file_pattern="PickScore/model.safetensors")
    folder = ModelConfig(model_id=REPO, origin_file_pattern="PickScore/")
    assert Path(file.to_spec()).resolve() == weights.resolve()  # DiffSynth's default ./models (cwd = tmp_path)
    assert Path(folder.to_spec()).resolve() == weights.parent.resolve()
    assert Path(ModelConfig(model_id=REPO, origin_file_pattern="PickScore/*.safetensors").to_spec()).name == \
        "model.safetensors"
    other = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "models", other)
    local = ModelConfig(model_id=REPO, origin_file_pattern="PickScore/model.safetensors", local_model_path=str(other))
    assert Path(local.to_spec()) == other / REPO / "PickScore" / "model.safetensors"
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path / "empty"))  # wins over local_model_path
    assert local.to_spec() == f"ms:{REPO}/PickScore/model.safetensors"
    with pytest.raises(FileNotFoundError, match="skip"):
        ModelConfig(model_id=REPO, origin_file_pattern="HPSv2/model.safetensors", skip_download=True).to_spec()
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "True")
    with pytest.raises(FileNotFoundError, match="skip"):
        file.to_spec()


def test_model_config_resolve_fetches_only_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_resolve(spec, *, allow_patterns=None, sha256=None, what="weights"):
        calls.append((spec, allow_patterns))
        return tmp_path / "snapshot"

    monkeypatch.setattr(ds._weights, "resolve_weights", fake_resolve)
    # A folder pattern becomes a sub-folder spec; weights.resolve_weights fetches only that folder
    # (tests/test_weights.py::test_hub_sub_folder_downloads_only_that_folder).
    folder = ModelConfig(model_id=REPO, origin_file_pattern="PickScore/").resolve(["*.json", "*.txt"])
    assert folder == tmp_path / "snapshot"
    assert calls[-1] == (f"ms:{REPO}/PickScore/", ["*.json", "*.txt"])
    ModelConfig(model_id=REPO, origin_file_pattern="HPSv2/model.safetensors", download_source="huggingface").resolve()
    assert calls[-1] == (f"hf:{REPO}/HPSv2/model.safetensors", None)
    ModelConfig(model_id="laion/CLIP-ViT-H-14-laion2B-s32B-b79K").resolve(["*.json"])
    assert calls[-1] == ("ms:laion/CLIP-ViT-H-14-laion2B-s32B-b79K", ["*.json"])


def test_import_rewardkit_metrics_is_lazy() -> None:
    code = (
        "import sys, rewardkit.metrics as m\n"
        "assert 'transformers' not in sys.modules and 'open_clip' not in sys.modules, 'eager import'\n"
        "assert 'rewardkit.compat.diffsynth' not in sys.modules\n"
        "from rewardkit.metrics import PickScoreMetric, ModelConfig\n"
        "assert 'transformers' not in sys.modules and 'open_clip' not in sys.modules, 'compat import'\n"
        "assert PickScoreMetric.__module__ == 'rewardkit.compat.diffsynth'\n"
        "assert 'BioCLIPMetric' in dir(m) and set(m.__all__) <= set(dir(m))\n"
        "try:\n    m.NoSuchMetric\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit('no error')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
