"""A real local OpenAI-compatible HTTP server around ``TransformersBackend``, for tests of ``OpenAIChatBackend``.

``python -m rewardkit.testing.vlm_server --model DIR --port 0 [--forced-answer TEXT] [--delay S]
[--garbage {json,500,thinking}] [--fail-first N] [--api-key KEY] [--served-name NAME]`` loads the model folder
(e.g. ``rewardkit.testing.tiny_qwen_vl(...)``), binds a ``ThreadingHTTPServer`` on 127.0.0.1 and prints
the bound port as its first stdout line. It serves ``GET /v1/models``, ``POST /v1/chat/completions``
(images given as ``data:`` URLs are decoded and the answer comes from the model itself, greedy) and a
test-only ``GET /v1/stats`` (requests seen, most requests in flight at once). Failure modes for tests:
``--forced-answer`` installs ``forced_answer_processor`` in the model, ``--delay`` sleeps before each
answer (timeouts, concurrency), ``--garbage json`` answers 200 with a malformed body, ``--garbage 500``
answers HTTP 500, ``--garbage thinking`` answers the text as ``reasoning_content`` with an empty ``content``
(what ``transformers serve`` does with ``enable_thinking``), ``--fail-first N`` answers 503 to the first N chat requests (retries). The same
settings can be changed while it runs with a test-only ``POST /v1/control`` whose JSON body holds any of
``forced_answer``, ``delay``, ``garbage``, ``fail_first`` (``fail_first`` counts from that moment), so
one server process can serve a whole test module.

The request/response shapes follow the OpenAI chat-completions API as vLLM serves it; the server is
greedy only and rejects a non-zero temperature. ``serve_tiny_vlm(model_dir, **flags)`` runs it as a
subprocess and yields the base URL.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

__all__ = ["serve_tiny_vlm", "control_server", "server_stats", "build_server", "main"]

_DATA_URL_PREFIX = "data:image/"
_STARTUP_TIMEOUT = 120.0  # seconds to wait for the subprocess to load the model and print its port


def _decode_image(url: str) -> Any:
    from PIL import Image

    if not url.startswith(_DATA_URL_PREFIX) or ";base64," not in url:
        raise ValueError("only base64 data:image/... URLs are supported by this test server")
    image = Image.open(io.BytesIO(base64.b64decode(url.split(";base64,", 1)[1])))
    image.load()
    return image.convert("RGB")


def _to_request(body: dict) -> Any:
    """An OpenAI chat-completions body -> a ``ChatRequest`` (raises ``ValueError`` on a bad body)."""
    from rewardkit.vlm.requests import ChatRequest, GenerationSettings

    if body.get("temperature", 1) != 0:
        raise ValueError(f"this test server is greedy only: send temperature 0, got {body.get('temperature')!r}")
    messages = []
    for message in body["messages"]:
        content = message["content"]
        if not isinstance(content, str):
            content = [{"type": "image", "image": _decode_image(item["image_url"]["url"])}
                       if item["type"] == "image_url" else {"type": "text", "text": item["text"]} for item in content]
        messages.append({"role": message["role"], "content": content})
    thinking = (body.get("chat_template_kwargs") or {}).get("enable_thinking")
    settings = GenerationSettings(max_new_tokens=int(body.get("max_tokens", 1024)),
                                  repetition_penalty=body.get("repetition_penalty"), enable_thinking=thinking)
    return ChatRequest(messages, settings)


_CONTROLS = ("forced_answer", "delay", "garbage", "fail_first")


class _State:
    def __init__(self, backend: Any, args: argparse.Namespace) -> None:
        self.backend, self.args = backend, args
        self.lock, self.generate_lock = threading.Lock(), threading.Lock()
        self.requests = self.in_flight = self.max_in_flight = self.failed_from = 0

    def control(self, changes: dict) -> None:
        unknown = set(changes) - set(_CONTROLS)
        if unknown:
            raise ValueError(f"unknown controls {sorted(unknown)}; allowed: {_CONTROLS}")
        with self.lock:
            for key, value in changes.items():
                setattr(self.args, key, value)
            if "fail_first" in changes:
                self.failed_from = self.requests
            self.max_in_flight = 0

    def enter(self) -> int:
        with self.lock:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self.requests

    def leave(self) -> None:
        with self.lock:
            self.in_flight -= 1


class _Handler(BaseHTTPRequestHandler):
    """The OpenAI-compatible routes; the server's ``rk_state`` holds the model and the test controls."""

    protocol_version = "HTTP/1.1"

    @property
    def state(self) -> _State:
        return self.server.rk_state  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read stdout/stderr
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        # A chat request stops counting as in flight before its answer is written: once the client has read
        # it, the client's next request may arrive before this thread runs again, and counting both would
        # report one request more in flight than the client ever had (max_in_flight 3 under a limit of 2).
        self._leave_once()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"))

    def _authorised(self) -> bool:
        key = self.state.args.api_key
        if key and self.headers.get("Authorization") != f"Bearer {key}":
            self._json(401, {"error": {"message": "invalid api key", "type": "authentication_error"}})
            return False
        return True

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v1/stats":  # test-only endpoints need no key
            self._json(200, {"requests": self.state.requests, "in_flight": self.state.in_flight,
                             "max_in_flight": self.state.max_in_flight})
            return
        if not self._authorised():
            return
        if self.path.rstrip("/") == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.state.args.served_name, "object": "model"}]})
        else:
            self._json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.rstrip("/") != "/v1/control" and not self._authorised():
            return
        if self.path.rstrip("/") == "/v1/control":
            try:
                self.state.control(json.loads(body))
            except (ValueError, TypeError) as error:
                self._json(400, {"error": {"message": str(error)}})
                return
            self._json(200, {key: getattr(self.state.args, key) for key in _CONTROLS})
            return
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._json(404, {"error": {"message": f"no route {self.path}"}})
            return
        number = self.state.enter()
        self._counted = True
        try:
            self._answer(body, number)
        finally:
            self._leave_once()

    def _leave_once(self) -> None:
        if getattr(self, "_counted", False):
            self._counted = False
            self.state.leave()

    def _answer(self, body: bytes, number: int) -> None:
        args = self.state.args
        if args.delay:
            time.sleep(args.delay)
        if number - self.state.failed_from <= args.fail_first:
            self._json(503, {"error": {"message": f"busy (request {number} of the first {args.fail_first})"}})
            return
        if args.garbage == "500":
            self._send(500, b"internal server error (garbage mode)", "text/plain")
            return
        if args.garbage == "json":
            self._send(200, b'{"choices": [{"message": {"content": "trunc')
            return
        try:
            request = _to_request(json.loads(body))
        except (ValueError, KeyError, TypeError) as error:
            self._json(400, {"error": {"message": f"bad request: {error}", "type": "invalid_request_error"}})
            return
        with self.state.generate_lock:  # one model, one generate at a time
            completion = self.state.backend.generate([request])[0]
        if completion.text is None:
            self._json(500, {"error": {"message": completion.error}})
            return
        message = {"role": "assistant", "content": completion.text}
        if args.garbage == "thinking":  # what `transformers serve` answers with enable_thinking: all in reasoning
            message = {"role": "assistant", "content": "", "reasoning_content": completion.text}
        self._json(200, {"id": f"chatcmpl-{number}", "object": "chat.completion", "model": args.served_name,
                         "choices": [{"index": 0, "finish_reason": "stop", "message": message}]})


def build_server(args: argparse.Namespace) -> ThreadingHTTPServer:
    """Load the model of ``args.model`` and bind (not yet serve) the HTTP server."""
    from rewardkit.testing.vlm import forced_answer_processor
    from rewardkit.vlm.local import TransformersBackend

    def factory() -> Any:  # called inside generate, under the state's generate lock
        if args.forced_answer is None:
            from transformers import LogitsProcessorList

            return LogitsProcessorList()
        return forced_answer_processor(backend.tokenizer, args.forced_answer)

    backend = TransformersBackend(args.model, batch_size=1, logits_processor_factory=factory).load()
    server = ThreadingHTTPServer((args.host, args.port), _Handler)
    server.rk_state = _State(backend, args)  # type: ignore[attr-defined]
    server.daemon_threads = True
    return server


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rewardkit.testing.vlm_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF model folder, e.g. from rewardkit.testing.tiny_qwen_vl")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port (printed on the first stdout line)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--served-name", default="tiny-vlm", help="the id /v1/models lists")
    parser.add_argument("--forced-answer", default=None, help="make the model answer exactly this text")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to sleep before each answer")
    parser.add_argument("--garbage", choices=("json", "500", "thinking"), default=None, const="500", nargs="?",
                        help="answer malformed JSON (json), HTTP 500 (500, the default of a bare --garbage), or the "
                        "answer as reasoning_content with an empty content (thinking)")
    parser.add_argument("--fail-first", type=int, default=0, help="answer 503 to the first N chat requests")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run the server until killed; the first stdout line is the bound port."""
    args = _parser().parse_args(argv)
    server = build_server(args)
    sys.stdout.write(f"{server.server_address[1]}\n")
    sys.stdout.flush()
    server.serve_forever()


@contextlib.contextmanager
def serve_tiny_vlm(model_dir: str | Path, *, forced_answer: str | None = None, delay: float = 0.0,
                   garbage: str | None = None, fail_first: int = 0, api_key: str | None = None,
                   served_name: str = "tiny-vlm", startup_timeout: float = _STARTUP_TIMEOUT) -> Iterator[str]:
    """Run :func:`main` in a subprocess on a free port; yields its base URL ``http://127.0.0.1:PORT/v1``.

    The process is killed on exit. Raises ``RuntimeError`` (with the server's stderr) when it does not
    print its port within ``startup_timeout`` seconds.
    """
    command = [sys.executable, "-m", "rewardkit.testing.vlm_server", "--model", str(model_dir), "--port", "0",
               "--served-name", served_name, "--delay", str(delay), "--fail-first", str(fail_first)]
    for flag, value in (("--forced-answer", forced_answer), ("--garbage", garbage), ("--api-key", api_key)):
        if value is not None:
            command += [flag, value]
    with tempfile.TemporaryFile(prefix="rk-vlm-server-") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            yield f"http://127.0.0.1:{_read_port(process, stderr, startup_timeout)}/v1"
        finally:
            process.kill()
            process.wait(timeout=30)
            if process.stdout is not None:
                process.stdout.close()


def _post_json(url: str, payload: dict | None) -> dict:
    import urllib.request

    data = None if payload is None else json.dumps(payload).encode("utf-8")
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                     method="GET" if payload is None else "POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def control_server(base_url: str, **changes: Any) -> dict:
    """Change a running test server's ``forced_answer`` / ``delay`` / ``garbage`` / ``fail_first``."""
    return _post_json(base_url.rstrip("/") + "/control", changes)


def server_stats(base_url: str) -> dict:
    """A running test server's ``{"requests": n, "in_flight": k, "max_in_flight": m}`` (m: the most chat
    requests in flight at once since the last control call)."""
    return _post_json(base_url.rstrip("/") + "/stats", None)


def _read_port(process: subprocess.Popen, stderr: Any, timeout: float) -> int:
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if line and line[0].strip().isdigit():
        return int(line[0])
    process.kill()
    process.wait(timeout=30)
    stderr.seek(0)
    tail = stderr.read()[-2000:].decode("utf-8", "replace")
    raise RuntimeError(f"the test VLM server did not report its port within {timeout:g} s "
                       f"(exit code {process.returncode}); its stderr ends with:\n{tail}")


if __name__ == "__main__":
    main()
