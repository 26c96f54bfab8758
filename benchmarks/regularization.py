"""Time Regularizer.apply_ against autograd penalties on a ~6M-parameter MLP.

Candidates, each starting from the same (already computed) gradients and including the
cost of getting the penalty into ``.grad``:

* ``apply_``   -- ``Regularizer.apply_(model)``: foreach ops, no autograd graph.
* ``penalty``  -- ``Regularizer.penalty(model).backward()``.
* ``loop``     -- the usual per-parameter loop over the included weights,
  ``sum(l1 * p.abs().sum() + l2 * (p ** 2).sum() for p in params).backward()``.

Run: ``.venv/bin/python benchmarks/regularization.py`` (about 30 s on 2 CPU cores).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from trainwell.regularization.penalties import Regularizer

L1, L2 = 1e-5, 1e-4
REPEATS = 30


def build() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 2048),
        nn.LayerNorm(2048),
        nn.ReLU(),
        nn.Linear(2048, 1536),
        nn.LayerNorm(1536),
        nn.ReLU(),
        nn.Linear(1536, 1024),
        nn.ReLU(),
        nn.Linear(1024, 10),
    )
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    return model


def main() -> None:
    torch.set_num_threads(1)
    model = build()
    reg = Regularizer(l1=L1, l2=L2)
    included = [
        p
        for row, p in zip(reg.report(model), model.parameters(), strict=True)
        if row["reason"] is None
    ]
    n_params = sum(p.numel() for p in model.parameters())
    n_incl = sum(p.numel() for p in included)

    def run_apply() -> None:
        reg.apply_(model)

    def run_penalty() -> None:
        reg.penalty(model).backward()

    def run_loop() -> None:
        sum(L1 * p.abs().sum() + L2 * (p**2).sum() for p in included).backward()

    candidates = {"apply_": run_apply, "penalty+backward": run_penalty, "loop+backward": run_loop}
    # Correctness check: all three add the same gradient.
    grads = {}
    for name, fn in candidates.items():
        for p in model.parameters():
            p.grad.zero_()
        fn()
        grads[name] = [p.grad.clone() for p in included]
    for name in candidates:
        for a, b in zip(grads[name], grads["loop+backward"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)

    times: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():  # warm-up
        fn()
    for _ in range(REPEATS):  # interleaved
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    print(
        f"MLP 784-2048-1536-1024-10 with LayerNorm: {n_params / 1e6:.2f}M parameters, "
        f"{n_incl / 1e6:.2f}M regularized; l1={L1}, l2={L2}; torch {torch.__version__}, "
        f"1 thread, {REPEATS} interleaved repeats"
    )
    loop = statistics.median(times["loop+backward"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:18s} median {med * 1e3:8.2f} ms   loop/this = {loop / med:5.2f}x")


if __name__ == "__main__":
    main()
