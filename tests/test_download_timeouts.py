"""Downloads never hang: a server on 127.0.0.1 that accepts connections and never answers (or answers too
slowly) makes every weight source fail within the configured limits, with a message naming the URL, the limit
and the offline fix. Loopback servers only; the real network is never touched."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import types
from collections.abc import Iterator

import pytest
import torch

from rewardkit import weights as W

_ENV = {"REWARDKIT_DOWNLOAD_TIMEOUT": "0.5", "REWARDKIT_DOWNLOAD_DEADLINE": "1.5"}


class _Server:
    """A TCP server on 127.0.0.1: accepts every connection, then runs ``reply(connection)`` (default: nothing)."""

    def __init__(self, reply=None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.reply, self.connections, self.closed = reply, [], threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.closed.is_set():
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(connection)
            if self.reply is not None:
                threading.Thread(target=self.reply, args=(connection, self.closed), daemon=True).start()

    def close(self) -> None:
        self.closed.set()
        self.sock.close()
        for connection in self.connections:  # wakes the abandoned download threads blocked on them
            connection.close()


@pytest.fixture
def silent() -> Iterator[_Server]:
    server = _Server()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def _online_with_small_limits(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for var in ("HF_HUB_OFFLINE", "REWARDKIT_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in _ENV.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))


def _assert_fix_it(message: str, url: str, limit: str) -> None:
    for part in (url, limit, "REWARDKIT_OFFLINE=1", "weights=", "REWARDKIT_DOWNLOAD_TIMEOUT"):
        assert part in message, (part, message)


def test_url_that_never_answers_times_out(silent: _Server, tmp_path) -> None:
    url = f"http://127.0.0.1:{silent.port}/weights-0123abcd.pth"
    with pytest.raises(W.DownloadTimeoutError) as info:
        W.resolve_weights(url, what="FID weights")
    _assert_fix_it(str(info.value), url, "within 0.5 s")
    assert str(info.value).startswith("FID weights: ")
    assert not list((tmp_path / "hub").rglob("*.partial")), "a failed download must leave no partial file"


def _trickle(connection: socket.socket, closed: threading.Event) -> None:
    """Answer an HTTP request with headers for 10 kB, then one byte every 0.1 s (a stalled mirror)."""
    connection.recv(65536)
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n")
    while not closed.wait(0.1):
        try:
            connection.sendall(b"x")
        except OSError:
            return


def test_url_that_trickles_stops_at_the_deadline(tmp_path) -> None:
    server = _Server(_trickle)
    url = f"http://127.0.0.1:{server.port}/slow.pth"
    try:
        with pytest.raises(W.DownloadTimeoutError) as info:
            W.resolve_weights(url)
    finally:
        server.close()
    _assert_fix_it(str(info.value), url, "within the 1.5 s deadline")
    assert "REWARDKIT_DOWNLOAD_DEADLINE" in str(info.value)
    assert not (tmp_path / "hub" / "checkpoints" / "slow.pth").exists()
    assert not list((tmp_path / "hub" / "checkpoints").glob("*.partial"))


def test_modelscope_that_never_answers_stops_at_the_deadline(silent: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    def blocked_download(model_id, file_path, revision=None, **kwargs):  # a client stuck in a socket read
        with socket.create_connection(("127.0.0.1", silent.port)) as connection:
            connection.recv(1)
        raise ConnectionError("closed")

    module = types.ModuleType("modelscope")
    module.model_file_download = blocked_download
    monkeypatch.setitem(sys.modules, "modelscope", module)
    with pytest.raises(W.DownloadTimeoutError) as info:
        W.resolve_weights("ms:owner/repo/w.safetensors")
    _assert_fix_it(str(info.value), "https://modelscope.cn/models/owner/repo", "within the 1.5 s deadline")


_HF_SCRIPT = """
import json, sys
import rewardkit as rk
out = {}
for name, spec in (("pickscore", "hf:owner/repo"), ("hpsv2", "hf:owner/repo/HPS_v2_compressed.pt")):
    try:
        rk.load(name, weights=spec)
        out[name] = "loaded"
    except Exception as exc:
        out[name] = [type(exc).__name__, str(exc)]
print(json.dumps(out))
"""


def test_hf_endpoint_that_never_answers_times_out(silent: _Server, tmp_path) -> None:
    """``rk.load(..., weights="hf:...")``, folder and single-file forms, in a fresh process whose HF_ENDPOINT
    (read when huggingface_hub is imported) is the silent server."""
    endpoint = f"http://127.0.0.1:{silent.port}"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "REWARDKIT_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(_ENV, HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf-home"), REWARDKIT_DOWNLOAD_DEADLINE="30")
    result = subprocess.run([sys.executable, "-c", _HF_SCRIPT], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    kind, message = out["pickscore"]
    assert kind == "DownloadTimeoutError"
    _assert_fix_it(message, f"{endpoint}/owner/repo", "within 0.5 s")
    kind, message = out["hpsv2"]
    assert kind == "DownloadTimeoutError"
    _assert_fix_it(message, f"{endpoint}/owner/repo/resolve/main/HPS_v2_compressed.pt", "within 0.5 s")


@pytest.mark.parametrize(("value", "ok"), [("2.5", True), ("0", False), ("-1", False), ("soon", False), ("inf", False)])
def test_limits_are_validated(monkeypatch: pytest.MonkeyPatch, value: str, ok: bool) -> None:
    monkeypatch.setenv("REWARDKIT_DOWNLOAD_TIMEOUT", value)
    if ok:
        assert W.download_limits() == (2.5, 1.5)
    else:
        with pytest.raises(ValueError, match="REWARDKIT_DOWNLOAD_TIMEOUT=.*positive number of seconds"):
            W.download_limits()


def test_defaults_are_documented(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in _ENV:
        monkeypatch.delenv(var)
    assert W.download_limits() == (W.DEFAULT_DOWNLOAD_TIMEOUT_S, W.DEFAULT_DOWNLOAD_DEADLINE_S) == (30.0, 7200.0)
    assert "default 30" in W.__doc__ and "7200" in W.__doc__
