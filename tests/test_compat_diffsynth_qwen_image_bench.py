"""DiffSynth-compatible ``QwenImageBenchMetric``: call shapes, dimension sets, result dicts, from_pretrained."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

import rewardkit as rk
from rewardkit.compat.diffsynth import ModelConfig
from rewardkit.compat.diffsynth_qwen_image_bench import QwenImageBenchMetric, dimension_sets
from rewardkit.rewards.qwen_image_bench_checklist import LEVEL1_DIMS
from rewardkit.vlm.requests import Completion

QUALITY = ('</think>{"Realism": {"Physical Logic": {"score": 2}, "Material Texture": {"score": 1}}, "Detail": '
           '{"Noise": {"score": 0}, "Edge Clarity": {"score": "N/A"}}, "Resolution": {"Resolution": {"score": 1}}}')
ALIGNMENT = '{"Color": {"score": 2}, "Size": {"score": 1.5}}'


class Scripted:
    """A backend answering by dimension (``None`` -> a failed generation); records the batch sizes."""

    def __init__(self, answers: dict[str, str | None]) -> None:
        self.answers, self.batches = answers, []

    def generate(self, requests):  # type: ignore[no-untyped-def]
        self.batches.append(len(requests))
        texts = [self.answers.get(r.meta["dimension"], "no json") for r in requests]
        return [Completion(t) if t is not None else Completion(None, "HTTP 503") for t in texts]


def _metric(answers: dict[str, str | None]) -> QwenImageBenchMetric:
    return QwenImageBenchMetric(rk.load("qwen-image-bench", backend=Scripted(answers)))


def _image(width: int = 32, height: int = 32, value: int = 90) -> Image.Image:
    return Image.new("RGB", (width, height), (value, 20, 200))


def test_evaluate_returns_diffsynth_dicts_with_float64_means() -> None:
    metric = _metric({"Quality": QUALITY, "Alignment": ALIGNMENT})
    [row] = metric.evaluate("a dog", _image(), dimensions="Quality, Alignment")
    assert row["total_score"] == (140.0 / 3 + 100.0) / 2  # exact Python floats, as DiffSynth's
    assert row["level1_scores"] == {"Quality": 140.0 / 3, "Alignment": 100.0}
    assert row["level2_scores"] == {"Quality": {"Realism": 80.0, "Detail": 0.0, "Resolution": 60.0},
                                    "Alignment": {"Attributes": 100.0}}
    assert row["level3_scores"]["Quality"]["Detail"] == \
        {"Noise": 0.0, "Edge Clarity": None}
    assert row["level3_scores"]["Alignment"]["Attributes"] == {"Color": 100.0, "Size": None}  # 1.5: excluded
    assert row["raw_scores"]["Alignment"] == {"Attributes": {"Color": {"score": 2}, "Size": {"score": 1.5}}}
    assert row["raw_outputs"] == {"Quality": QUALITY, "Alignment": ALIGNMENT}
    assert row["parse_failures"] == [] and row["failure"] is None
    assert row["facet_failures"] == ["Alignment/Attributes/Size: facet value 1.5 is not 0, 1, 2 or 'N/A'"]


def test_compute_is_nan_where_diffsynth_returns_zero() -> None:
    metric = _metric({"Quality": "I cannot judge this.", "Aesthetics": None})
    assert math.isnan(metric.compute("a dog", _image(), dimensions=["Quality", "Aesthetics"])[0])
    [row] = metric.evaluate("a dog", _image(), dimensions=("Quality", "Aesthetics"))
    assert row["total_score"] is None and row["parse_failures"] == ["Quality", "Aesthetics"]
    assert row["level1_scores"] == {"Quality": None, "Aesthetics": None}
    assert row["level2_scores"] == {"Quality": {}, "Aesthetics": {}}
    assert row["raw_scores"] == {"Quality": None, "Aesthetics": None}
    assert row["raw_outputs"] == {"Quality": "I cannot judge this.", "Aesthetics": None}
    assert row["failure"].startswith("every dimension failed: Quality: no JSON object")


def test_pairing_sizes_and_per_sample_dimensions() -> None:
    metric = _metric({"Quality": QUALITY, "Alignment": ALIGNMENT, "Aesthetics": '{"Composition": {"score": 0}}'})
    images = [_image(32, 32), _image(48, 32), _image(32, 32, 10)]
    scores = metric.compute("a dog", images, dimensions=["Quality", {"Alignment": []}, "Aesthetics / Composition"])
    assert scores == [140.0 / 3, 100.0, 0.0]
    assert metric.reward.backend.batches == [2, 1]  # one generate call per image size
    assert metric.score(["a", "b"], _image(), dimensions="Alignment") == [100.0, 100.0]
    with pytest.raises(ValueError, match="got 2 prompts and 3 images"):
        metric.compute(["a", "b"], images)
    with pytest.raises(ValueError, match="expected 3 dimension sets"):
        metric.compute("a", images, dimensions=[None, None])
    with pytest.raises(ValueError, match="unknown level-1 dimension 'Realism'"):
        metric.compute("a", images, dimensions="Realism")
    assert metric.forward(None, _image(), dimensions="Alignment") == [100.0]


def test_dimension_sets_follow_diffsynth() -> None:
    assert dimension_sets(None, 2) == [LEVEL1_DIMS] * 2
    assert dimension_sets(["Quality", "Alignment"], 3) == [("Quality", "Alignment")] * 3  # all strings: one set
    assert dimension_sets([["Quality"], None], 2) == [("Quality",), LEVEL1_DIMS]  # a non-string: per sample
    assert dimension_sets([], 1) == [LEVEL1_DIMS] and dimension_sets({}, 1) == [LEVEL1_DIMS]
    assert dimension_sets("Quality / Realism / Physical Logic; Aesthetics / Color Harmony / Color Harmony", 1) == \
        [("Quality", "Aesthetics")]


def test_from_pretrained_maps_model_configs(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("DIFFSYNTH_MODEL_BASE_PATH", raising=False)
    monkeypatch.delenv("DIFFSYNTH_SKIP_DOWNLOAD", raising=False)
    metric = QwenImageBenchMetric.from_pretrained(device="cpu")  # lazy: nothing is downloaded yet
    backend = metric.reward.backend
    assert backend.model_spec == "ms:Qwen/Qwen-Image-Bench" and backend.model_class == "Qwen3_5ForConditionalGeneration"
    assert metric.reward.settings.max_new_tokens == 4096 and metric.reward.resize_long_edge == 1024
    local = tmp_path / "Qwen" / "Qwen-Image-Bench"
    local.mkdir(parents=True)
    (local / "config.json").write_text("{}")
    config = ModelConfig(model_id="Qwen/Qwen-Image-Bench", origin_file_pattern="model-*.safetensors",
                         local_model_path=str(tmp_path))
    metric = QwenImageBenchMetric.from_pretrained(config, ModelConfig(model_id="Qwen/Qwen-Image-Bench",
                                                  origin_file_pattern="", local_model_path=str(tmp_path)),
                                                  device="cpu", max_new_tokens=16, resize_long_edge=512)
    assert metric.reward.backend.model_spec == str(local) and metric.reward.resize_long_edge == 512
    assert metric.reward.settings.max_new_tokens == 16
    with pytest.raises(ValueError, match="the processor is read from the weights folder"):
        QwenImageBenchMetric.from_pretrained(config, ModelConfig(path=str(tmp_path)), device="cpu")
    with pytest.raises(FileNotFoundError, match="downloads are skipped"):
        QwenImageBenchMetric.from_pretrained(ModelConfig(model_id="Qwen/Other", skip_download=True), device="cpu")
    with pytest.warns(UserWarning, match="vram_limit is ignored"):
        QwenImageBenchMetric.from_pretrained(ModelConfig(path=str(local)), device="cpu", vram_limit=8.0)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A tiny judge folder; one torch thread meanwhile (much faster on a loaded 2-core machine), restored after."""
    import rewardkit.testing as rkt

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield rkt.tiny_qwen_image_bench(tmp_path_factory.mktemp("rk-qib-compat"))["weights"]
    torch.set_num_threads(threads)


def test_from_pretrained_on_a_tiny_folder_forced_answer(tiny_folder: str) -> None:
    import rewardkit.testing as rkt

    answer = '</think>{"Physical Logic":{"score":2},"Noise":{"score":1}}'
    tokenizer = rkt.tiny_qwen_tokenizer()
    metric = QwenImageBenchMetric.from_pretrained(
        ModelConfig(path=tiny_folder), torch_dtype=torch.float32, device="cpu",
        logits_processor_factory=lambda: rkt.forced_answer_processor(tokenizer, answer))
    rows = metric.evaluate("a dog", [_image(64, 64), _image(48, 64)], dimensions="Quality")
    assert [row["total_score"] for row in rows] == [80.0, 80.0]  # Realism 100, Detail 60
    assert rows[1]["raw_outputs"] == {"Quality": answer} and rows[1]["level2_scores"]["Quality"]["Detail"] == 60.0
