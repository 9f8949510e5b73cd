"""rewardkit.vlm.requests and rewardkit.vlm.judge with an in-memory fake backend (no model)."""

from __future__ import annotations

import logging
import math
import pickle
import re

import pytest
import torch
from PIL import Image

from rewardkit.image_io import pil_to_tensor
from rewardkit.protocols import RewardOutput
from rewardkit.testing import random_images
from rewardkit.vlm import ChatRequest, Completion, GenerationSettings, GenerativeJudge, ParsedAnswer
from rewardkit.vlm.judge import failure_kind, tensor_to_pil
from rewardkit.vlm.requests import GenerationBackend, check_messages

_SCORE = re.compile(r"score:\s*([-+]?\d*\.?\d+)")


class FakeBackend:
    """Answers from a function of the request text; records every generate call."""

    def __init__(self, answer) -> None:
        self.answer, self.calls = answer, []

    def generate(self, requests):
        self.calls.append(list(requests))
        return [self.answer(r) for r in requests]


def _text(request: ChatRequest) -> str:
    return "".join(item["text"] for m in request.messages for item in m["content"] if item["type"] == "text")


class ScoreJudge(GenerativeJudge):
    """One request per image; parses ``score: x`` and a ``style`` field."""

    name = "fake-judge"
    requires_prompt = True
    field_names = ("alignment", "style")

    def build_requests(self, images, prompts, **context):
        return [[ChatRequest([{"role": "user", "content": [{"type": "image", "image": image},
                                                           {"type": "text", "text": prompt}]}],
                             GenerationSettings(max_new_tokens=16))] for image, prompt in zip(images, prompts)]

    def parse_row(self, completions, row_context):
        match = _SCORE.search(completions[0].text)
        if match is None:
            return ParsedAnswer(math.nan, {}, "no 'score' in answer")
        value = float(match.group(1))
        return ParsedAnswer(value, {"alignment": value / 2}, extra={"prompt_seen": row_context["prompt"]})


class MultiJudge(GenerativeJudge):
    """Two requests per image (like Qwen-Image-Bench's dimensions); the score is the mean of the parsed ones."""

    name = "fake-multi"
    requires_prompt = False
    multi_request = True

    def build_requests(self, images, prompts, **context):
        return [[ChatRequest([{"role": "user", "content": [{"type": "image", "image": image},
                                                           {"type": "text", "text": f"dim {d} row {i}"}]}],
                             meta={"dimension": d}) for d in context["dims"][i]] for i, image in enumerate(images)]

    def parse_row(self, completions, row_context):
        values = [float(_SCORE.search(c.text).group(1)) for c in completions if c.text and _SCORE.search(c.text)]
        dims = [r.meta["dimension"] for r in row_context["requests"]]
        if not values:
            return ParsedAnswer(math.nan, {}, "no dimension parsed")
        return ParsedAnswer(sum(values) / len(values), {}, extra={"dims": dims})


def test_settings_defaults_validation_and_template_kwargs() -> None:
    settings = GenerationSettings()
    assert (settings.max_new_tokens, settings.repetition_penalty, settings.enable_thinking) == (1024, None, None)
    assert settings.template_kwargs() == {}
    assert GenerationSettings(enable_thinking=False).template_kwargs() == {"enable_thinking": False}
    assert hash(GenerationSettings(8)) == hash(GenerationSettings(8))  # frozen: usable as a batching key
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(ValueError, match="repetition_penalty"):
        GenerationSettings(repetition_penalty=0.0)
    with pytest.raises(TypeError, match="enable_thinking"):
        GenerationSettings(enable_thinking="yes")  # type: ignore[arg-type]


def test_chat_request_images_and_message_checks() -> None:
    a, b = Image.new("RGB", (4, 4)), Image.new("RGB", (5, 5))
    request = ChatRequest([{"role": "system", "content": "be terse"},
                           {"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "x"},
                                                        {"type": "image", "image": b}]}])
    assert request.images() == [a, b] and request.settings == GenerationSettings() and request.meta == {}
    check_messages(request.messages)
    with pytest.raises(TypeError, match="non-empty list"):
        check_messages([])
    with pytest.raises(ValueError, match="role"):
        check_messages([{"role": "robot", "content": "hi"}])
    with pytest.raises(TypeError, match="PIL"):
        check_messages([{"role": "user", "content": [{"type": "image", "image": torch.zeros(3, 4, 4)}]}])
    with pytest.raises(ValueError, match="'type': 'text'"):
        check_messages([{"role": "user", "content": [{"type": "video", "video": "x"}]}])
    assert Completion("a").ok and not Completion(None, "boom").ok


def test_tensor_to_pil_is_exact_for_uint8_images() -> None:
    levels = torch.arange(0, 256, dtype=torch.float32).reshape(1, 1, 16, 16).expand(2, 3, 16, 16) / 255
    images = tensor_to_pil(levels)
    assert [im.mode for im in images] == ["RGB", "RGB"] and images[0].size == (16, 16)
    assert torch.equal(pil_to_tensor(images[1]), levels[1])


def test_judge_scores_fields_raw_and_one_generate_call_per_batch() -> None:
    backend = FakeBackend(lambda r: Completion(f"score: {len(_text(r))}"))
    judge = ScoreJudge(backend)
    assert isinstance(backend, GenerationBackend) and judge.differentiable is False
    images = random_images(3, 20, 24)
    out = judge.evaluate(images, ["a", "bb", "ccc"])
    assert isinstance(out, RewardOutput) and len(backend.calls) == 1 and len(backend.calls[0]) == 3
    assert out.scores.dtype == torch.float32 and out.scores.tolist() == [1.0, 2.0, 3.0]
    assert out.details["raw"] == ["score: 1", "score: 2", "score: 3"]
    assert out.details["failure"] == [None, None, None]
    assert out.details["alignment"].tolist() == [0.5, 1.0, 1.5]
    assert torch.isnan(out.details["style"]).all()  # declared field, never filled: NaN, not 0
    assert out.details["prompt_seen"] == ["a", "bb", "ccc"]
    sent = backend.calls[0][1].images()[0]  # the backend sees the exact uint8 pixels
    assert torch.equal(pil_to_tensor(sent), (images[1] * 255).round() / 255)
    assert judge(images, "dd").tolist() == [2.0, 2.0, 2.0] and len(backend.calls) == 2


def test_failures_are_nan_with_reason_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    answers = {"ok": Completion("score: 4"), "bad": Completion("I refuse"),
               "down": Completion(None, "timeout after 5 s"), "boom": Completion("score: x")}
    judge = ScoreJudge(FakeBackend(lambda r: answers[_text(r)]))
    with caplog.at_level(logging.WARNING, logger="rewardkit.vlm.judge"):
        out = judge.evaluate(random_images(4), ["ok", "bad", "down", "down"])
    scores = out.scores.tolist()
    assert scores[0] == 4.0 and all(math.isnan(s) for s in scores[1:])
    assert out.details["failure"] == [None, "no 'score' in answer", "generation failed: timeout after 5 s",
                                      "generation failed: timeout after 5 s"]
    assert out.details["raw"] == ["score: 4", "I refuse", None, None]
    assert judge.failure_counts == {"no 'score' in answer": 1, "generation failed": 2}
    assert "3 of 4 rows could not be scored" in caplog.text
    judge.evaluate(random_images(1), ["down"])
    assert judge.failure_counts["generation failed"] == 3
    assert failure_kind("HTTP 500: oops") == "HTTP 500" and failure_kind("plain") == "plain"


def test_parser_exception_becomes_a_nan_row_not_a_lost_batch() -> None:
    class Fragile(ScoreJudge):
        def parse_row(self, completions, row_context):
            if "crash" in completions[0].text:
                raise KeyError("missing")
            return super().parse_row(completions, row_context)

    out = Fragile(FakeBackend(lambda r: Completion(_text(r)))).evaluate(random_images(2), ["score: 1", "crash"])
    assert out.scores[0].item() == 1.0 and math.isnan(out.scores[1].item())
    assert out.details["failure"][1].startswith("parser raised: KeyError")


def test_multi_request_rows_group_back_in_order_with_partial_failures() -> None:
    def answer(request):
        text = _text(request)
        if text == "dim B row 1":
            return Completion(None, "HTTP 503: busy")
        return Completion(f"score: {2 if 'A' in text else 4}")

    backend = FakeBackend(answer)
    judge = MultiJudge(backend)
    out = judge.evaluate(random_images(3), None, dims=[["A", "B"], ["A", "B"], ["B"]])
    assert len(backend.calls) == 1 and len(backend.calls[0]) == 5  # all rows' requests in one call
    assert out.scores.tolist() == [3.0, 2.0, 4.0]
    assert out.details["raw"] == [["score: 2", "score: 4"], ["score: 2", None], ["score: 4"]]
    assert out.details["dims"] == [["A", "B"], ["A", "B"], ["B"]] and judge.failure_counts == {}


def test_bad_images_and_prompts_raise_with_the_fix() -> None:
    judge = ScoreJudge(FakeBackend(lambda r: Completion("score: 1")))
    with pytest.raises(ValueError, match=r"fake-judge.*\[0, 1\].*images / 255"):
        judge(random_images(1) * 255, "x")
    with pytest.raises(ValueError, match="uint8"):
        judge((random_images(1) * 255).to(torch.uint8), "x")
    with pytest.raises(ValueError, match="NHWC"):
        judge(random_images(1).permute(0, 2, 3, 1), "x")
    with pytest.raises(TypeError, match="float tensor"):
        judge(Image.new("RGB", (8, 8)), "x")
    with pytest.raises(ValueError, match="needs a prompt"):
        judge(random_images(1))
    with pytest.raises(ValueError, match="one prompt or 2 prompts"):
        judge(random_images(2), ["a", "b", "c"])
    assert judge.backend.calls == []


def test_contract_violations_by_subclasses_or_backends_are_loud() -> None:
    with pytest.raises(TypeError, match="generate"):
        ScoreJudge(object())  # type: ignore[arg-type]
    short = ScoreJudge(FakeBackend(lambda r: Completion("score: 1")))
    short.backend.generate = lambda requests: []  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="1 Completion"):
        short(random_images(1), "x")

    class TwoPerRow(ScoreJudge):
        def build_requests(self, images, prompts, **context):
            return [row * 2 for row in super().build_requests(images, prompts)]

    with pytest.raises(RuntimeError, match="multi_request = True"):
        TwoPerRow(FakeBackend(lambda r: Completion("score: 1")))(random_images(1), "x")


def test_judge_pickles_with_its_backend() -> None:
    judge = ScoreJudge(FakeBackend(_constant_answer))
    clone = pickle.loads(pickle.dumps(judge))
    assert clone(random_images(2), "x").tolist() == [7.0, 7.0]


def _constant_answer(request: ChatRequest) -> Completion:
    return Completion("score: 7")


def test_build_backend_picks_one_way_and_rejects_mixtures() -> None:
    from rewardkit.vlm import OpenAIChatBackend, TransformersBackend, build_backend

    local = build_backend("j", default_weights="hf:o/default", device=None, dtype="bf16", batch_size=2)
    assert isinstance(local, TransformersBackend) and local.model_spec == "hf:o/default" and local.batch_size == 2
    assert build_backend("j", default_weights="hf:o/default", weights="/some/folder").model_spec == "/some/folder"
    factory = object
    assert build_backend("j", default_weights="hf:o/d", logits_processor_factory=factory).logits_processor_factory \
        is factory
    served = build_backend("j", default_weights="hf:o/d", server="http://h:8000/v1", served_model="UnifiedReward",
                           max_concurrency=4, timeout=30, retries=1, dtype=None)
    assert isinstance(served, OpenAIChatBackend) and served.served_model == "UnifiedReward"
    assert (served.max_concurrency, served.timeout, served.retries) == (4, 30.0, 1)
    fake = FakeBackend(_constant_answer)
    assert build_backend("j", default_weights="hf:o/d", backend=fake, device=None) is fake
    with pytest.raises(ValueError, match=r"j: server=.*\['dtype'\]"):
        build_backend("j", default_weights="hf:o/d", server="http://h:1/v1", dtype="bf16")
    with pytest.raises(ValueError, match=r"\['served_model'\] only apply with server="):
        build_backend("j", default_weights="hf:o/d", served_model="x")
    with pytest.raises(ValueError, match="backend= is used as is"):
        build_backend("j", default_weights="hf:o/d", backend=fake, weights="/w")
    with pytest.raises(ValueError, match="unknown option"):
        build_backend("j", default_weights="hf:o/d", temperature=0.7)
    with pytest.raises(TypeError, match="generate"):
        build_backend("j", default_weights="hf:o/d", backend=object())  # type: ignore[arg-type]


def test_vlm_package_imports_without_heavy_dependencies() -> None:
    import subprocess
    import sys

    code = ("import sys, rewardkit.vlm as v; v.GenerativeJudge, v.ChatRequest, v.TransformersBackend, "
            "v.OpenAIChatBackend, v.build_backend; import rewardkit.testing.vlm; "
            "heavy = [m for m in ('transformers', 'diffusers', 'requests') if m in sys.modules]; print(heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_pil_path_judges_mixed_sizes_and_equals_the_tensor_path() -> None:
    seen = []

    def answer(request):
        image = request.messages[0]["content"][0]["image"]
        seen.append(image.size)
        return Completion(f"score: {image.size[0] + image.size[1]}")

    judge = ScoreJudge(FakeBackend(answer))
    images = [Image.new("RGB", (16, 8), (10, 20, 30)), Image.new("RGBA", (9, 12), (1, 2, 3, 255))]
    out = judge.evaluate_pil(images, "a cat")
    assert out.scores.tolist() == [24.0, 21.0] and seen == [(16, 8), (9, 12)]
    assert out.details["prompt_seen"] == ["a cat", "a cat"]
    tensor = pil_to_tensor(images[0])[None]
    torch.testing.assert_close(judge.score_pil(images[:1], ["a cat"]), judge(tensor, "a cat"))
    with pytest.raises(ValueError, match="one prompt or 2 prompts"):
        judge.evaluate_pil(images, ["a", "b", "c"])
    with pytest.raises(ValueError, match="empty list"):
        judge.evaluate_pil([], "a cat")
