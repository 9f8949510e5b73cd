"""Serving overhead: the same PickScore-architecture model scored in-process, behind a one-worker
gunicorn-style WSGI server (``rewardkit.serve.wsgi``: one request at a time, no batching, as a sync
gunicorn worker of yifan123/reward-server), and behind ``rewardkit serve`` on Ray Serve (dynamic
batching; 1 and 2 replicas), all on loopback.

Load: ``--clients`` threads each make ``--calls`` calls of ``--batch`` images (prompts from
bench_clip_rewards.PROMPTS) through ``RemoteReward`` (safetensors wire format); in-process is one thread
making the same calls in a row. Reported: throughput (images/s over the whole run) and p50 / p99 latency
of one call. Every served score is checked against the in-process score of the same rows (max |diff|).

Model: a seeded random CLIP in PickScore's HF format (``bench_clip_rewards.write_checkpoint``) of a
"small" size (image 96/16, vision 128 x 4, text 128 x 2, embed 128) so the network, not the HTTP layer,
is most of a call. CPU only.

Usage:
    .venv/bin/python benchmarks/bench_serve.py                  # writes benchmarks/results/serve.md
    .venv/bin/python benchmarks/bench_serve.py --calls 4 --out /tmp/serve.md
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import rewardkit as rk  # noqa: E402
from bench_clip_rewards import PROMPTS, Arch, machine_description, write_checkpoint  # noqa: E402
from rewardkit.serve.core import ScoringCore, ServeSpec  # noqa: E402
from rewardkit.serve.wsgi import make_wsgi_app, start_wsgi_server  # noqa: E402
from rewardkit.testing import random_images  # noqa: E402

SMALL = Arch(96, 16, 128, 4, 4, 128, 2, 4, 128)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _run(call: Callable[[int], torch.Tensor], clients: int, calls: int) -> tuple[float, list[float], list]:
    """``(wall seconds, per-call latencies, outputs in call order)`` of ``clients`` x ``calls``."""
    latencies: list[float] = []
    outputs: list = [None] * (clients * calls)

    def client(index: int) -> None:
        for j in range(calls):
            start = time.perf_counter()
            outputs[index * calls + j] = call(index * calls + j)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return time.perf_counter() - start, latencies, outputs


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--calls", type=int, default=12, help="calls per client")
    parser.add_argument("--batch", type=int, default=8, help="images per call")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "serve.md"))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    weights = write_checkpoint("pickscore", root, SMALL, seed=0)["rk"]["weights"]
    local = rk.load("pickscore", weights=weights)
    total = args.clients * args.calls
    images = [random_images(args.batch, 96, 96, seed=i) for i in range(total)]
    prompts = [[PROMPTS[(i + j) % len(PROMPTS)] for j in range(args.batch)] for i in range(total)]
    with torch.inference_mode():
        local(images[0], prompts[0])  # warm-up
        rows: list[tuple[str, float, list[float], float]] = []
        wall, lat, expected = _run(lambda i: local(images[i], prompts[i]), 1, total)
    rows.append(("in-process (1 thread, sequential)", wall, lat, 0.0))

    def served(name: str, url: str) -> None:
        remote = rk.load("pickscore", server=url, batch_size=args.batch, max_concurrency=args.clients, timeout=300)
        remote(images[0], prompts[0])  # warm-up (connection, replica load)
        wall, lat, outs = _run(lambda i: remote(images[i], prompts[i]), args.clients, args.calls)
        diff = max(float((o - e).abs().max()) for o, e in zip(outs, expected))
        rows.append((name, wall, lat, diff))

    server, url = start_wsgi_server(make_wsgi_app(ScoringCore(local)))
    try:
        served("WSGI, 1 sequential worker (gunicorn-style)", url)
    finally:
        server.shutdown()
        server.server_close()

    import ray
    from ray import serve

    from rewardkit.serve.deployment import DeploymentOptions, build_app

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for replicas in (1, 2):
            serve.run(build_app(ServeSpec("pickscore", weights=weights, device="cpu"),
                                DeploymentOptions(replicas=replicas, num_cpus=1.0 / replicas, max_batch_size=32)),
                      name="bench", route_prefix="/")
            served(f"Ray Serve, {replicas} replica(s), dynamic batching <= 32 rows", f"http://127.0.0.1:{port}")
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    _write(Path(args.out), args, rows, total)


def _write(path: Path, args: Any, rows: list, total: int) -> None:
    lines = ["# Serving: in-process vs a one-worker WSGI server vs Ray Serve", "",
             "Written by `benchmarks/bench_serve.py`. Same model (random CLIP in PickScore's HF format, image 96/16, "
             "vision 128 x 4, text 128 x 2), same inputs, loopback HTTP, safetensors wire format, CPU.", "",
             f"Load: {args.clients} client threads x {args.calls} calls x {args.batch} images ({total * args.batch} "
             "images); in-process is one thread making the same calls in a row.", "",
             *machine_description(torch.get_num_threads()), "",
             "| mode | images/s | p50 call (ms) | p99 call (ms) | max abs diff vs in-process |",
             "|---|---:|---:|---:|---:|"]
    for name, wall, lat, diff in rows:
        lines.append(f"| {name} | {total * args.batch / wall:.1f} | {1000 * statistics.median(lat):.1f} | "
                     f"{1000 * _percentile(lat, 0.99):.1f} | {diff:.2e} |")
    lines += ["", "Notes: the machine is shared (2 cores, other jobs running), so the numbers are indicative; the "
              "served latencies include the concurrent clients' queueing (4 calls in flight against 1 model), the "
              "in-process ones do not. Ray's replicas and the client share the same 2 cores here; on a GPU node the "
              "replicas sit on their own devices."]
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
