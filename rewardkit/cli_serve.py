"""``rewardkit serve``: any registry reward or YAML composition as a Ray Serve deployment.

On a laptop (starts a local Ray, CPU)::

    rewardkit serve pickscore --tiny            # http://127.0.0.1:8000/score

On a Ray cluster (joins it; Ray places the replicas)::

    rewardkit serve pickscore --address auto --replicas 4 --num-gpus 0.5 --host 0.0.0.0

Runs until interrupted (Ctrl-C), then removes its application (and stops the Ray it started).
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

__all__ = ["add_commands", "COMMANDS", "run_serve"]

logger = logging.getLogger(__name__)
DEFAULT_PORT = 8000  # Ray Serve's default HTTP port


def add_commands(commands: Any) -> None:
    """Register ``serve`` on the main parser's sub-parsers."""
    serve = commands.add_parser("serve", help="serve a reward or a YAML composition over HTTP (Ray Serve)")
    serve.add_argument("reward", metavar="NAME|SPEC.yaml", help="a registry name, module:factory, or a .yaml file "
                       "with rk.compose arguments (rewards: {name: weight}, normalize: ...)")
    serve.add_argument("--tiny", action="store_true", help="tiny RANDOM models from rewardkit.testing (offline; "
                       "meaningless numbers, for trying the server)")
    serve.add_argument("--weights", help="local path, hf:owner/repo[/file] or ms:owner/repo[/file]")
    serve.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="fp32 = exact (default)")
    serve.add_argument("--device", help="e.g. cpu, cuda (default: cuda when the replica has a GPU, else cpu)")
    serve.add_argument("--replicas", type=int, default=1, metavar="N", help="model replicas (default 1)")
    serve.add_argument("--num-gpus", type=float, default=0.0, metavar="F", help="GPUs per replica; fractions pack "
                       "several replicas on one GPU (default 0)")
    serve.add_argument("--num-cpus", type=float, default=1.0, metavar="F", help="CPUs per replica (default 1)")
    serve.add_argument("--max-batch-size", type=int, default=32, metavar="N", help="image rows merged into one "
                       "forward pass (default 32)")
    serve.add_argument("--batch-wait-ms", type=float, default=10.0, metavar="MS", help="longest wait for a batch to "
                       "fill (default 10)")
    serve.add_argument("--max-ongoing", type=int, default=64, metavar="N", help="requests a replica accepts at once")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 for a cluster)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTP port (default {DEFAULT_PORT})")
    serve.add_argument("--route-prefix", default="/", help="URL prefix of this reward (default /)")
    serve.add_argument("--name", default="rewardkit", help="Ray Serve application name (default rewardkit)")
    serve.add_argument("--address", help="join a running Ray cluster (e.g. auto, ray://head:10001, or host:6379) "
                       "instead of starting a local one")
    serve.add_argument("--pickle", action="store_true", help="also serve the reward-server pickle protocol on "
                       "POST / (flow_grpo / ddpo-pytorch clients). Unpickling is code execution: loopback only")
    serve.add_argument("--pickle-on-network", action="store_true", help="allow --pickle on a non-loopback --host")


def run_serve(args: argparse.Namespace, *, wait: bool = True) -> str:
    """Deploy, print the URL and (with ``wait``) block until interrupted; returns the base URL."""
    from rewardkit.serve.wsgi import check_pickle_host

    check_pickle_host(args.host, args.pickle, args.pickle_on_network)  # before Ray starts
    import ray
    from ray import serve

    from rewardkit.serve.core import ServeSpec
    from rewardkit.serve.deployment import DeploymentOptions, build_app

    options = DeploymentOptions(replicas=args.replicas, num_gpus=args.num_gpus, num_cpus=args.num_cpus,
                                max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_ms / 1000,
                                max_ongoing_requests=args.max_ongoing, allow_pickle=args.pickle)
    spec = ServeSpec(args.reward, tiny=args.tiny, weights=args.weights, dtype=args.dtype, device=args.device)
    own_ray = args.address is None
    ray.init(address=args.address, include_dashboard=False if own_ray else None, log_to_driver=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(spec, options), name=args.name, route_prefix=args.route_prefix)
        url = f"http://{args.host}:{args.port}{args.route_prefix.rstrip('/')}"
        print(f"serving {args.reward} at {url}/score (GET {url}/health, {url}/ready)", flush=True)
        while wait:
            time.sleep(1.0)
        return url
    except KeyboardInterrupt:
        return ""
    finally:
        if wait:
            _stop(args.name, own_ray)


def _stop(name: str, own_ray: bool) -> None:
    import ray
    from ray import serve

    if own_ray:
        serve.shutdown()
        ray.shutdown()
    else:  # a shared cluster: remove only this application
        serve.delete(name)


def _cmd_serve(args: argparse.Namespace) -> None:
    run_serve(args)


COMMANDS = {"serve": _cmd_serve}
