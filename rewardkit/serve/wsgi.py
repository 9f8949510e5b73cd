"""The same routes as the Ray Serve deployment as a plain WSGI app: the gunicorn-style baseline.

yifan123/reward-server runs a Flask app under gunicorn (``gunicorn.conf.py``: ``worker_class = "sync"``,
one worker per GPU, bound to 127.0.0.1); :func:`make_wsgi_app` is that shape without Flask, so it runs
under gunicorn (``gunicorn "rewardkit.serve.wsgi:app_from_env()"`` with ``REWARDKIT_SERVE_REWARD=name``)
or, for benchmarks and tests, in the standard library's ``wsgiref`` server (:func:`start_wsgi_server`).
There is no dynamic batching: each request is one forward pass, as in a sync gunicorn worker.
"""

from __future__ import annotations

import ipaddress
import os
import threading
import warnings
from typing import Any, Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from rewardkit.serve.core import ScoringCore, ServeSpec, load_served_reward
from rewardkit.serve.wire import (JSON, WireError, decode_pickle_request, decode_request, encode_pickle_response,
                                  encode_response)

__all__ = ["make_wsgi_app", "app_from_env", "start_wsgi_server", "check_pickle_host", "PICKLE_WARNING"]

PICKLE_WARNING = ("the reward-server pickle protocol is on: unpickling a request is code execution. rewardkit "
                  "unpickles only plain containers and numpy arrays, but serve it only to peers you trust")
_STATUS = {200: "200 OK", 400: "400 Bad Request", 404: "404 Not Found"}


def check_pickle_host(host: str, allow_pickle: bool, pickle_on_network: bool) -> None:
    """Refuse the pickle protocol on a non-loopback address unless explicitly allowed; warn whenever it is on."""
    if not allow_pickle:
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not pickle_on_network:
        raise ValueError(f"--pickle binds to loopback only, got --host {host}; add --pickle-on-network to expose the "
                         "pickle protocol (code execution for any peer that can reach it) on the network")
    warnings.warn(PICKLE_WARNING, stacklevel=2)


def make_wsgi_app(core: ScoringCore, allow_pickle: bool = False) -> Callable:
    """A WSGI app answering ``GET /health``, ``GET /ready``, ``POST /score`` and (opt-in) the pickle ``POST /``."""
    import json

    def app(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/").rstrip("/") or "/"

        def answer(status: int, body: bytes, kind: str = JSON) -> list[bytes]:
            start_response(_STATUS[status], [("Content-Type", kind), ("Content-Length", str(len(body)))])
            return [body]

        if method == "GET" and path == "/health":
            return answer(200, b"ok", "text/plain")
        if method == "GET" and path == "/ready":
            return answer(200, json.dumps(core.info()).encode())
        if method != "POST" or path not in ("/", "/score") or (path == "/" and not allow_pickle):
            return answer(404, json.dumps({"error": f"no route {method} {path}"}).encode())
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        try:
            batch = decode_pickle_request(body) if path == "/" else decode_request(body, environ.get("CONTENT_TYPE"))
            core.check(batch)
        except WireError as error:
            return answer(400, json.dumps({"error": str(error)}).encode())
        scored = core.score([batch])[0]
        if path == "/":
            return answer(200, encode_pickle_response(scored), "application/octet-stream")
        return answer(200, encode_response(scored))

    return app


def app_from_env() -> Callable:
    """For gunicorn: the reward named by ``$REWARDKIT_SERVE_REWARD`` (``$REWARDKIT_SERVE_PICKLE=1`` enables pickle)."""
    name = os.environ.get("REWARDKIT_SERVE_REWARD")
    if not name:
        raise ValueError("set REWARDKIT_SERVE_REWARD to a reward name or a .yaml composition spec")
    return make_wsgi_app(ScoringCore(load_served_reward(ServeSpec(name))),
                         allow_pickle=os.environ.get("REWARDKIT_SERVE_PICKLE") == "1")


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # wsgiref logs every request to stderr


def start_wsgi_server(app: Callable, host: str = "127.0.0.1", port: int = 0) -> tuple[WSGIServer, str]:
    """Serve ``app`` with one sequential worker in a daemon thread; returns ``(server, base URL)``.
    Stop it with ``server.shutdown(); server.server_close()``."""
    server = make_server(host, port, app, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="rk-wsgi", daemon=True).start()
    return server, f"http://{host}:{server.server_port}"
