"""Small helpers over ``torch.distributed`` that every technique can call safely.

Each function works in a single process too: when ``torch.distributed`` is not
available or not initialized, it behaves as a world of one (rank 0, nothing to
reduce). trainwell has no distributed engine of its own; these are the few
collective patterns the techniques need so that every rank takes the same
decision (stop, skip, clip) and sees the same numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when ``torch.distributed`` is initialized with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0: the process that logs, shows progress and writes files."""
    return rank() == 0


def _device_for_collectives() -> torch.device:
    """gloo reduces CPU tensors; nccl needs the current CUDA device."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Average a dict of numbers over all ranks (keys must match on every rank).

    Example:
        >>> all_reduce_mean({"val_loss": 0.5})
        {'val_loss': 0.5}
    """
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor(
        [float(values[k]) for k in keys], dtype=torch.float64, device=_device_for_collectives()
    )
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one rank.

    Example:
        >>> any_rank(False)
        False
    """
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_device_for_collectives())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_ranks(flag: bool) -> bool:
    """True on every rank only when ``flag`` is True on every rank."""
    return not any_rank(not flag)


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a small picklable Python object from ``src`` to every rank (in-memory only)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_distributed():
        dist.barrier()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``DistributedDataParallel`` (or ``torch.compile``) wrapper."""
    inner = getattr(model, "module", None)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and inner is not None:
        return unwrap(inner)
    orig = getattr(model, "_orig_mod", None)
    return unwrap(orig) if isinstance(orig, torch.nn.Module) else model


@contextlib.contextmanager
def maybe_no_sync(model: torch.nn.Module, skip_sync: bool) -> Iterator[None]:
    """``model.no_sync()`` when ``skip_sync`` and the model is DDP-wrapped, else nothing.

    Under DDP, every micro-step of an accumulation window but the last should skip
    the gradient all-reduce: one all-reduce per optimizer step, not per micro-step.
    """
    if skip_sync and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield
