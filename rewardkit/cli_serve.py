"""``rewardkit serve``: any registry reward or YAML composition as a Ray Serve deployment.

On a laptop (starts a local Ray, CPU)::

    rewardkit serve pickscore --tiny            # http://127.0.0.1:8000/score

On a Ray cluster (joins it; Ray places the replicas)::

    rewardkit serve pickscore --address auto --replicas 4 --num-gpus 0.5 --host 0.0.0.0

Runs until interrupted (Ctrl-C or SIGTERM), then removes its application (and stops the Ray it started).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from typing import Any

__all__ = ["add_commands", "COMMANDS", "run_serve", "add_engine_flags", "run_score_ray"]

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

    from rewardkit.serve.core import ServeSpec, check_spec

    check_pickle_host(args.host, args.pickle, args.pickle_on_network)  # all checks before Ray starts
    spec = ServeSpec(args.reward, tiny=args.tiny, weights=args.weights, dtype=args.dtype, device=args.device)
    check_spec(spec)
    import ray
    from ray import serve

    from rewardkit.serve.deployment import DeploymentOptions, build_app

    options = DeploymentOptions(replicas=args.replicas, num_gpus=args.num_gpus, num_cpus=args.num_cpus,
                                max_batch_size=args.max_batch_size, batch_wait_s=args.batch_wait_ms / 1000,
                                max_ongoing_requests=args.max_ongoing, allow_pickle=args.pickle)
    own_ray = args.address is None
    ray.init(address=args.address, include_dashboard=False if own_ray else None, log_to_driver=False)
    if wait and threading.current_thread() is threading.main_thread():
        # After ray.init, which installs its own (aborting) handler: SIGTERM (kill, docker stop, a background
        # job whose SIGINT the shell ignores) stops the server cleanly, like Ctrl-C.
        signal.signal(signal.SIGTERM, _interrupt)
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


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


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


def add_engine_flags(score: argparse.ArgumentParser) -> None:
    """``rewardkit score --engine ray`` and its flags (added to the ``score`` sub-parser by cli.py)."""
    score.add_argument("--engine", choices=("local", "ray"), default="local", help="local: this process (default); "
                       "ray: Ray Data, one actor per device, resumable; --images may also name .parquet / .tar shards")
    score.add_argument("--shard-dir", metavar="DIR", help="--engine ray: finished shards (default OUT.shards/); "
                       "shards found there are skipped")
    score.add_argument("--shard-size", type=int, default=512, metavar="N", help="--engine ray: image files per shard")
    score.add_argument("--actors", type=int, default=1, metavar="N", help="--engine ray: scoring actors (one per device)")
    score.add_argument("--gpus-per-actor", type=float, default=0.0, metavar="F", help="--engine ray: GPUs per actor")
    score.add_argument("--address", help="--engine ray: a running Ray cluster to join (default: start a local one)")


def run_score_ray(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``rewardkit score --engine ray``: the same checks and rows as the local engine, scored on Ray Data."""
    from pathlib import Path

    from rewardkit.cli_inputs import OUTPUT_SUFFIXES, check_rewards, collect_images, parse_weights, read_prompts
    from rewardkit.report import write_scores
    from rewardkit.serve.dataset import is_dataset_file, score_with_ray

    names, out = list(dict.fromkeys(args.names)), Path(args.out)
    if args.server or args.served_model:
        raise ValueError("--engine ray scores with local models on Ray actors; drop --server / --served-model")
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ValueError(f"--out {out}: unknown format {out.suffix!r}; name the file *.jsonl or *.csv")
    datasets = [Path(s) for s in args.images if is_dataset_file(s)]
    images = collect_images([s for s in args.images if not is_dataset_file(s)])
    prompts = read_prompts(images, args.prompt, args.prompts)
    if datasets and (args.prompt or args.prompts):
        raise ValueError("--prompt / --prompts apply to image files; .parquet / .tar shards carry their own prompts")
    check_rewards(names, prompts is not None or bool(datasets))
    weights = parse_weights(args.weights, names)
    if args.tiny and weights:
        raise ValueError("--tiny builds random models; drop --weights (or drop --tiny to load real weights)")
    shard_dir = Path(args.shard_dir) if args.shard_dir else out.with_name(out.name + ".shards")
    rows = score_with_ray(names, [p for p, _ in images], prompts, datasets, shard_dir=shard_dir,
                          shard_size=args.shard_size, batch_size=args.batch_size, preprocess=args.preprocess,
                          weights=weights, device=args.device, dtype=args.dtype,
                          tiny_root=shard_dir / "tiny-models" if args.tiny else None, actors=args.actors,
                          gpus_per_actor=args.gpus_per_actor, address=args.address)
    write_scores(rows, names, out)
    return rows
