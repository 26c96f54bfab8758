"""Checkpoint save/load speed: trainwell (safetensors + JSON, checksums, fsync) vs torch.save.

A model + AdamW state of about 3 x 32 MB (safetensors alone: the same tensors, no JSON).
Candidates are interleaved; the median of the repetitions is printed with the ratio to
torch.save / torch.load(weights_only=True). trainwell's numbers include the CRC-32 of
every tensor and the fsyncs; torch.save's do not fsync, so ``torch.save+fsync`` is shown
for a like-for-like write.

Run: .venv/bin/python benchmarks/checkpoint.py
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import trainwell


def make_state() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 1024)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}


def torch_save_fsync(path: Path, state: dict) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def main() -> None:
    torch.set_num_threads(1)
    state = make_state()
    flat = {f"model.{k}": v for k, v in state["model"].items()}
    for i, s in state["optimizer"]["state"].items():
        flat.update({f"opt.{i}.{k}": v for k, v in s.items() if v.dim()})
    mb = sum(v.numel() * v.element_size() for v in flat.values()) / 2**20
    d = Path(tempfile.mkdtemp())
    writers = {
        "trainwell.save": lambda: trainwell.save(d / "tw", state),
        "torch.save": lambda: torch.save(state, d / "pt"),
        "torch.save+fsync": lambda: torch_save_fsync(d / "ptf", state),
        "safetensors.save_file (tensors only)": lambda: save_file(flat, d / "st"),
    }
    readers = {
        "trainwell.load": lambda: trainwell.load(d / "tw"),
        "torch.load(weights_only)": lambda: torch.load(d / "pt", weights_only=True),
        "safetensors.load_file (tensors only)": lambda: load_file(d / "st"),
    }
    groups = (("save", writers, "torch.save"), ("load", readers, "torch.load(weights_only)"))
    for group, fns, base in groups:
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(7):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        print(f"{group} ({mb:.0f} MB of state, median of 7)")
        ref = statistics.median(times[base])
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"  {name:38s} {med * 1e3:8.1f} ms   x{med / ref:5.2f} vs {base}")


if __name__ == "__main__":
    main()
