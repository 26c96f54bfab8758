"""Benchmark ``Ensemble.predict`` against a plain Python loop over the members (CPU).

    .venv/bin/python benchmarks/ensemble.py            # about 30 s on a quiet core

Members: small MLPs 64-128-128-10 (``nn.Sequential`` of Linear/ReLU: the batched-matmul
pass) and trainwell's built-in ``MLP`` 64-128-128-10 with its dropout modules, all in eval
mode; one torch thread.

Part 1, the overhead rows: each method against its peer, the loop a user writes by hand::

    with torch.no_grad():
        torch.stack([m(x) for m in members]).softmax(2).mean(0)   # == predict, "mean_prob"

A round alternates the two (ABAB..., starting with the other one every other call) many
times and sums each side; the ratio of the sums is that round's ratio (method / peer, so
< 1 is faster than the peer). Printed: median [min-max] over the rounds. "auto" is timed
after its one-time choice (its first call). Before timing, the outputs are checked: the
loop is ``torch.equal`` to the plain loop.

Part 2, the table: loop, vmap and auto interleaved (cycling through all orders), median
times; ratio = loop time / method time (> 1: faster than the loop).
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
ROUNDS = 15


def paired_ratios(
    method: Callable[[], object], peer: Callable[[], object], budget_s: float, rounds: int
) -> list[float]:
    """Per-round ratio method time / peer time, the two alternating call by call."""
    for _ in range(3):  # warm-up
        method()
        peer()
    start = time.perf_counter()
    method()
    peer()
    pair = time.perf_counter() - start
    calls = int(min(400, max(4, budget_s / rounds / max(pair, 1e-9))))
    clock = time.perf_counter
    ratios = []
    for _ in range(rounds):
        t_method = t_peer = 0.0
        for k in range(calls):
            first, second = (method, peer) if k % 2 == 0 else (peer, method)
            t0 = clock()
            first()
            t1 = clock()
            second()
            t2 = clock()
            a, b = (t1 - t0, t2 - t1) if k % 2 == 0 else (t2 - t1, t1 - t0)
            t_method += a
            t_peer += b
        ratios.append(t_method / t_peer)
    return ratios


def overhead_rows() -> None:
    print("Part 1: Ensemble.predict / plain loop (paired, interleaved; < 1 = faster)")
    rows = [  # (label, members kind, count, batch, method, target)
        ("loop", "seq-mlp", 8, 32, "loop", 1.05),
        ("loop", "seq-mlp", 16, 32, "loop", 1.05),
        ("loop", "tw-MLP", 8, 32, "loop", 1.05),
        ("auto", "seq-mlp", 8, 1024, "auto", 1.0),
        ("auto", "seq-mlp", 16, 1024, "auto", 1.0),
        ("auto", "tw-MLP", 8, 1024, "auto", 1.0),
    ]
    for label, kind, m, batch, method, target in rows:
        torch.manual_seed(0)
        members = [BUILDERS[kind]().eval() for _ in range(m)]
        x = torch.randn(batch, 64)
        ens = Ensemble(members, method=method)

        def plain(members=members, x=x) -> torch.Tensor:
            with torch.no_grad():
                return torch.stack([member(x) for member in members]).softmax(2).mean(0)

        def run(ens=ens, x=x) -> torch.Tensor:
            return ens.predict(x)

        got = run()  # "auto" measures here, once
        if method == "loop":
            assert torch.equal(got, plain()), "loop must equal the plain loop bit for bit"
        else:
            torch.testing.assert_close(got, plain(), atol=1e-5, rtol=1e-5)
        r = paired_ratios(run, plain, budget_s=2.0, rounds=ROUNDS)
        chose = f" (chose {ens.last_method})" if method == "auto" else ""
        print(
            f"  method={label!r:7} {kind:8}{m:>3} members batch {batch:>5}: "
            f"{statistics.median(r):.3f}x [{min(r):.3f}-{max(r):.3f}] of the plain loop, "
            f"target <= {target:.2f}{chose}"
        )


def floor_rows() -> None:
    """What a ratio at batch 1024 can resolve, and the Python work the ensemble adds."""
    torch.manual_seed(0)
    members = [BUILDERS["seq-mlp"]().eval() for _ in range(8)]
    x = torch.randn(1024, 64)

    def plain(members=members, x=x) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([member(x) for member in members]).softmax(2).mean(0)

    def same(members=members, x=x) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([member(x) for member in members]).softmax(2).mean(0)

    r = paired_ratios(same, plain, budget_s=2.0, rounds=ROUNDS)
    print(
        f"  noise: the plain loop against itself, seq-mlp 8 members batch 1024: "
        f"{statistics.median(r):.3f}x [{min(r):.3f}-{max(r):.3f}]"
    )
    full = paired_times_us(plain, plain, 10)[1]  # one plain call, microseconds
    trivial = [  # the same module structure, no arithmetic: what is left is Python work
        nn.Sequential(nn.Identity(), nn.ReLU(), nn.Identity(), nn.ReLU(), nn.Identity()).eval()
        for _ in range(8)
    ]
    xs = torch.randn(32, 10)
    ens = {name: Ensemble(trivial, method=name) for name in ("loop", "auto")}
    ens["auto"].predict(xs)
    ens["auto"]._choice = dict.fromkeys(ens["auto"]._choice, "loop")  # as at batch 1024

    def bare(xs=xs) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([member(xs) for member in trivial]).softmax(2).mean(0)

    for name, e in ens.items():
        t_ens, t_bare = paired_times_us(lambda e=e: e.predict(xs), bare, 1000)
        extra = t_ens - t_bare
        print(
            f"  Python work method={name!r} adds per call over the plain loop (8 members of "
            f"5 identity/ReLU modules): {extra:.1f} us = {100 * extra / full:.2f}% of "
            f"the {full / 1e3:.1f} ms seq-mlp batch-1024 call ({e.last_method})"
        )


def paired_times_us(a: Callable[[], object], b: Callable[[], object], calls: int) -> list:
    """Median over 9 rounds of the mean time per call of a and of b (us), alternating."""
    for _ in range(3):
        a()
        b()
    rounds: list[tuple[float, float]] = []
    clock = time.perf_counter
    for _ in range(9):
        ta = tb = 0.0
        for _ in range(calls):
            t0 = clock()
            a()
            t1 = clock()
            b()
            ta += t1 - t0
            tb += clock() - t1
        rounds.append((ta / calls * 1e6, tb / calls * 1e6))
    return [statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds)]


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


def table() -> None:
    print("Part 2: methods against the loop method (median times)")
    header = f"{'members':<10}{'M':>4}{'batch':>7}{'loop ms':>10}{'vmap ms':>10}{'auto ms':>10}"
    print(header + f"{'vmap x':>9}{'auto x':>9}  auto chose")
    for kind, build in BUILDERS.items():
        for m in (8, 16):
            torch.manual_seed(0)
            members = [build().eval() for _ in range(m)]
            for batch in (32, 1024):
                x = torch.randn(batch, 64)
                ensembles = {
                    name: Ensemble(members, method=name) for name in ("loop", "vmap", "auto")
                }
                fns = {name: (lambda e=e, x=x: e.predict(x)) for name, e in ensembles.items()}
                t = median_times(fns, budget_s=1.0)
                torch.testing.assert_close(fns["vmap"](), fns["loop"](), atol=1e-5, rtol=1e-5)
                print(
                    f"{kind:<10}{m:>4}{batch:>7}{t['loop'] * 1e3:>10.3f}{t['vmap'] * 1e3:>10.3f}"
                    f"{t['auto'] * 1e3:>10.3f}{t['loop'] / t['vmap']:>9.2f}"
                    f"{t['loop'] / t['auto']:>9.2f}  {ensembles['auto'].last_method}"
                )


def main() -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, CPU")
    overhead_rows()
    floor_rows()
    table()


if __name__ == "__main__":
    main()
