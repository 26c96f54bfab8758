"""Benchmark trainwell's gradient layer on a digits-sized MLP (64-256-256-10, batch 64).

Prints median times (microseconds) over interleaved repetitions, and ratios:

* ``clip_by_norm`` (transform and pure function) vs ``torch.nn.utils.clip_grad_norm_``
  (target: at most 1.1x its time);
* ``adaptive_clip`` vs a per-parameter AGC loop (the timm/NFNets recipe), with and
  without the same stats (global norm, clipped flag) (target: at least 2x faster);
* ``GradMonitor`` overhead relative to a plain training step, at ``every=1`` and at
  its default ``every`` (target: under 5% at the default).

Random data of the digits shape (64 features, 10 classes); CPU, one thread.
Run: ``.venv/bin/python benchmarks/gradients.py``
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from trainwell.gradients.adaptive import adaptive_clip
from trainwell.gradients.monitor import GradMonitor
from trainwell.gradients.transforms import clip_by_norm, clip_grad_norm_

REPS = 15


def mlp() -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )  # fmt: skip


def timed_calls(fn: Callable[[], object], reset: Callable[[], None], n: int) -> float:
    """Mean microseconds of ``fn`` over ``n`` calls, each after an untimed ``reset``."""
    total = 0.0
    for _ in range(n):
        reset()
        t0 = time.perf_counter()
        fn()
        total += time.perf_counter() - t0
    return total / n * 1e6


def compare(cands: dict[str, Callable[[], object]], reset: Callable[[], None], n: int) -> dict:
    """Interleave candidates over REPS repetitions; return the median of each."""
    times: dict[str, list[float]] = {k: [] for k in cands}
    for fn in cands.values():  # warm-up
        timed_calls(fn, reset, 20)
    for _ in range(REPS):
        for k, fn in cands.items():
            times[k].append(timed_calls(fn, reset, n))
    return {k: statistics.median(v) for k, v in times.items()}


def agc_loop(params: list[torch.nn.Parameter], clipping: float = 0.01, eps: float = 1e-3) -> None:
    """Per-parameter adaptive gradient clipping, as in timm's adaptive_clip_grad."""
    for p in params:
        g = p.grad
        dims = tuple(range(1, p.ndim)) if p.ndim > 1 else None
        w_norm = torch.linalg.vector_norm(p.detach(), dim=dims, keepdim=True)
        max_norm = w_norm.clamp_(min=eps).mul_(clipping)
        g_norm = torch.linalg.vector_norm(g, dim=dims, keepdim=True)
        clipped = g * (max_norm / g_norm.clamp(min=1e-6))
        g.copy_(torch.where(g_norm < max_norm, g, clipped))


def agc_loop_with_stats(params: list[torch.nn.Parameter], clipping: float = 0.01) -> dict:
    """The same loop, also returning what adaptive_clip returns (global norm, clipped flag)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    flags = []
    for p in params:
        g = p.grad
        dims = tuple(range(1, p.ndim)) if p.ndim > 1 else None
        w_norm = torch.linalg.vector_norm(p.detach(), dim=dims, keepdim=True)
        max_norm = w_norm.clamp_(min=1e-3).mul_(clipping)
        g_norm = torch.linalg.vector_norm(g, dim=dims, keepdim=True)
        flags.append((g_norm > max_norm).any())
        g.copy_(torch.where(g_norm < max_norm, g, g * (max_norm / g_norm.clamp(min=1e-6))))
    return {"grad_norm": norm, "clipped": torch.stack(flags).any()}


def bench_clipping() -> None:
    torch.manual_seed(0)
    net = mlp()
    params = list(net.parameters())
    saved = [torch.randn_like(p) * 0.05 for p in params]
    for p, g in zip(params, saved, strict=True):
        p.grad = g.clone()
    grads = [p.grad for p in params]

    def reset() -> None:
        torch._foreach_copy_(grads, saved)

    t = clip_by_norm(1.0)
    r = compare(
        {
            "torch.nn.utils.clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0),
            "clip_by_norm(1.0).apply_": lambda: t.apply_(params),
            "clip_grad_norm_ (trainwell)": lambda: clip_grad_norm_(params, 1.0),
        },
        reset,
        n=200,
    )
    base = r["torch.nn.utils.clip_grad_norm_"]
    print("clip by global norm (lower is better; target <= 1.1x torch):")
    for k, v in r.items():
        print(f"  {k:34s} {v:8.1f} us   {v / base:5.2f}x torch")

    a = adaptive_clip(0.01)
    r = compare(
        {
            "per-parameter loop": lambda: agc_loop(params),
            "per-parameter loop + same stats": lambda: agc_loop_with_stats(params),
            "adaptive_clip(0.01).apply_": lambda: a.apply_(params),
        },
        reset,
        n=100,
    )
    ours = r["adaptive_clip(0.01).apply_"]
    print("adaptive gradient clipping (target: >= 2x faster than the loop):")
    for k, v in r.items():
        print(f"  {k:34s} {v:8.1f} us   loop/ours = {v / ours:5.2f}x")


def bench_monitor() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    net = mlp()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    default_every = GradMonitor(net).every
    setups = {  # the same model and optimizer: only the monitor differs
        "plain step": (net, opt, None, [0]),
        "every=1": (net, opt, GradMonitor(net, every=1), [0]),
        f"every={default_every} (default)": (net, opt, GradMonitor(net), [0]),
    }

    def make_step(net, opt, monitor, counter) -> Callable[[], None]:
        def step() -> None:
            i = counter[0]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            if monitor is not None:
                monitor.before_step(i)
            opt.step()
            if monitor is not None:
                monitor.after_step(i)
            counter[0] += 1

        return step

    cands = {k: make_step(*v) for k, v in setups.items()}
    r = compare(cands, reset=lambda: None, n=200)
    base = r["plain step"]
    print("GradMonitor overhead on a training step (target: < 5% at the default every):")
    for k, v in r.items():
        print(f"  {k:34s} {v:8.1f} us   {100 * (v / base - 1):+6.1f}%")


def main() -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, CPU, 1 thread, medians of {REPS} interleaved repetitions")
    bench_clipping()
    bench_monitor()


if __name__ == "__main__":
    main()
