"""Multi-process runs on PyTorch's own launcher: ``torchrun`` and ``torch.distributed``.

trainwell has no distributed engine of its own. ``trainwell run CONFIG --nproc N``
re-executes itself through ``torch.distributed.run`` (the module behind ``torchrun``):

    python -m torch.distributed.run --standalone --nproc-per-node N -m trainwell run CONFIG

Each process then finds ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` in its environment, and ``init_from_env`` joins the process group
(gloo for CPU runs, nccl for CUDA runs) before training.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist


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


def init_from_env(device: str = "cpu", timeout_s: float = 300.0) -> str:
    """Join the process group described by torchrun's environment variables.

    Does nothing (and returns ``device`` unchanged) when the group is already
    initialized or ``WORLD_SIZE`` is 1. Under CUDA each process takes the GPU
    ``LOCAL_RANK``; the returned string is the device this process should use.
    The group is destroyed at interpreter exit.

    Example:
        >>> init_from_env("cpu")
        'cpu'
    """
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


def launch(nproc: int, args: Sequence[str]) -> int:
    """Run ``trainwell ARGS`` in ``nproc`` local processes under torchrun; its exit code."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(torchrun_command(nproc, args), env=env, check=False).returncode
