"""Benchmark trainwell's weight averaging against the usual implementations (CPU).

    .venv/bin/python benchmarks/averaging.py

1. ``average_weights`` (foreach, one pass per model) vs the common key-by-key loop that
   rebuilds ``state_dict()`` inside the loop, on five ~25 MB MLPs of three shapes: "wide"
   (4 layers, 8 keys), "mid" (16 layers, 32 keys) and "deep" (64 Linear+BatchNorm
   blocks, 448 keys). The loop's cost grows with keys x models x keys; the foreach
   version is bound by memory bandwidth whatever the shape.
2. ``EMA.update`` vs ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(d))``
   ``.update_parameters``, and the bandwidth each reaches (read average + read live +
   write average = 3 x bytes) next to a plain ``copy_`` of the same bytes (2 x bytes).

Candidate and baseline are interleaved, several repetitions, medians printed.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from trainwell.averaging import EMA, average_weights


def wide_mlp() -> nn.Module:  # 4 x 1250^2 floats ~ 25 MB, 8 keys
    return nn.Sequential(*[nn.Linear(1250, 1250) for _ in range(4)])


def mid_mlp() -> nn.Module:  # 16 x 625^2 floats ~ 25 MB, 32 keys
    return nn.Sequential(*[nn.Linear(625, 625) for _ in range(16)])


def deep_mlp() -> nn.Module:  # 64 x (312^2 + ...) floats ~ 25 MB, 448 keys
    blocks = [m for _ in range(64) for m in (nn.Linear(312, 312), nn.BatchNorm1d(312))]
    return nn.Sequential(*blocks)


def key_by_key(models: list[nn.Module]) -> nn.Module:
    """The ten-line version: state_dict() rebuilt inside the loop for every key."""
    out = copy.deepcopy(models[0])
    for key in out.state_dict():
        stacked = torch.stack([m.state_dict()[key].float() for m in models])
        out.state_dict()[key].copy_(stacked.mean(0))  # (truncates integer buffers, too)
    return out


def nbytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.parameters())


def interleave(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_average(make: Callable[[], nn.Module], label: str, reps: int) -> None:
    torch.manual_seed(0)
    models = [make() for _ in range(5)]
    mb = nbytes(models[0]) / 1e6
    t = interleave(
        {"foreach": lambda: average_weights(models), "loop": lambda: key_by_key(models)}, reps
    )
    print(
        f"average_weights  {label:5s} 5 x {mb:5.1f} MB, {len(models[0].state_dict()):3d} keys: "
        f"{t['foreach'] * 1e3:7.1f} ms vs key-by-key {t['loop'] * 1e3:7.1f} ms "
        f"-> {t['loop'] / t['foreach']:5.1f}x faster"
    )


def bench_ema(make: Callable[[], nn.Module], label: str, reps: int) -> None:
    torch.manual_seed(0)
    model = make()
    ema = EMA(model, decay=0.999)
    ref = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    for _ in range(2):  # past the initial copy
        ema.update(model)
        ref.update_parameters(model)
    nb = nbytes(model)
    flat_src = torch.randn(nb // 4)
    flat_dst = torch.empty_like(flat_src)
    t = interleave(
        {
            "ema": lambda: ema.update(model),
            "torch": lambda: ref.update_parameters(model),
            "copy": lambda: flat_dst.copy_(flat_src),
        },
        reps,
    )
    gbs = {k: (2 if k == "copy" else 3) * nb / v / 1e9 for k, v in t.items()}
    print(
        f"EMA.update       {label:5s} {nb / 1e6:5.1f} MB: {t['ema'] * 1e3:6.2f} ms "
        f"({gbs['ema']:5.1f} GB/s) vs AveragedModel {t['torch'] * 1e3:6.2f} ms "
        f"({gbs['torch']:5.1f} GB/s) -> {t['torch'] / t['ema']:4.2f}x; "
        f"plain copy {t['copy'] * 1e3:5.2f} ms ({gbs['copy']:5.1f} GB/s): "
        f"EMA at {gbs['ema'] / gbs['copy']:4.0%} of copy bandwidth"
    )


def main() -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, CPU; medians of interleaved repetitions")
    with torch.no_grad():
        bench_average(wide_mlp, "wide", reps=5)
        bench_average(mid_mlp, "mid", reps=5)
        bench_average(deep_mlp, "deep", reps=3)
        bench_ema(wide_mlp, "wide", reps=15)
        bench_ema(deep_mlp, "deep", reps=15)


if __name__ == "__main__":
    main()
