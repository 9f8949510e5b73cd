"""rewardkit.vlm.served.OpenAIChatBackend against a REAL local OpenAI-compatible server process.

The server (``python -m rewardkit.testing.vlm_server``) runs ``TransformersBackend`` on a tiny random
Qwen2-VL folder, so served answers come from the model. One server process serves the module; its
failure modes are switched with the test-only ``/v1/control`` endpoint.
"""

from __future__ import annotations

import base64
import io
import math
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rewardkit.testing import random_images
from rewardkit.testing.vlm import tiny_qwen_vl
from rewardkit.testing.vlm_server import control_server, serve_tiny_vlm, server_stats
from rewardkit.vlm import ChatRequest, Completion, GenerationSettings, GenerativeJudge, ParsedAnswer
from rewardkit.vlm import OpenAIChatBackend, TransformersBackend

_KEY = "sekret"
_CLI_FORCED = "score: 2.5"
_DEFAULTS = {"forced_answer": None, "delay": 0.0, "garbage": None, "fail_first": 0}
_DRAIN_POLLS, _DRAIN_STEP = 300, 0.1  # wait up to 30 s for timed-out requests to finish server-side


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_qwen_vl(tmp_path_factory.mktemp("rk-vlm-served"), "qwen2_vl", seed=1)


@pytest.fixture(scope="module")
def server(folder: Path):
    """``(base_url, first)``: ``first`` holds the answers seen before any control call (the CLI flags)."""
    with serve_tiny_vlm(folder, forced_answer=_CLI_FORCED, api_key=_KEY) as url:
        first = {"with_key": OpenAIChatBackend(url, api_key=_KEY).generate(_requests(2, max_new_tokens=24)),
                 "without_key": OpenAIChatBackend(url, served_model="tiny-vlm", retries=0).generate(_requests(1)),
                 "name": OpenAIChatBackend(url, api_key=_KEY).model_name()}
        yield url, first


@pytest.fixture
def url(server) -> str:
    """The server, back to its defaults, with no request of an earlier test still in flight."""
    base_url = server[0]
    for _ in range(_DRAIN_POLLS):
        if server_stats(base_url)["in_flight"] == 0:
            break
        time.sleep(_DRAIN_STEP)
    assert server_stats(base_url)["in_flight"] == 0, "requests of an earlier test are still running"
    control_server(base_url, **_DEFAULTS)
    return base_url


def _requests(count: int, seed: int = 0, **settings) -> list[ChatRequest]:
    rng = np.random.default_rng(seed)
    generation = GenerationSettings(**{"max_new_tokens": 6, **settings})
    requests = []
    for i in range(count):
        image = Image.fromarray(rng.integers(0, 256, (64, 48 + 16 * i, 3), dtype=np.uint8))
        content = [{"type": "image", "image": image}, {"type": "text", "text": f"Rate image {i}."}]
        requests.append(ChatRequest([{"role": "user", "content": content}], generation))
    return requests


class ScoreJudge(GenerativeJudge):
    name = "served-judge"
    requires_prompt = False

    def build_requests(self, images, prompts, **context):
        return [[ChatRequest([{"role": "user", "content": [{"type": "image", "image": image},
                                                           {"type": "text", "text": "score?"}]}],
                             GenerationSettings(max_new_tokens=24))] for image in images]

    def parse_row(self, completions, row_context):
        text = completions[0].text
        if not text.startswith("score: "):
            return ParsedAnswer(math.nan, {}, "no score in answer")
        return ParsedAnswer(float(text.removeprefix("score: ")), {})


def test_cli_flags_forced_answer_api_key_and_model_listing(server) -> None:
    _, first = server
    assert [c.text for c in first["with_key"]] == [_CLI_FORCED, _CLI_FORCED]
    assert first["without_key"][0].text is None and first["without_key"][0].error.startswith("HTTP 401")
    assert first["name"] == "tiny-vlm"


def test_served_answers_equal_in_process_answers(url: str, folder: Path) -> None:
    local = TransformersBackend(folder, batch_size=4)
    served = OpenAIChatBackend(url, api_key=_KEY, max_concurrency=3)
    plain = _requests(3)
    thinking = _requests(2, seed=1, enable_thinking=True, repetition_penalty=1.05)
    local_answers = [c.text for c in local.generate(plain + thinking)]
    assert [c.text for c in served.generate(plain + thinking)] == local_answers
    assert all(isinstance(t, str) for t in local_answers)
    # The thinking flag reached the server's chat template: without it the answers differ.
    unthinking = [c.text for c in local.generate(_requests(2, seed=1, repetition_penalty=1.05))]
    assert unthinking != local_answers[3:]


def test_forced_answer_is_parsed_by_a_judge(url: str) -> None:
    control_server(url, forced_answer="score: 4.25")
    judge = ScoreJudge(OpenAIChatBackend(url, api_key=_KEY))
    out = judge.evaluate(random_images(3))
    assert out.scores.tolist() == [4.25, 4.25, 4.25] and out.details["failure"] == [None] * 3


@pytest.mark.parametrize("mode, error", [("json", "malformed response (not JSON)"),
                                         ("500", "HTTP 500: internal server error (garbage mode) (after 2 attempts)")])
def test_garbage_answers_become_nan_rows_with_reasons(url: str, mode: str, error: str) -> None:
    control_server(url, garbage=mode)
    backend = OpenAIChatBackend(url, api_key=_KEY, retries=1, backoff=0.0)
    completions = backend.generate(_requests(2))
    assert all(c.text is None and c.error.startswith(error) for c in completions)
    judge = ScoreJudge(backend)
    out = judge.evaluate(random_images(2))
    assert all(math.isnan(s) for s in out.scores.tolist())
    assert all(reason.startswith(f"generation failed: {error}") for reason in out.details["failure"])
    assert judge.failure_counts == {"generation failed": 2}


def test_an_answer_only_in_reasoning_content_fails_the_row_with_its_reason(url: str) -> None:
    """transformers serve (and vLLM's reasoning parsers when thinking does not end) answer content "" with the
    text in reasoning_content: a judge must not parse the thinking (or an empty verdict) as its answer."""
    control_server(url, garbage="thinking", forced_answer="score: 4.25")  # parsable, were it content
    backend = OpenAIChatBackend(url, api_key=_KEY, retries=0)
    completions = backend.generate(_requests(2))
    assert all(c.text is None and c.error.startswith("no answer: the engine returned only reasoning_content")
               and "enable_thinking=False" in c.error for c in completions)
    out = ScoreJudge(backend).evaluate(random_images(2))
    assert all(math.isnan(s) for s in out.scores.tolist())
    assert all("only reasoning_content" in reason for reason in out.details["failure"])


def test_timeouts_fail_the_request_not_the_batch(url: str) -> None:
    control_server(url, delay=1.5)
    completions = OpenAIChatBackend(url, api_key=_KEY, timeout=0.3, retries=0).generate(_requests(2))
    assert all(c.text is None and c.error.startswith("timeout") for c in completions)


def test_retries_recover_from_busy_answers(url: str) -> None:
    control_server(url, fail_first=2)
    before = server_stats(url)["requests"]
    completion = OpenAIChatBackend(url, api_key=_KEY, retries=2, backoff=0.01).generate(_requests(1))[0]
    assert isinstance(completion.text, str) and completion.error is None
    assert server_stats(url)["requests"] - before == 3  # two 503s, then the answer
    control_server(url, fail_first=5)
    failed = OpenAIChatBackend(url, api_key=_KEY, retries=1, backoff=0.0).generate(_requests(1))[0]
    assert failed.text is None and failed.error.startswith("HTTP 503") and "after 2 attempts" in failed.error


def test_concurrency_is_bounded(url: str) -> None:
    control_server(url, delay=1.0, forced_answer="ok")
    completions = OpenAIChatBackend(url, api_key=_KEY, max_concurrency=2).generate(_requests(6, max_new_tokens=8))
    assert [c.text for c in completions] == ["ok"] * 6
    assert server_stats(url)["max_in_flight"] == 2  # 6 requests, each held 1 s: never more than 2 at once


def test_batch_deadline_keeps_answered_rows_and_fails_the_rest(url: str) -> None:
    # 2 requests at a time, each held DELAY s before the (serialised) generation: the first two are answered
    # by DELAY + 2 generations, the next two not before 2 x DELAY. The deadline sits between, with 2 s for the
    # generations of the first round (a busy 2-core runner takes up to ~1 s per answer).
    delay, deadline = 6.0, 10.0
    control_server(url, delay=delay, forced_answer="score: 3.5")
    backend = OpenAIChatBackend(url, api_key=_KEY, max_concurrency=2, batch_timeout=deadline)
    judge = ScoreJudge(backend)
    out = judge.evaluate(random_images(4))
    assert out.scores[:2].tolist() == [3.5, 3.5] and out.details["failure"][:2] == [None, None]
    assert all(math.isnan(s) for s in out.scores[2:].tolist())
    for reason in out.details["failure"][2:]:
        assert reason.startswith("generation failed: batch deadline of 10s passed; 2 of 4 requests were answered "
                                 "in time"), reason
    assert judge.failure_counts == {"generation failed": 2}  # had it waited, the second round would be answered


def test_batch_timeout_is_validated_and_passed_through_build_backend() -> None:
    from rewardkit.vlm.build import build_backend

    for bad in (0, -1.0, float("inf"), True, "10"):
        with pytest.raises(ValueError, match="batch_timeout"):
            OpenAIChatBackend("http://h:1/v1", batch_timeout=bad)
    backend = build_backend("judge", default_weights="hf:x/y", server="http://h:1/v1", batch_timeout=30)
    assert isinstance(backend, OpenAIChatBackend) and backend.batch_timeout == 30.0
    with pytest.raises(ValueError, match="only apply with server="):
        build_backend("judge", default_weights="hf:x/y", batch_timeout=30)


def test_payload_fields_images_and_urls() -> None:
    backend = OpenAIChatBackend("http://127.0.0.1:9", served_model="m")
    assert backend.base_url == "http://127.0.0.1:9/v1"
    assert OpenAIChatBackend("http://h:1/v1/", served_model="m").base_url == "http://h:1/v1"
    request = _requests(1)[0]
    body = backend.payload(request)
    assert body["model"] == "m" and body["temperature"] == 0 and body["max_tokens"] == 6
    assert "repetition_penalty" not in body and "chat_template_kwargs" not in body and "do_sample" not in body
    image_item, text_item = body["messages"][0]["content"]
    assert text_item == {"type": "text", "text": "Rate image 0."}
    url = image_item["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert np.array_equal(np.asarray(decoded), np.asarray(request.images()[0]))  # PNG: lossless
    tuned = backend.payload(_requests(1, enable_thinking=False, repetition_penalty=1.05)[0])
    assert tuned["chat_template_kwargs"] == {"enable_thinking": False} and tuned["repetition_penalty"] == 1.05
    jpeg = OpenAIChatBackend("http://h:1/v1", served_model="m", image_format="jpeg").payload(request)
    assert jpeg["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/jpeg;base64,")


def test_bad_arguments_raise() -> None:
    for kwargs, match in [({"max_concurrency": 0}, "max_concurrency"), ({"timeout": 0}, "timeout"),
                          ({"retries": -1}, "retries"), ({"image_format": "webp"}, "image_format")]:
        with pytest.raises(ValueError, match=match):
            OpenAIChatBackend("http://h:1/v1", **kwargs)
    with pytest.raises(ValueError, match="http"):
        OpenAIChatBackend("h:1/v1")
    with pytest.raises(TypeError, match="ChatRequest"):
        OpenAIChatBackend("http://h:1/v1", served_model="m").generate(["hi"])  # type: ignore[list-item]


def test_unreachable_server_gives_failed_completions() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = f"http://127.0.0.1:{port}/v1"
    down = OpenAIChatBackend(base, served_model="m", retries=1, backoff=0.0).generate(_requests(2))
    assert all(c.text is None and c.error.startswith("connection error") for c in down)
    unnamed = OpenAIChatBackend(base, retries=0).generate(_requests(1))
    assert unnamed == [Completion(None, unnamed[0].error)] and "served_model" in unnamed[0].error
