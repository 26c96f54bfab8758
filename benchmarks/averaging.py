"""Benchmark trainwell's weight averaging against its peers in the same run (CPU, 1 thread).

    .venv/bin/python benchmarks/averaging.py

Every line is a ratio against a peer measured in the same process, in paired rounds: a
round calls the candidate and its peers one after the other, many times, in an order
that rotates; each gets the median of its calls in the round, the ratio is taken within
the round, and the line prints its median and min-max over the rounds. A ratio survives
the noise of a shared machine; an absolute time does not.

1. ``EMA.update`` against (a) a bare ``torch._foreach_lerp_(avg, live, 1 - decay)`` on
   parameter lists built once (the floor: EMA must do at least that), (b) the update of
   timm's ``ModelEmaV3`` (re-implemented below: timm is not a dependency) and (c)
   ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(d)).update_parameters``. At
   1M parameters (4 MB: the data stays in cache, so per-call Python overhead shows) and
   25M (100 MB, memory bound), on an MLP of Linear + LayerNorm blocks (parameters only,
   like a transformer). Each peer is paired with EMA in rounds of its own and keeps its
   own average (nothing is shared in cache). A BatchNorm variant also copies 24 buffers
   per update; its floor is the bare lerp plus a bare ``_foreach_copy_`` of the buffers.
2. ``average_weights`` of five ~25 MB models, as bandwidth (bytes read + written, i.e.
   5 x 25 MB read + 25 MB written, per second) relative to a plain ``copy_`` that moves
   the same bytes (75 MB into a preallocated 75 MB). Three shapes: "wide" (4 layers,
   8 keys), "mid" (16 layers, 32 keys), "deep" (64 Linear + BatchNorm blocks, 448 keys).
   The result of each call is freed outside the timed region; whether the next call
   gets those pages back or fresh ones (a page fault each 4 KB) is up to the C
   allocator, so the line prints the page faults per call. Also its speed-up over the
   common key-by-key loop that rebuilds ``state_dict()`` for every key.
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

DECAY = 0.999


def ln_mlp(width: int, blocks: int = 8) -> nn.Module:
    return nn.Sequential(
        *[m for _ in range(blocks) for m in (nn.Linear(width, width), nn.LayerNorm(width))]
    )


def bn_mlp(width: int, blocks: int = 8) -> nn.Module:
    return nn.Sequential(
        *[m for _ in range(blocks) for m in (nn.Linear(width, width), nn.BatchNorm1d(width))]
    )


def wide_mlp() -> nn.Module:  # 4 x 1250^2 floats ~ 25 MB, 8 keys
    return nn.Sequential(*[nn.Linear(1250, 1250) for _ in range(4)])


def mid_mlp() -> nn.Module:  # 16 x 625^2 floats ~ 25 MB, 32 keys
    return nn.Sequential(*[nn.Linear(625, 625) for _ in range(16)])


def deep_mlp() -> nn.Module:  # 64 x (312^2 + ...) floats ~ 25 MB, 448 keys
    return bn_mlp(312, blocks=64)


class TimmModelEmaV3:
    """The update of timm's ``ModelEmaV3`` (timm/utils/model_ema.py), reproduced here.

    It mirrors ``ModelEmaV3.update(model)`` with ``foreach=True`` and
    ``exclude_buffers=True`` (lerp the parameters, copy the buffers: trainwell's EMA
    default) and no warm-up: ``get_decay`` returns ``decay``, the parameter tuples are
    rebuilt on every call, one ``_foreach_lerp_`` with ``weight=1 - decay``, then a loop
    of ``copy_`` over the buffers.
    """

    def __init__(self, model: nn.Module, decay: float, device: torch.device | None = None):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.device = decay, device

    def get_decay(self, step: int | None = None) -> float:
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        decay = self.get_decay(step)
        ema_params = tuple(self.module.parameters())
        model_params = tuple(model.parameters())
        torch._foreach_lerp_(ema_params, model_params, weight=1.0 - decay)
        for ema_b, model_b in zip(self.module.buffers(), model.buffers(), strict=False):
            ema_b.detach().copy_(model_b.to(device=self.device))


def paired(
    fns: dict[str, Callable[[], object]], rounds: int, inner: int = 1
) -> dict[str, list[float]]:
    """Per-round time of each function (seconds per call).

    A round makes ``inner`` passes; a pass calls every function once, back to back, in
    an order that rotates from pass to pass, so all of them see the same load from other
    processes. A function's time in a round is the median of its ``inner`` calls (a
    call that was preempted does not move it).
    """
    names = list(fns)
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in names}
    k = 0
    for _ in range(rounds):
        calls: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(inner):
            k += 1
            order = names[k % len(names) :] + names[: k % len(names)]
            for name in order if k % 2 else order[::-1]:
                fn = fns[name]
                t0 = time.perf_counter()
                fn()
                calls[name].append(time.perf_counter() - t0)
        for n in names:
            times[n].append(statistics.median(calls[n]))
    return times


def ratio(times: dict[str, list[float]], num: str, den: str) -> str:
    r = [a / b for a, b in zip(times[num], times[den], strict=True)]
    return f"{statistics.median(r):5.3f} [{min(r):5.3f}-{max(r):5.3f}]"


def bench_ema(make: Callable[[], nn.Module], label: str, rounds: int, inner: int) -> None:
    torch.manual_seed(0)
    model = make()
    ema = EMA(model, decay=DECAY)
    timm = TimmModelEmaV3(model, DECAY)
    ref = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    for _ in range(2):  # past the initial copy
        ema.update(model)
        ref.update_parameters(model)
    bare = copy.deepcopy(model).requires_grad_(False)  # its own average: no shared cache
    avg, live = list(bare.parameters()), list(model.parameters())
    avg_b, live_b = list(bare.buffers()), list(model.buffers())
    peers: dict[str, Callable[[], object]] = {
        "timm ModelEmaV3": lambda: timm.update(model),
        "AveragedModel": lambda: ref.update_parameters(model),
    }
    if avg_b:
        floor = "bare lerp + buffer copy"
        peers[floor] = lambda: (
            torch._foreach_lerp_(avg, live, 1.0 - DECAY),
            torch._foreach_copy_(avg_b, live_b),
        )
    else:
        floor = "bare lerp"
        peers[floor] = lambda: torch._foreach_lerp_(avg, live, 1.0 - DECAY)
    ratios, us = [], []
    for name in (floor, "timm ModelEmaV3", "AveragedModel"):  # each pair in its own rounds
        t = paired({"ema": lambda: ema.update(model), "peer": peers[name]}, rounds, inner)
        ratios.append(f"x {name}: {ratio(t, 'ema', 'peer')}")
        us.append(statistics.median(t["ema"]) * 1e6)
    n = sum(p.numel() for p in live)
    print(
        f"EMA.update {label:6s} {n / 1e6:4.1f}M params, {len(live)} params + {len(avg_b)} "
        f"buffers, {statistics.median(us):5.0f} us: " + "; ".join(ratios)
    )


def key_by_key(models: list[nn.Module]) -> nn.Module:
    """The ten-line version: state_dict() rebuilt inside the loop for every key."""
    out = copy.deepcopy(models[0])
    for key in out.state_dict():
        stacked = torch.stack([m.state_dict()[key].float() for m in models])
        out.state_dict()[key].copy_(stacked.mean(0))  # (truncates integer buffers, too)
    return out


def minor_faults() -> int:
    try:
        import resource
    except ImportError:  # not Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def bench_average(make: Callable[[], nn.Module], label: str, rounds: int) -> None:
    torch.manual_seed(0)
    models = [make() for _ in range(5)]
    nbytes = sum(t.numel() * t.element_size() for t in models[0].parameters())
    moved = (len(models) + 1) * nbytes  # read every model, write the result
    src = torch.randn(moved // 2 // 4)
    dst = torch.empty_like(src)
    kept: list[nn.Module] = []
    faults: list[int] = []

    def run() -> None:
        f0 = minor_faults()
        kept.append(average_weights(models))  # freed below, outside the timed region
        faults.append(minor_faults() - f0)

    def copy_same_bytes() -> None:
        dst.copy_(src)

    times: dict[str, list[float]] = {"avg": [], "copy": []}
    run()
    copy_same_bytes()
    kept.clear()
    faults.clear()
    for r in range(rounds):
        order = [("avg", run), ("copy", copy_same_bytes)]
        for name, fn in order if r % 2 else order[::-1]:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        kept.clear()
    # bandwidth ratio = (moved / t_avg) / (moved / t_copy) = t_copy / t_avg
    bw = [c / a for a, c in zip(times["avg"], times["copy"], strict=True)]
    loop = paired(
        {"foreach": lambda: average_weights(models), "loop": lambda: key_by_key(models)}, 3
    )
    keys = len(models[0].state_dict())
    print(
        f"average_weights {label:4s} 5 x {nbytes / 1e6:4.1f} MB, {keys:3d} keys, "
        f"{statistics.median(times['avg']) * 1e3:5.1f} ms, "
        f"{statistics.median(faults):5.0f} page faults/call: bandwidth / copy bandwidth "
        f"{statistics.median(bw):5.3f} [{min(bw):5.3f}-{max(bw):5.3f}]; "
        f"key-by-key loop / average_weights {ratio(loop, 'loop', 'foreach')}"
    )


def main() -> None:
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, 1 thread, CPU; ratios: median [min-max] over paired rounds "
        "(EMA: < 1 is faster than the peer; bandwidth: higher is better)"
    )
    with torch.no_grad():
        bench_ema(lambda: ln_mlp(352), "LN 1M", rounds=21, inner=20)
        bench_ema(lambda: ln_mlp(1768), "LN 25M", rounds=15, inner=2)
        bench_ema(lambda: bn_mlp(352), "BN 1M", rounds=21, inner=20)
        bench_average(wide_mlp, "wide", rounds=15)
        bench_average(mid_mlp, "mid", rounds=15)
        bench_average(deep_mlp, "deep", rounds=15)


if __name__ == "__main__":
    main()
