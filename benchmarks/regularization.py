"""Benchmark ``Regularizer.apply_``: L1 bandwidth, and against autograd penalties (CPU).

Run: ``.venv/bin/python benchmarks/regularization.py`` (about 30 s on a quiet core);
``--params 100M`` runs part 1 on 100M parameters (about 1.2 GB of memory, a minute more).
One torch thread throughout.

Part 1, the L1 row: ``Regularizer(l1=...).apply_(model)`` on four ``Linear(d, d)`` layers
(d chosen for 10M regularized weights; biases are excluded), ``.grad`` already present.

* Bandwidth, as defined here: the bytes the update must touch -- read ``w``, read ``g``,
  write ``g``, i.e. 3 x the parameter bytes -- divided by its time, as a fraction of the
  bandwidth of a plain copy of the same tensors (``dst.copy_(w)``: read ``w``, write
  ``dst``, 2 x the parameter bytes, divided by its time). So
  ``fraction = (3 B / t_apply) / (2 B / t_copy) = 1.5 * t_copy / t_apply``; 1.0 means
  the update streams its bytes as fast as a copy streams its own.
* The peer runs in the same process, paired: a round alternates ``apply_`` and the copy
  call by call (ABAB..., the other one first every other call) and sums each side; the
  fraction comes from the round's sums. Printed: median [min-max] over 15 rounds.
* For reference, the same for the previous formulation,
  ``torch._foreach_add_(grads, torch._foreach_sign(weights), alpha=l1)`` (a fresh
  parameter-sized temporary each call), and ``apply_``'s speed-up over it. What those
  temporaries cost depends on the allocator: glibc maps every block above 32 MiB afresh
  (page faults and zeroing each call: 100M here, 25M-element tensors), smaller ones
  whenever it has trimmed the heap, which depends on what else the process allocates.

Part 2: ``apply_`` against autograd penalties on a ~6M-parameter MLP, each starting from
the same (already computed) gradients and including the cost of getting the penalty
into ``.grad``:

* ``apply_``   -- ``Regularizer.apply_(model)``: foreach ops, no autograd graph.
* ``penalty``  -- ``Regularizer.penalty(model).backward()``.
* ``loop``     -- the usual per-parameter loop over the included weights,
  ``sum(l1 * p.abs().sum() + l2 * (p ** 2).sum() for p in params).backward()``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from trainwell.regularization.penalties import Regularizer

L1, L2 = 1e-5, 1e-4
REPEATS = 30
ROUNDS = 15


def paired_times(
    a: Callable[[], object], b: Callable[[], object], calls: int, rounds: int
) -> list[tuple[float, float]]:
    """Per round: (summed time of a, summed time of b), alternating call by call."""
    for _ in range(2):  # warm-up
        a()
        b()
    clock = time.perf_counter
    out = []
    for _ in range(rounds):
        ta = tb = 0.0
        for k in range(calls):
            first, second = (a, b) if k % 2 == 0 else (b, a)
            t0 = clock()
            first()
            t1 = clock()
            second()
            t2 = clock()
            ta += (t1 - t0) if k % 2 == 0 else (t2 - t1)
            tb += (t2 - t1) if k % 2 == 0 else (t1 - t0)
        out.append((ta, tb))
    return out


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def l1_bandwidth(n_params: int) -> None:
    d = round((n_params / 4) ** 0.5)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(d, d) for _ in range(4)])
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    reg = Regularizer(l1=L1)
    weights = [m.weight for m in model]
    grads = [w.grad for w in weights]
    n = sum(w.numel() for w in weights)
    mib = n * 4 / 2**20
    dst = [torch.empty_like(w) for w in weights]

    def run_apply() -> None:
        reg.apply_(model)

    def run_copy() -> None:
        for out, w in zip(dst, weights, strict=True):
            out.copy_(w)

    def run_previous() -> None:
        with torch.no_grad():
            torch._foreach_add_(grads, torch._foreach_sign(weights), alpha=L1)

    def check(fn: Callable[[], None]) -> torch.Tensor:
        before = [g.clone() for g in grads]
        fn()
        after = [g.clone() for g in grads]
        for g, b in zip(grads, before, strict=True):
            g.copy_(b)
        return torch.cat([a.flatten() for a in after])

    assert torch.equal(check(run_apply), check(run_previous)), "apply_ must match bit for bit"
    print(
        f"Part 1: L1 apply_ on 4 x Linear({d}, {d}): {n / 1e6:.1f}M regularized weights "
        f"({mib:.0f} MiB float32), l1={L1}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)"
    )
    print("  bandwidth = 3 x param bytes / t (read w, read g, write g), as a fraction of")
    print("  copy_ bandwidth = 2 x param bytes / t (read w, write dst); target >= 0.6")
    calls = max(2, round(10 * 1e7 / n))
    pairs = paired_times(run_apply, run_copy, calls, ROUNDS)
    frac = [1.5 * tc / ta for ta, tc in pairs]
    t_apply = statistics.median(ta for ta, _ in pairs) / calls
    print(f"  apply_ (L1)   {t_apply * 1e3:7.2f} ms  fraction of copy bandwidth {summary(frac)}")
    prev_pairs = paired_times(run_previous, run_copy, max(1, calls // 4), ROUNDS)
    prev_frac = [1.5 * tc / ta for ta, tc in prev_pairs]
    t_prev = statistics.median(ta for ta, _ in prev_pairs) / max(1, calls // 4)
    print(
        f"  previous      {t_prev * 1e3:7.2f} ms  fraction of copy bandwidth "
        f"{summary(prev_frac)}  (foreach_sign temporaries)"
    )
    speed = paired_times(run_previous, run_apply, max(1, calls // 4), ROUNDS)
    print(f"  apply_ speed-up over previous: {summary([tp / ta for tp, ta in speed])}x")


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


def against_autograd() -> None:
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
        f"Part 2: MLP 784-2048-1536-1024-10 with LayerNorm: {n_params / 1e6:.2f}M parameters, "
        f"{n_incl / 1e6:.2f}M regularized; l1={L1}, l2={L2}; {REPEATS} interleaved repeats"
    )
    loop = statistics.median(times["loop+backward"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:18s} median {med * 1e3:8.2f} ms   loop/this = {loop / med:5.2f}x")


def parse_count(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1e3, "M": 1e6, "G": 1e9}.get(text[-1:], 1.0)
    return int(float(text[:-1] if scale != 1.0 else text) * scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=parse_count, default=10_000_000, help="e.g. 100M")
    args = parser.parse_args()
    torch.set_num_threads(1)
    l1_bandwidth(args.params)
    against_autograd()


if __name__ == "__main__":
    main()
