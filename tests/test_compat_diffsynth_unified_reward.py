"""DiffSynth-compatible UnifiedReward metrics: DiffSynth's call shapes and result keys on rewardkit's judges."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image

import rewardkit as rk
import rewardkit.testing as rkt
from rewardkit.compat.diffsynth import IMAGE_METRICS_REPO, ModelConfig
from rewardkit.compat.diffsynth_unified_reward import UnifiedReward2Metric, UnifiedRewardEditMetric, _weights
from rewardkit.vlm.requests import Completion

UR2_ANSWER = "Alignment Score (1-5): 4\nCoherence Score (1-5): 3.5\nStyle Score (1-5): 2"


class ScriptedBackend:
    """Answers every request with the next scripted text and records the requests."""

    def __init__(self, answers: list[str]) -> None:
        self.answers, self.requests = list(answers), []

    def generate(self, requests):
        self.requests.extend(requests)
        return [Completion(self.answers.pop(0)) for _ in requests]


def _pil(width: int, height: int, seed: int) -> Image.Image:
    array = (rkt.random_images(1, height, width, seed=seed)[0].permute(1, 2, 0) * 255).round().to(torch.uint8)
    return Image.fromarray(array.numpy(), mode="RGB")


def _forced(text: str) -> dict:
    tokenizer = rkt.tiny_qwen_tokenizer()
    return {"max_new_tokens": len(text) + 4,
            "logits_processor_factory": lambda: rkt.forced_answer_processor(tokenizer, text)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny UR2 / UR-Edit folders; one torch thread meanwhile (see tests/test_unified_reward.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("rk-compat-unified-reward")
    yield {"ur2": rkt.tiny_unified_reward_2(root / "ur2")["weights"],
           "edit": rkt.tiny_unified_reward_edit(root / "edit")["weights"]}
    torch.set_num_threads(threads)


def test_ur2_metric_default_files_forced_answer(folders, tmp_path, monkeypatch) -> None:
    # DiffSynth's default ModelConfig ("UnifiedReward-2.0-qwen35-9b/model-*.safetensors" in ImageMetrics), found
    # under $DIFFSYNTH_MODEL_BASE_PATH: rewardkit loads that folder, no download.
    shutil.copytree(folders["ur2"], tmp_path / IMAGE_METRICS_REPO / "UnifiedReward-2.0-qwen35-9b")
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path))
    metric = UnifiedReward2Metric.from_pretrained(device="cpu", **_forced(UR2_ANSWER))
    images = [_pil(64, 64, 1), _pil(48, 64, 2)]  # two sizes: scored in two groups
    assert metric.compute("a cat", images) == pytest.approx([9.5 / 3] * 2, rel=1e-6)
    rows = metric.evaluate(None, images[0])  # prompt None = empty caption, one image
    assert rows[0]["alignment"] == 4.0 and rows[0]["coherence"] == 3.5 and rows[0]["style"] == 2.0
    assert rows[0]["raw"] == UR2_ANSWER and rows[0]["failure"] is None
    with pytest.raises(ValueError, match="2 prompts and 3 images"):
        metric.compute(["a", "b"], [images[0]] * 3)


def test_ur2_metric_failures_are_none() -> None:
    backend = ScriptedBackend([UR2_ANSWER, "Alignment Score (1-5): 5"])
    metric = UnifiedReward2Metric(rk.load("unified-reward-2", backend=backend))
    rows = metric.evaluate(["a", "b"], _pil(32, 32, 3))  # N prompts x 1 image
    assert [r["score"] for r in rows] == [pytest.approx(9.5 / 3, rel=1e-6), None]
    assert rows[1]["alignment"] == 5.0 and rows[1]["style"] is None and rows[1]["failure"].startswith("missing")
    lenient = UnifiedReward2Metric(rk.load("unified-reward-2", require_all=False, prompt_variant="diffsynth",
                                           backend=ScriptedBackend(["Alignment Score (1-5): 5"])))
    assert lenient.compute("a", _pil(32, 32, 3)) == [5.0]  # DiffSynth's partial mean, on request


def test_edit_metric_tasks_and_shapes() -> None:
    source, edit_1, edit_2 = _pil(32, 32, 4), _pil(32, 32, 5), _pil(32, 24, 6)
    backend = ScriptedBackend(['{"reasoning": "ok", "score": [20, 18],}', "Compared with Image 1, Image 2 is better.",
                               "Compared with Image 1, Image 2 is better.", "I cannot tell.", "Image 1: 7.5\nImage 2: -2.0"])
    metric = UnifiedRewardEditMetric(rk.load("unified-reward-edit", backend=backend))
    point = metric.evaluate("make it red", [source, edit_1])  # a flat list is ONE sample
    assert len(point) == 1 and point[0]["score"] == 19.0 and point[0]["reasoning"] == "ok"
    assert point[0]["editing_success"] == 20.0 and point[0]["overediting"] == 18.0
    images = backend.requests[0].messages[0]["content"]
    assert [c["image"].size for c in images[:2]] == [(32, 32), (32, 32)] and images[2]["type"] == "text"
    rank = metric.evaluate(["make it red", "make it blue"], [[source, edit_1, edit_2]] * 2, task="edit_pairwise_rank")
    assert [(r["winner"], r["score"]) for r in rank] == [("Edited image 2", 2)] * 2
    assert [c["image"].size for c in backend.requests[1].messages[0]["content"][:3]] == [(32, 32), (32, 32), (32, 24)]
    failed = metric.evaluate("make it red", [source, edit_1, edit_2], task="edit_pairwise_rank")
    assert failed[0]["winner"] is None and failed[0]["score"] is None  # DiffSynth: 0, the tie value
    assert metric.compute("x", [source, edit_1, edit_2], task="edit_pairwise_score") == [[7.5, -2.0]]


def test_edit_metric_rank_parser_and_task_default() -> None:
    answers = ["Compared with Image 1, Image 2 is better."]
    legacy = UnifiedRewardEditMetric(rk.load("unified-reward-edit", task="edit_pairwise_rank", rank_parser="diffsynth",
                                             backend=ScriptedBackend(answers)))
    source = _pil(16, 16, 7)
    assert legacy.evaluate("x", [source, source, source])[0]["winner"] == "Edited image 1"  # task from the load


def test_edit_metric_input_errors(folders) -> None:
    metric = UnifiedRewardEditMetric(rk.load("unified-reward-edit", backend=ScriptedBackend([])))
    image = _pil(16, 16, 8)
    with pytest.raises(ValueError, match="takes 2 images per sample"):
        metric.compute("x", [image, image, image])
    with pytest.raises(ValueError, match="takes 3 images per sample"):
        metric.compute("x", [image, image], task="edit_pairwise_score")
    with pytest.raises(ValueError, match="2 instructions and 3 samples"):
        metric.compute(["a", "b"], [[image, image]] * 3)
    with pytest.raises(ValueError, match="task must be one of"):
        metric.compute("x", [image, image], task="edit_pointwise_quality")
    with pytest.raises(ValueError, match="processor is read from the weights folder"):
        UnifiedRewardEditMetric.from_pretrained(ModelConfig(path=folders["edit"]), ModelConfig(path=folders["ur2"]))
    with pytest.warns(UserWarning, match="vram_limit"):
        UnifiedRewardEditMetric.from_pretrained(ModelConfig(path=folders["edit"]), device="cpu", vram_limit=8.0)


def test_edit_metric_end_to_end_forced(folders) -> None:
    metric = UnifiedRewardEditMetric.from_pretrained(
        ModelConfig(path=folders["edit"]), ModelConfig(path=folders["edit"]), device="cpu",
        task="edit_pairwise_score", **_forced("Image 1: 7.5\nImage 2: -2.0"))
    samples = [[_pil(64, 64, 9), _pil(64, 64, 10), _pil(64, 48, 11)], [_pil(48, 48, 9), _pil(64, 64, 10), _pil(64, 48, 11)]]
    rows = metric.evaluate("make it red", samples)
    assert [r["score"] for r in rows] == [[7.5, -2.0]] * 2 and [r["image_1_score"] for r in rows] == [7.5, 7.5]


def test_default_configs_map_to_folders() -> None:
    config = ModelConfig(model_id=IMAGE_METRICS_REPO, origin_file_pattern="UnifiedReward-Edit-qwen3vl-8b/model-*.safetensors",
                         download_source="huggingface", local_model_path="/nonexistent-rk-compat-ur")
    assert _weights(config) == f"hf:{IMAGE_METRICS_REPO}/UnifiedReward-Edit-qwen3vl-8b/"
    config.download_source, config.skip_download = "modelscope", True
    with pytest.raises(FileNotFoundError, match="downloads are skipped"):
        _weights(config)
