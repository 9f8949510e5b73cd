"""The legacy trl 0.23 suite runs with its own pytest.ini (``-c``), so tests/conftest.py's offline guard is not
loaded: the same rule here, no network (hub libraries offline, non-loopback sockets fail the test)."""

from __future__ import annotations

import os
import socket

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "REWARDKIT_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"

_real_connect = socket.socket.connect


def _guarded_connect(self, address):  # type: ignore[no-untyped-def]
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1") or host.startswith("/")):
        return _real_connect(self, address)
    raise RuntimeError(f"network access attempted in a test: {address!r}")


socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
