"""Shared plumbing of the recipe tests (tests/test_recipe_*.py): import a recipe file, `accelerate launch` it on
CPU, read what it logged to TensorBoard and the LoRA weights it checkpointed.

Test files import it as ``from recipe_harness import ...``: ``tests/`` has no ``__init__.py``, so pytest's
default ("prepend") import mode puts ``tests/`` on ``sys.path`` before it imports conftest.py and the test files.

Launches are real ``accelerate launch`` runs (``python -m accelerate.commands.launch``) on CPU. Two processes
need ``--multi_gpu`` with ``ACCELERATE_USE_CPU=1`` (``--cpu`` would start only one process,
reference/rl_integration.md section 4) and a free rendezvous port, as other suites may launch at the same time.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
LAUNCH_TIMEOUT_S = 600  # a hang guard: a hung collective must fail the test, not stall the suite
LAUNCH_ENV = {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
              "REWARDKIT_OFFLINE": "1"}
STDOUT_TAIL, STDERR_TAIL = 3000, 6000  # characters of each stream shown when a launch fails


def recipe_path(name: str) -> Path:
    """The recipe file ``recipes/<name>.py`` (``name`` e.g. ``"ddpo"``)."""
    return RECIPES / f"{name}.py"


def import_recipe(name: str) -> ModuleType:
    """Execute ``recipes/<name>.py`` as a fresh module named ``recipe_<name>`` and return it (no launch).

    The module is registered in ``sys.modules`` first: dataclasses resolve the configs' string annotations
    through it. Every call executes the file again (no caching), so each caller gets its own module state.
    """
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", recipe_path(name))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A currently free loopback TCP port, for the rendezvous of a multi-process launch."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launch_command(recipe_name: str, processes: int, output_dir: Path, *flags: str, script: Path | None = None,
                   tiny: bool = True) -> list[str]:
    """The ``accelerate launch`` command line for a CPU run of a recipe.

    Args:
        recipe_name: Recipe under ``recipes/`` (e.g. ``"flow_grpo"``); ignored when ``script`` is given.
        processes: Number of processes (>1 adds ``--multi_gpu`` and a free ``--main_process_port``).
        output_dir: Passed as ``--output_dir``.
        *flags: Further recipe flags, appended last.
        script: A script to launch instead of the recipe file (e.g. a probe wrapping the recipe's ``main``).
        tiny: Pass ``--tiny`` (the tiny seeded models); ``False`` when the flags pick a tiny config instead.
    """
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--num_processes", str(processes)]
    if processes > 1:
        command += ["--multi_gpu", "--main_process_port", str(free_port())]
    command.append(str(script if script is not None else recipe_path(recipe_name)))
    return command + (["--tiny"] if tiny else []) + ["--output_dir", str(output_dir), *flags]


def launch_env(extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus one thread per process, CPU accelerate and offline hubs (+ ``extra_env``)."""
    return {**os.environ, **LAUNCH_ENV, **(extra_env or {})}


def launch(recipe_name: str, processes: int, output_dir: Path, *flags: str, script: Path | None = None,
           tiny: bool = True, extra_env: dict[str, str] | None = None,
           timeout: float = LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run a recipe under ``accelerate launch`` on CPU from the repository root and wait for it.

    Arguments are those of :func:`launch_command`, plus ``extra_env`` (added to :func:`launch_env`) and
    ``timeout`` in seconds (``subprocess.TimeoutExpired`` past it). Asserts exit status 0, showing the tail of
    stdout and stderr otherwise; returns the finished process with both streams as text.
    """
    command = launch_command(recipe_name, processes, output_dir, *flags, script=script, tiny=tiny)
    done = subprocess.run(command, cwd=ROOT, env=launch_env(extra_env), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, (f"launch failed ({done.returncode}):\n{done.stdout[-STDOUT_TAIL:]}\n"
                                  f"{done.stderr[-STDERR_TAIL:]}")
    return done


def start_launch(recipe_name: str, processes: int, output_dir: Path, *flags: str, tiny: bool = True,
                 extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start :func:`launch`'s command without waiting (to run launches side by side); stderr goes into stdout.

    The caller waits (``communicate(timeout=...)``) and checks ``returncode`` itself.
    """
    command = launch_command(recipe_name, processes, output_dir, *flags, tiny=tiny)
    return subprocess.Popen(command, cwd=ROOT, env=launch_env(extra_env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def scalar_events(output_dir: Path) -> list[dict[str, list[tuple[int, float]]]]:
    """The TensorBoard scalars under ``output_dir/logs``: one ``{tag: [(step, value), ...]}`` per event file.

    Files are in creation order (oldest last write first, then path; a resumed run appends a new file) and
    files without scalars are left out. Within a tag the events are in the order they were written.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    paths = sorted((output_dir / "logs").rglob("events.out.tfevents.*"), key=lambda p: (p.stat().st_mtime, str(p)))
    runs = []
    for path in paths:
        events = EventAccumulator(str(path))
        events.Reload()
        run = {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
        if run:
            runs.append(run)
    return runs


def values_by_step(run: dict[str, list[tuple[int, float]]]) -> dict[str, dict[int, float]]:
    """One event file's scalars (an item of :func:`scalar_events`) as ``{tag: {step: value}}``."""
    return {tag: dict(points) for tag, points in run.items()}


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    """The folder a recipe writes its step-``step`` checkpoint to."""
    return output_dir / "checkpoints" / f"checkpoint-{step}"


def lora_weights(checkpoint_folder: Path) -> dict[str, torch.Tensor]:
    """The LoRA state dict saved in a checkpoint folder (``denoiser.lora.safetensors``), on CPU."""
    from safetensors.torch import load_file

    return load_file(str(checkpoint_folder / "denoiser.lora.safetensors"))


# ---- checks shared by the PPO-style recipes' launch tests (DDPO, Diffusion-DPO) -------------------------------------
def checkpointed_runs(recipe_name: str, factory: "pytest.TempPathFactory") -> dict[str, Any]:
    """Three 2-step launches checkpointing every step: 2 processes; 1 process; 1 process resumed from the latter's
    step-1 checkpoint into a fresh folder. Returns their folders and the resumed run's log."""
    runs: dict[str, Any] = {name: factory.mktemp(f"{recipe_name}-{name}") for name in ("two", "one", "resumed")}
    steps = ("--max_steps", "2", "--checkpoint_every", "1")
    launch(recipe_name, 2, runs["two"], *steps)
    launch(recipe_name, 1, runs["one"], *steps)
    result = launch(recipe_name, 1, runs["resumed"], *steps, "--resume_from", str(checkpoint_dir(runs["one"], 1)))
    runs["resume_log"] = result.stderr + result.stdout
    return runs


def check_two_process_artefacts(run: Path) -> None:
    """config.yaml, and per step a checkpoint with LoRA, optimizer, reward state, meta and both ranks' RNG."""
    assert (run / "config.yaml").is_file()
    for step in (1, 2):
        folder = checkpoint_dir(run, step)
        names = {p.name for p in folder.iterdir()}
        assert {"denoiser.lora.safetensors", "optimizer.pt", "reward.pt", "meta.json", "rng_state_0.pt",
                "rng_state_1.pt"} <= names
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["step"] == step and meta["num_processes"] == 2


def check_lora_changed(run: Path) -> None:
    """The LoRA B matrices (zero at peft's gaussian init) moved by step 1 and changed again by step 2."""
    first, second = (lora_weights(checkpoint_dir(run, step)) for step in (1, 2))
    lora_b = [key for key in first if "lora_B" in key]
    assert lora_b, "no LoRA B matrices in the checkpoint"
    assert any(bool(first[key].abs().max() > 0) for key in lora_b)
    assert any(not torch.equal(first[key], second[key]) for key in first)


def check_resumed_at_step_2(first: Path, resumed: Path, log: str) -> None:
    """The resumed run says it resumed at step 1, redoes nothing before it and logs step 2 only."""
    assert "at step 1" in log
    assert not checkpoint_dir(resumed, 1).exists()  # nothing redone before the resume point
    (scalars,) = map(values_by_step, scalar_events(resumed))  # exactly one event file
    assert set(scalars["train/loss"]) == {2}
    (original,) = map(values_by_step, scalar_events(first))
    assert set(original["train/loss"]) == {1, 2}
    # everything that step 2 depends on (LoRA, optimizer, RNG, epoch) was restored: the same weights
    before, after = lora_weights(checkpoint_dir(first, 2)), lora_weights(checkpoint_dir(resumed, 2))
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=1e-6, rtol=0)
    assert any(not torch.equal(lora_weights(checkpoint_dir(first, 1))[key], after[key]) for key in after)
