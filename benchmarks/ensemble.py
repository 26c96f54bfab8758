"""Benchmark ``Ensemble.predict`` with method "vmap" and "auto" against "loop" (CPU).

    .venv/bin/python benchmarks/ensemble.py

Members: small MLPs 64-128-128-10 (``nn.Sequential`` of Linear/ReLU: the batched-matmul
pass) and trainwell's built-in ``MLP`` 64-128-128-10 with its dropout modules (which go
through ``vmap`` + ``functional_call``), 8 and 16 members, batch sizes 32 and 1024. One
torch thread. "auto" is measured after its one-time choice (its first call). The three
methods are interleaved (cycling through all orders), several repetitions, medians printed;
ratio = loop time / method time (> 1: faster than the loop).
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from trainwell.app.models import MLP
from trainwell.ensembles.ensemble import Ensemble

BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "seq-mlp": lambda: nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    ),
    "tw-MLP": lambda: MLP(64, 10, hidden=(128, 128)),
}


def median_times(fns: dict[str, Callable[[], object]], budget_s: float) -> dict[str, float]:
    for fn in fns.values():  # warm-up (and "auto"'s one-time measurement)
        fn()
        fn()
    start = time.perf_counter()
    for fn in fns.values():
        fn()
    per_round = time.perf_counter() - start
    reps = int(min(200, max(5, budget_s / max(per_round, 1e-9))))
    times: dict[str, list[float]] = {k: [] for k in fns}
    orders = list(itertools.permutations(fns))  # each method follows each other equally often
    for rep in range(reps):
        for name in orders[rep % len(orders)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, 1 thread, CPU")
    header = f"{'members':<10}{'M':>4}{'batch':>7}{'loop ms':>10}{'vmap ms':>10}{'auto ms':>10}"
    print(header + f"{'vmap x':>9}{'auto x':>9}  auto chose")
    for kind, build in BUILDERS.items():
        for m in (8, 16):
            members = [build().eval() for _ in range(m)]
            for batch in (32, 1024):
                x = torch.randn(batch, 64)
                ensembles = {
                    name: Ensemble(members, method=name) for name in ("loop", "vmap", "auto")
                }
                fns = {name: (lambda e=e, x=x: e.predict(x)) for name, e in ensembles.items()}
                t = median_times(fns, budget_s=1.5)
                torch.testing.assert_close(fns["vmap"](), fns["loop"](), atol=1e-5, rtol=1e-5)
                print(
                    f"{kind:<10}{m:>4}{batch:>7}{t['loop'] * 1e3:>10.3f}{t['vmap'] * 1e3:>10.3f}"
                    f"{t['auto'] * 1e3:>10.3f}{t['loop'] / t['vmap']:>9.2f}"
                    f"{t['loop'] / t['auto']:>9.2f}  {ensembles['auto'].last_method}"
                )


if __name__ == "__main__":
    main()
