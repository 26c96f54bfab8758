"""Throughput of 1 vs 2 processes (DDP, gloo on CPU) on the digits MLP, and the cost of
gradient accumulation with and without ``no_sync`` (one all-reduce per optimizer step
versus one per micro-step).

Plain script: ``.venv/bin/python benchmarks/distributed.py``. Each measurement is the
median of several interleaved repetitions; torch uses one thread per process. On a
2-core machine shared with other jobs, 2 processes compete with everything else: read
the ratios, not the absolute numbers.
"""

from __future__ import annotations

import json
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

REPS = 5
EPOCHS = 2
GLOBAL_BATCH = 64
ACCUMULATE = 4


def _setup():
    from trainwell.app.data import load_splits
    from trainwell.app.models import build_model

    splits = load_splits("digits", seed=0)
    torch.manual_seed(0)
    model = build_model("mlp", splits.n_features, splits.n_classes, hidden=[256, 256])
    return splits, model


def _epochs(model, loader, opt, accumulate: int = 1, no_sync: bool = True) -> float:
    """Seconds for EPOCHS epochs of a hand-written (accumulating) DDP loop."""
    from trainwell.distributed import maybe_no_sync
    from trainwell.gradients.accumulation import Accumulator

    acc = Accumulator(model, steps=accumulate)
    started = time.perf_counter()
    for epoch in range(EPOCHS):
        loader.sampler.set_epoch(epoch)
        n = len(loader)
        for i, (x, y) in enumerate(loader):
            ends = i + 1 == n or acc.micro_step + 1 >= acc.steps
            with maybe_no_sync(model, skip_sync=no_sync and not ends):
                loss = F.cross_entropy(model(x), y)
            if acc.backward(loss, weight=len(y), last=i + 1 == n):
                opt.step()
                opt.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=timedelta(seconds=60),
        )  # fmt: skip
    splits, model = _setup()
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    plain = splits.loader(
        "train", GLOBAL_BATCH // world, shuffle=True, seed=0, rank=rank, world_size=world
    )
    micro = splits.loader(
        "train",
        GLOBAL_BATCH // world // ACCUMULATE,
        shuffle=True,
        seed=0,
        rank=rank,
        world_size=world,
    )
    _epochs(net, plain, opt)  # warm-up
    times: dict[str, list[float]] = {"plain": [], "acc_no_sync": [], "acc_sync_every": []}
    for _ in range(REPS):  # interleaved
        times["plain"].append(_epochs(net, plain, opt))
        if world > 1:
            times["acc_no_sync"].append(_epochs(net, micro, opt, ACCUMULATE, no_sync=True))
            times["acc_sync_every"].append(_epochs(net, micro, opt, ACCUMULATE, no_sync=False))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        samples = EPOCHS * len(splits.y_train)
        result = {k: statistics.median(v) for k, v in times.items() if v}
        result["samples"] = samples
        Path(out).write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(world: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.spawn(worker, args=(world, _free_port(), out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def main() -> None:
    torch.set_num_threads(1)
    one, two = measure(1), measure(2)
    n = one["samples"]
    print(f"digits MLP [256, 256], global batch {GLOBAL_BATCH}, {EPOCHS} epochs, median of {REPS}")
    print(f"  1 process : {n / one['plain']:9.0f} samples/s  ({one['plain']:.3f} s)")
    print(f"  2 processes: {n / two['plain']:9.0f} samples/s  ({two['plain']:.3f} s)  "
          f"speed-up x{one['plain'] / two['plain']:.2f}")  # fmt: skip
    a, b = two["acc_no_sync"], two["acc_sync_every"]
    print(f"accumulation k={ACCUMULATE} on 2 processes (micro-batch {GLOBAL_BATCH // 2 // 4}):")
    print(f"  no_sync on non-final micro-steps (1 all-reduce/step): {a:.3f} s")
    print(f"  all-reduce on every micro-step (no no_sync)         : {b:.3f} s  x{b / a:.2f}")


if __name__ == "__main__":
    sys.exit(main())
