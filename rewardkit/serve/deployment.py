"""``rewardkit serve`` on Ray Serve: one deployment per reward, with replicas, device placement and
dynamic request batching (``@serve.batch``, counted in image rows).

Routes (on the Ray Serve HTTP proxy, ``route_prefix="/"``):

* ``GET /health``: liveness, ``200 ok`` (Ray Serve's own ``/-/healthz`` checks the proxy).
* ``GET /ready``: ``200`` with the reward's description (name, higher_is_better, requires_prompt, device)
  once a replica has loaded its model (a replica does not take traffic before its ``__init__`` returns).
* ``POST /score``: the safe wire formats (safetensors or JSON, see ``wire.py``).
* ``POST /``: the field's pickle protocol (yifan123/reward-server), only when enabled with
  ``allow_pickle=True``; otherwise ``404`` saying how to enable it.

Requests from many clients are merged into one forward pass of up to ``max_batch_size`` image rows,
waiting at most ``batch_wait_s`` for a batch to fill; a request larger than a batch runs alone. The model
runs in a worker thread so health checks answer while a batch is scored.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from rewardkit.serve.core import ScoringCore, ServeSpec, load_served_reward
from rewardkit.serve.wire import (JSON, Batch, WireError, decode_pickle_request, decode_request,
                                  encode_pickle_response, encode_response)

__all__ = ["DeploymentOptions", "RewardDeployment", "build_app"]

logger = logging.getLogger(__name__)
DEFAULT_MAX_BATCH_SIZE = 32  # image rows per merged forward pass
DEFAULT_BATCH_WAIT_S = 0.01  # Ray Serve's own default batch_wait_timeout_s


@dataclass
class DeploymentOptions:
    """Placement and batching of the deployment.

    Attributes:
        replicas: replicas of the model (each loads its own copy).
        num_gpus: GPUs per replica; a fraction (e.g. 0.5) packs several replicas on one GPU.
        num_cpus: CPUs per replica (Ray's scheduling unit).
        max_batch_size: image rows merged into one forward pass.
        batch_wait_s: the longest a request waits for a batch to fill.
        max_ongoing_requests: requests a replica accepts at once (queued for batching); Ray's back-pressure.
        allow_pickle: serve the reward-server pickle protocol on ``POST /`` (unpickling is code execution).
    """

    replicas: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    batch_wait_s: float = DEFAULT_BATCH_WAIT_S
    max_ongoing_requests: int = 64
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.max_batch_size < 1 or self.max_ongoing_requests < 1:
            raise ValueError(f"need replicas, max_batch_size and max_ongoing_requests >= 1, got {self.replicas}, "
                             f"{self.max_batch_size}, {self.max_ongoing_requests}")
        if self.num_gpus < 0 or self.num_cpus < 0 or self.batch_wait_s < 0:
            raise ValueError(f"need num_gpus, num_cpus and batch_wait_s >= 0, got {self.num_gpus}, {self.num_cpus}, "
                             f"{self.batch_wait_s}")


def _rows(items: list[Batch]) -> int:
    return sum(len(item) for item in items)


@serve.deployment(name="reward")
class RewardDeployment:
    """One replica: loads the reward and scores merged requests (``ScoringCore``)."""

    def __init__(self, spec: ServeSpec, max_batch_size: int, batch_wait_s: float, allow_pickle: bool) -> None:
        if spec.device is None:  # Ray sets CUDA_VISIBLE_DEVICES to this replica's GPU share
            import torch

            spec.device = "cuda" if torch.cuda.is_available() and ray_gpu_ids() else "cpu"
        self.core = ScoringCore(load_served_reward(spec))
        self.max_batch_size, self.allow_pickle = max_batch_size, allow_pickle
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_s)
        logger.info("replica ready: %s on %s", self.core.info()["name"], self.core.device)

    def check_health(self) -> None:
        """Ray Serve's replica health check: the model is loaded (an exception marks the replica unhealthy)."""
        if self.core is None:
            raise RuntimeError("reward not loaded")

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S, batch_size_fn=_rows)
    async def _batched(self, items: list[Batch]) -> list[Any]:
        return await asyncio.to_thread(self.core.score, items)

    async def _score(self, batch: Batch) -> Any:
        if len(batch) > self.max_batch_size:  # larger than a batch: alone, never split across answers
            return (await asyncio.to_thread(self.core.score, [batch]))[0]
        return await self._batched(batch)

    async def __call__(self, request: Request) -> Response:
        path, prefix, method = request.url.path, request.scope.get("root_path", ""), request.method
        path = (path[len(prefix):] if prefix and path.startswith(prefix) else path).rstrip("/") or "/"  # --route-prefix
        if method == "GET" and path == "/health":
            return Response("ok", media_type="text/plain")
        if method == "GET" and path == "/ready":
            return JSONResponse(self.core.info())
        if method == "POST" and path in ("/score", "/"):
            body = await request.body()
            pickled = path == "/"
            if pickled and not self.allow_pickle:
                return JSONResponse({"error": "the reward-server pickle protocol is off on this server; POST safe "
                                     "formats to /score, or restart with `rewardkit serve --pickle`"}, status_code=404)
            try:
                batch = decode_pickle_request(body) if pickled else decode_request(body, request.headers.get("content-type"))
                self.core.check(batch)
            except WireError as error:
                return JSONResponse({"error": str(error)}, status_code=400)
            scored = await self._score(batch)
            if pickled:
                return Response(encode_pickle_response(scored), media_type="application/octet-stream")
            return Response(encode_response(scored), media_type=JSON)
        return JSONResponse({"error": f"no route {method} {path}; use GET /health, GET /ready, POST /score"},
                            status_code=404)


def ray_gpu_ids() -> list:
    """The GPUs Ray gave this worker (empty when it holds none)."""
    import ray

    try:
        return list(ray.get_gpu_ids())
    except Exception:  # noqa: BLE001 - outside a Ray worker
        return []


def build_app(spec: ServeSpec, options: DeploymentOptions | None = None) -> Any:
    """The Ray Serve application serving ``spec`` (pass it to ``serve.run``)."""
    options = options or DeploymentOptions()
    deployment = RewardDeployment.options(
        num_replicas=options.replicas, max_ongoing_requests=options.max_ongoing_requests,
        ray_actor_options={"num_gpus": options.num_gpus, "num_cpus": options.num_cpus})
    return deployment.bind(spec, options.max_batch_size, options.batch_wait_s, options.allow_pickle)
