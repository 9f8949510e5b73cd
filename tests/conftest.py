"""Test configuration: offline guard, seeds, tiny checkpoints shared by the session.

No test may touch the network: the hub libraries are put in offline mode and any socket connection
to a non-loopback address fails the test (a download attempt is a failure, never a skip).
"""

from __future__ import annotations

import os

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "REWARDKIT_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import socket  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# The recipe tests' shared checks live in tests/recipe_harness.py: keep pytest's detailed assertion messages there.
pytest.register_assert_rewrite("recipe_harness")

# trl 0.23's DDPOTrainer tests need their own environment (.venv-trl023, built and run by .ci/run).
collect_ignore = ["legacy_trl023"]

_real_connect = socket.socket.connect


def _guarded_connect(self, address):  # type: ignore[no-untyped-def]
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1") or host.startswith("/")):
        return _real_connect(self, address)
    raise RuntimeError(f"network access attempted in a test: {address!r}")


socket.socket.connect = _guarded_connect  # type: ignore[method-assign]

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

CLIP_REWARDS = ("clip-score", "pickscore", "hpsv2", "hpsv2.1", "aesthetic", "bioclip")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for every tiny checkpoint of the session (built on first use)."""
    return tmp_path_factory.mktemp("tiny-checkpoints")


@pytest.fixture(scope="module")
def one_thread_per_module():
    """One intra-op thread for a whole test module, restored after it; a module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread_per_module")``. Tiny models gain nothing from intra-op
    threads, and on a busy 2-core runner each op then waits for a second thread (~8 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_REWARD_CACHE: dict[tuple[str, str], object] = {}


@pytest.fixture(scope="session")
def tiny_reward(tiny_root: Path):
    """``tiny_reward(name, layout="upstream")`` -> a cached tiny reward (fp32, CPU)."""
    import rewardkit.testing as rkt

    def build(name: str, layout: str = "upstream"):
        key = (name, layout)
        if key not in _REWARD_CACHE:
            _REWARD_CACHE[key] = rkt.load_tiny(name, tiny_root / layout, layout=layout)
        return _REWARD_CACHE[key]

    return build


@pytest.fixture
def run_two_processes(tmp_path: Path):
    """``run(worker_file_name, port)`` -> the JSON each of 2 CPU ranks wrote (``torch.distributed.run``, gloo).

    Workers live in ``tests/distributed/`` and write ``<out>.<rank>`` given ``out`` as their argument.
    """
    import json
    import subprocess
    import sys

    def run(worker: str, port: int) -> list:
        out = tmp_path / "result"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(port), str(Path(__file__).parent / "distributed" / worker), str(out)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]

    return run
