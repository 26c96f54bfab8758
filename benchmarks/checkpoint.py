"""Checkpoint speed: trainwell ``save`` / ``load`` against safetensors on the same tensors.

Rows (issue 18), each a ratio against its peer measured in the same run:

* load into a model, 10 / 100 / 500 MB of fp32 weights: ``model.load_state_dict(
  trainwell.load(p))`` vs ``model.load_state_dict(safetensors.torch.load_file(p))``.
  trainwell verifies every tensor's checksum and the JSON state before it returns;
  safetensors verifies nothing. Target <= 1.5x. The ``mmap=False`` line: trainwell
  reading every tensor into memory of its own instead of mapping the file.
* save, 10 / 100 / 500 MB: ``trainwell.save`` (temp file, checksums, fsync, rename,
  fsync of the directory) vs ``safetensors.torch.save_file`` followed by an fsync of the
  file (which rewrites the file in place: not atomic). Target <= 1.1x. The floor line
  times safetensors written the way trainwell writes (temp file, fsync, rename, fsync of
  the directory): the cost of the atomic, durable write itself.
* checksum: trainwell's tensor checksum vs ``zlib.crc32`` over the same 100 MB, in GB/s.
  Target >= 15 GB/s.
* (information) a model + AdamW state of 100 MB, nested (int keys, hyperparameters),
  which safetensors cannot store: trainwell vs ``torch.save`` + fsync and
  ``torch.load(weights_only=True)``.

Method: one thread (``torch.set_num_threads(1)``: the machine is shared); each round runs
every candidate of a row once, the order rotating from round to round, after one untimed
warm-up of each; the ratio is taken per round, and the median and min-max of the
per-round ratios are printed (15 rounds; 21 for the save rows, which go to the disk and
vary most). Both files of a load row are read in every round, so both are in the page
cache for both candidates: the load rows measure the CPU cost (read from the page cache,
checksum, decode, copy into the model), not the disk. The save rows include the disk:
every candidate fsyncs what it wrote.

Run: .venv/bin/python benchmarks/checkpoint.py [checksum] [load] [save] [opt]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import trainwell
from trainwell.checkpoints import format as tw_format

SIZES_MB = (10, 100, 500)
ROUNDS, SAVE_ROUNDS = 15, 21


def make_model(mb: int) -> torch.nn.Module:
    """``mb`` layers of Linear(512, 512): about ``mb`` MiB of fp32 weights, 2 * mb tensors."""
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(mb)])


def interleaved(candidates: dict[str, Callable[[], object]], rounds: int) -> dict:
    """Each round times every candidate once, in a rotating order: seconds per candidate."""
    for fn in candidates.values():
        fn()  # warm-up: page cache, allocator, imports
    names = list(candidates)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            t0 = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def ratio(times: dict[str, list[float]], a: str, b: str) -> dict:
    """Median and min-max of the per-round ratios ``a / b``, and both medians."""
    ratios = [x / y for x, y in zip(times[a], times[b], strict=True)]
    return {
        "a": statistics.median(times[a]),
        "b": statistics.median(times[b]),
        "ratio": statistics.median(ratios),
        "lo": min(ratios),
        "hi": max(ratios),
        "rounds": len(ratios),
    }


def line(row: str, names: tuple[str, str], r: dict, target: str) -> str:
    return (
        f"{row:28s} {names[0]} {r['a'] * 1e3:7.1f} ms  {names[1]} {r['b'] * 1e3:7.1f} ms  "
        f"ratio {r['ratio']:5.2f}x (min {r['lo']:.2f} - max {r['hi']:.2f}, "
        f"{r['rounds']} rounds)  target {target}"
    )


def load_into(model: torch.nn.Module, path: Path, load: Callable[[Path], dict]) -> None:
    model.load_state_dict(load(path))


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsynced_save_file(tensors: dict, path: Path) -> None:
    save_file(tensors, path)
    fsync_file(path)


def atomic_save_file(tensors: dict, path: Path) -> None:
    """safetensors written as trainwell writes: temp file, fsync, rename, fsync directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, tmp)
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_file(path.parent)


def bench_load_and_save(d: Path, groups: set[str]) -> None:
    for mb in SIZES_MB:
        model = make_model(mb)
        sd = model.state_dict()
        size = sum(t.numel() * t.element_size() for t in sd.values()) / 2**20
        tw, st = d / f"tw{mb}.safetensors", d / f"st{mb}.safetensors"
        trainwell.save(tw, sd)
        save_file(sd, st)
        if "load" in groups:
            load_tw = partial(load_into, model, tw, trainwell.load)
            load_st = partial(load_into, model, st, load_file)
            times = interleaved({"trainwell": load_tw, "safetensors": load_st}, ROUNDS)
            r = ratio(times, "trainwell", "safetensors")
            row = f"load {size:.0f} MB into a model"
            print(line(row, ("trainwell", "safetensors"), r, "<= 1.5x"))
            read = partial(load_into, model, tw, partial(trainwell.load, mmap=False))
            times = interleaved({"read": read, "safetensors": load_st}, ROUNDS)
            names = ("trainwell mmap=False", "safetensors")
            print(line("  mmap=False", names, ratio(times, "read", "safetensors"), "(information)"))
        if "save" in groups:
            times = interleaved(
                {
                    "trainwell": lambda tw=tw, sd=sd: trainwell.save(tw, sd),
                    "st+fsync": lambda st=st, sd=sd: fsynced_save_file(sd, st),
                    "st atomic": lambda sd=sd: atomic_save_file(sd, d / "st_atomic"),
                },
                SAVE_ROUNDS,
            )
            r = ratio(times, "trainwell", "st+fsync")
            print(line(f"save {size:.0f} MB", ("trainwell", "safetensors+fsync"), r, "<= 1.1x"))
            r = ratio(times, "st atomic", "st+fsync")
            row, names = "  floor: atomic write", ("safetensors atomic", "safetensors+fsync")
            print(line(row, names, r, "(information)"))
        del model, sd
        for path in (tw, st, d / "st_atomic"):
            path.unlink(missing_ok=True)


def torch_save_fsync(state: dict, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def bench_optimizer_state(d: Path) -> None:
    """A nested model + AdamW state (int keys, hyperparameters), which safetensors cannot
    store: against torch.save + fsync / torch.load(weights_only=True) (information)."""
    model = make_model(34)  # 34 MB of weights + 68 MB of AdamW moments
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 512)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}
    size = trainwell.save(d / "tw_opt", state).stat().st_size / 2**20
    torch_save_fsync(state, d / "pt_opt")
    times = interleaved(
        {
            "trainwell": lambda: trainwell.load(d / "tw_opt"),
            "torch": lambda: torch.load(d / "pt_opt", weights_only=True),
        },
        ROUNDS,
    )
    row, names = f"load {size:.0f} MB model+AdamW", ("trainwell", "torch.load")
    print(line(row, names, ratio(times, "trainwell", "torch"), "(information)"))
    times = interleaved(
        {
            "trainwell": lambda: trainwell.save(d / "tw_opt", state),
            "torch": lambda: torch_save_fsync(state, d / "pt_opt"),
        },
        ROUNDS,
    )
    row, names = f"save {size:.0f} MB model+AdamW", ("trainwell", "torch.save+fsync")
    print(line(row, names, ratio(times, "trainwell", "torch"), "(information)"))


def bench_checksum() -> None:
    data = torch.randint(0, 256, (100 * 2**20,), dtype=torch.uint8).numpy()
    checksum = tw_format._checksum
    times = interleaved(
        {"trainwell": lambda: checksum(data), "crc32": lambda: zlib.crc32(data)}, 15
    )
    r = ratio(times, "trainwell", "crc32")
    gb = data.nbytes / 1e9
    print(
        f"{'checksum 100 MB':28s} trainwell ({tw_format.CHECKSUM}) {gb / r['a']:5.1f} GB/s  "
        f"zlib.crc32 {gb / r['b']:5.1f} GB/s  speed-up {1 / r['ratio']:5.2f}x "
        f"(min {1 / r['hi']:.2f} - max {1 / r['lo']:.2f}, {r['rounds']} rounds)  "
        "target >= 15 GB/s"
    )


def main(only: set[str]) -> None:
    """Every row, or only the groups named on the command line (checksum, load, save, opt)."""
    torch.set_num_threads(1)
    groups = only or {"checksum", "load", "save", "opt"}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        d = Path(tmp)
        if "checksum" in groups:
            bench_checksum()
        if groups & {"load", "save"}:
            bench_load_and_save(d, groups)
        if "opt" in groups:
            bench_optimizer_state(d)


if __name__ == "__main__":
    main(set(sys.argv[1:]))
