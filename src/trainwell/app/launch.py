"""Multi-process runs on PyTorch's own launcher: ``torchrun`` and ``torch.distributed``.

trainwell has no distributed engine of its own. ``trainwell run CONFIG --nproc N``
re-executes itself through ``torch.distributed.run`` (the module behind ``torchrun``):

    python -m torch.distributed.run --standalone --nproc-per-node N -m trainwell run CONFIG

Each process then finds ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` in its environment, and ``init_from_env`` joins the process group
(gloo for CPU runs, nccl for CUDA runs) before training.

No orphans (``trainwell.app.lifetime``): the agent runs in its own process group under
a wrapper that dies with the launcher (``python -m trainwell.app.lifetime
torch.distributed.run ...``), the launcher forwards SIGTERM, SIGINT and SIGHUP to that
group and exits like a shell (``128 + signal``), and every rank dies with the agent
(``init_from_env``). A collective that waits longer than the timeout
(``TRAINWELL_COLLECTIVE_TIMEOUT_S`` overrides the caller's value) fails the run
instead of blocking behind a stopped or hung rank.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from trainwell.app.lifetime import (
    AGENT_PID_ENV,
    die_with_parent,
    exit_status,
    forward_signals,
    module_command,
)

TIMEOUT_ENV = "TRAINWELL_COLLECTIVE_TIMEOUT_S"


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when not launched by torchrun).

    Example:
        >>> env_world_size() >= 1
        True
    """
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError as err:
        raise ValueError(
            f"WORLD_SIZE must be an integer number of processes, got {os.environ['WORLD_SIZE']!r}"
        ) from err


def backend_for(device: str) -> str:
    """``"nccl"`` for CUDA devices, ``"gloo"`` otherwise.

    Example:
        >>> backend_for("cpu"), backend_for("cuda")
        ('gloo', 'nccl')
    """
    return "nccl" if str(device).startswith("cuda") else "gloo"


def _positive_seconds(value: object, name: str) -> float:
    """``value`` as a positive finite number of seconds, or a ValueError naming ``name``."""
    try:
        seconds = math.nan if isinstance(value, bool) else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return seconds


def collective_timeout_s(timeout_s: float = 300.0) -> float:
    """Seconds a collective may wait: ``TRAINWELL_COLLECTIVE_TIMEOUT_S`` if set, else ``timeout_s``.

    Example:
        >>> collective_timeout_s(120.0)
        120.0
    """
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    return _positive_seconds(raw, TIMEOUT_ENV) if raw else _positive_seconds(timeout_s, "timeout_s")


def _die_with_agent() -> None:
    """Under torchrun, die with the agent (this rank's parent) when it dies."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and AGENT_PID_ENV not in os.environ:
        return  # launched some other way: the parent is not ours to judge
    agent = os.environ.pop(AGENT_PID_ENV, "")
    die_with_parent(parent_pid=int(agent) if agent.isdigit() else None)


def init_from_env(device: str = "cpu", timeout_s: float = 300.0) -> str:
    """Join the process group described by torchrun's environment variables.

    Does nothing (and returns ``device`` unchanged) when the group is already
    initialized or ``WORLD_SIZE`` is 1. Under CUDA each process takes the GPU
    ``LOCAL_RANK``; the returned string is the device this process should use.
    The group is destroyed at interpreter exit.

    With ``WORLD_SIZE > 1`` under torchrun the rank first arranges to die with the
    agent (``die_with_parent``), so a killed agent leaves no rank training. A
    collective (and the initial rendezvous) waits at most ``timeout_s`` seconds, or
    ``TRAINWELL_COLLECTIVE_TIMEOUT_S`` when that is set, then fails the run.

    Example:
        >>> init_from_env("cpu")
        'cpu'
    """
    if env_world_size() > 1:
        timeout_s = collective_timeout_s(timeout_s)
        _die_with_agent()
    if str(device).startswith("cuda") and env_world_size() > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if dist.is_initialized() or env_world_size() == 1:
        return device
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    dist.init_process_group(
        backend_for(device), init_method="env://", timeout=timedelta(seconds=timeout_s)
    )
    atexit.register(shutdown)
    return device


def shutdown() -> None:
    """Destroy the process group if one is initialized (safe to call twice)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def torchrun_command(nproc: int, args: Sequence[str]) -> list[str]:
    """The command that runs ``python -m trainwell ARGS`` in ``nproc`` processes.

    Example:
        >>> torchrun_command(2, ["run", "c.toml"])[3:]
        ['--standalone', '--nproc-per-node', '2', '-m', 'trainwell', 'run', 'c.toml']
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer (processes), got {nproc!r}")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "trainwell",
        *args,
    ]


def launch(nproc: int, args: Sequence[str], timeout_s: float | None = None) -> int:
    """Run ``trainwell ARGS`` in ``nproc`` local processes under torchrun; its exit status.

    The torchrun agent starts in its own process group, in a wrapper that dies with
    this process (even on SIGKILL); SIGTERM, SIGINT and SIGHUP received here go to the
    group (a second one kills it), and a signal gives the shell's ``128 + signal``.
    ``timeout_s`` (seconds a collective may wait; None: the ranks' own setting)
    reaches the ranks as ``TRAINWELL_COLLECTIVE_TIMEOUT_S``, which overrides it.
    """
    command = module_command("torch.distributed.run", torchrun_command(nproc, args)[3:])
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if timeout_s is not None:
        env[TIMEOUT_ENV] = repr(_positive_seconds(timeout_s, "timeout_s"))
    proc = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        with forward_signals(proc) as received:
            returncode = proc.wait()
    finally:
        if proc.returncode is None:  # an exception here: take the agent down with us
            with contextlib.suppress(ProcessLookupError):
                if hasattr(os, "killpg"):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.kill()
            proc.wait()
    return exit_status(returncode, received)
