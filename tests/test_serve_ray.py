"""``rewardkit serve`` on a real (local, loopback) Ray Serve: served scores, routes, dynamic batching, a
YAML composition, a replica killed under load, and the CLI joining the cluster with ``--address``.

One Ray instance for the module (``ray.init(num_cpus=2)`` is slow on 2 cores); every application is
deleted by its test and Ray is shut down at the end.
"""

from __future__ import annotations

import io
import math
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rewardkit as rk
from rewardkit.serve.client import RemoteReward
from rewardkit.serve.core import ServeSpec
from rewardkit.serve.deployment import DeploymentOptions, build_app
from rewardkit.testing import random_images

BRIGHTNESS = "rewardkit.testing.toy_rewards:load_brightness"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray import serve

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}", ray.get_runtime_context().gcs_address
    finally:
        serve.shutdown()
        ray.shutdown()


def _deploy(spec: ServeSpec, name: str, **options) -> None:
    from ray import serve

    serve.run(build_app(spec, DeploymentOptions(**options)), name=name, route_prefix=f"/{name}")


def _jpeg_roundtrip(images: torch.Tensor) -> torch.Tensor:
    """What a reward-server sees: the images as JPEG at PIL's default quality, decoded."""
    rows = []
    for array in (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG")
        rows.append(np.array(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    return torch.from_numpy(np.stack(rows)).permute(0, 3, 1, 2).float() / 255


def test_served_tiny_pickscore_routes_and_protocols(cluster, tiny_root: Path, tiny_reward) -> None:
    from ray import serve

    base, _ = cluster
    local = tiny_reward("pickscore")  # the same tiny checkpoint the replicas build under tiny_root/upstream
    _deploy(ServeSpec("pickscore", tiny=True, tiny_root=str(tiny_root / "upstream")), "pick", replicas=2,
            num_cpus=0.5, allow_pickle=True)
    try:
        url = f"{base}/pick"
        assert urllib.request.urlopen(url + "/health", timeout=30).read() == b"ok"
        images, prompts = random_images(6, 40, 32, seed=11), [f"prompt {i}" for i in range(6)]
        remote = rk.load("pickscore", server=url, batch_size=4)
        torch.testing.assert_close(remote(images, prompts), local(images, prompts), rtol=1e-5, atol=1e-5)
        described = RemoteReward.from_server(url)  # GET /ready describes the served reward
        assert (described.name, described.requires_prompt) == ("pickscore", True)
        pickled = rk.load("pickscore", server=url, protocol="reward-server")  # the opt-in POST / route
        torch.testing.assert_close(pickled(images, prompts), local(_jpeg_roundtrip(images), prompts),
                                   rtol=1e-5, atol=1e-5)
        _load_with_a_replica_killed(url, local)
    finally:
        serve.delete("pick")


def _load_with_a_replica_killed(url: str, local) -> None:
    """4 clients x 4 calls of 4 rows; one of the two replicas is killed after the first answers."""
    import ray

    remote = rk.load("pickscore", server=url, batch_size=2, retries=4, backoff=0.5, timeout=60)
    images, prompts = random_images(4, 32, 32, seed=12), ["a", "b", "c", "d"]
    expected = local(images, prompts)
    first_answer = threading.Event()

    def client(_: int) -> list:
        outs = []
        for _ in range(4):
            outs.append(remote.evaluate(images, prompts))
            first_answer.set()
        return outs

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client, i) for i in range(4)]
        assert first_answer.wait(120)
        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "pick#reward" in a["name"]]
        assert len(replicas) == 2
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
        outs = [out for future in futures for out in future.result(timeout=300)]
    assert len(outs) == 16
    for out in outs:  # nothing lost: every row scored (and right) or NaN with its reason
        assert out.scores.shape == (4,)
        for score, reason, want in zip(out.scores.tolist(), out.details["failure"], expected.tolist()):
            assert (reason is None and math.isclose(score, want, rel_tol=1e-5, abs_tol=1e-5)) or \
                (math.isnan(score) and reason)


def test_yaml_composition_and_dynamic_batching(cluster, tmp_path: Path) -> None:
    from ray import serve

    base, _ = cluster
    spec = tmp_path / "total.yaml"
    spec.write_text(f"rewards:\n  jpeg-compressibility: 1.0\n  {BRIGHTNESS}: 0.5\nname: total\n")
    _deploy(ServeSpec(str(spec)), "total", num_cpus=0.25, max_batch_size=64, batch_wait_s=0.5)
    try:
        url = f"{base}/total"
        local = rk.compose({"jpeg-compressibility": 1.0, BRIGHTNESS: 0.5}, name="total")
        remote = RemoteReward.from_server(url, batch_size=1, max_concurrency=8)
        assert remote.name == "total" and not remote.requires_prompt
        images = random_images(8, 24, 24, seed=13)
        out = remote.evaluate(images)
        torch.testing.assert_close(out.scores, local(images), rtol=1e-5, atol=1e-5)
        assert out.details["jpeg-compressibility"] == pytest.approx(rk.load("jpeg-compressibility")(images).tolist())
        import json

        info = json.loads(urllib.request.urlopen(url + "/ready", timeout=30).read())
        assert info["rows"] == 8 and info["passes"] < 8  # 8 one-row requests merged into fewer passes
    finally:
        serve.delete("total")


def test_cli_serve_joins_the_cluster_and_stops_on_sigterm(cluster) -> None:
    from ray import serve

    base, address = cluster
    script = Path(sys.executable).with_name("rewardkit")
    process = subprocess.Popen([str(script), "serve", "jpeg-compressibility", "--address", address, "--name", "cli",
                                "--route-prefix", "/cli", "--num-cpus", "0.25", "--port", base.rsplit(":", 1)[1]],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    serving = threading.Event()

    def read() -> None:  # the command prints its URL once serve.run has returned
        for line in process.stdout:
            lines.append(line)
            if line.startswith("serving "):
                serving.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    url = f"{base}/cli"
    try:
        assert serving.wait(150), "".join(lines)
        assert urllib.request.urlopen(url + "/ready", timeout=30).status == 200
        images = random_images(3, 16, 16, seed=14)
        scores = rk.load("jpeg-compressibility", server=url)(images)
        assert scores.tolist() == rk.load("jpeg-compressibility")(images).tolist()
    finally:
        process.send_signal(signal.SIGTERM)  # as `kill` / docker stop would
        process.wait(timeout=120)
        reader.join(timeout=30)
    output = "".join(lines)
    assert process.returncode == 0, output
    assert f"serving jpeg-compressibility at {url}/score" in output
    assert "cli" not in serve.status().applications  # removed its own application, left the cluster running
