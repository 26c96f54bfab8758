"""SIGKILL ``trainwell run`` at 20 seeded points, resume, and get the uninterrupted run exactly.

Kill points: while a checkpoint is being written (its temporary file exists), while the
final files are written, at a random time, and after an early-stopped run finished. After
``trainwell resume`` (repeated if it is killed again) the run directory equals the one of
a run that was never interrupted: weights, metrics.csv, grad_norms.csv and summary.json
(wall-clock times aside).
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

CONFIG = """
epochs = 40
batch_size = 32
[data]
source = "digits"
train_size = 600
[model]
hidden = [96, 96]
dropout = 0.1
[regularization]
l2 = 1e-4
[gradients]
monitor = true
monitor_every = 5
[early_stopping]
enabled = true
patience = 3
min_delta = 0.002
restore_best = false
[checkpoint]
enabled = true
keep_last = 2
[ema]
enabled = true
decay = 0.9
"""
TIMES = ("seconds", "train_seconds")


def start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "trainwell", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def table(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        return [{k: v for k, v in row.items() if k not in TIMES} for row in csv.DictReader(f)]


def summary(run_dir: Path) -> dict:
    data = json.loads((run_dir / "summary.json").read_text())
    return {k: v for k, v in data.items() if k not in TIMES}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    (root / "c.toml").write_text(CONFIG)
    proc = start("run", str(root / "c.toml"), "--out", str(root / "run"), "-q")
    assert proc.wait(timeout=180) == 0, proc.stderr.read()
    return root / "run"


def temporaries(directory: Path) -> bool:
    try:
        return any(e.name.endswith(".tmp") for e in os.scandir(directory))
    except FileNotFoundError:
        return False


def kill_at(proc: subprocess.Popen, run_dir: Path, kind: str, rng: random.Random) -> None:
    """SIGKILL ``proc`` at a point of the given kind (or let it finish: ``"finished"``)."""
    deadline = time.monotonic() + 120
    if kind == "finished":
        proc.wait(timeout=120)
        return
    if kind == "random":
        time.sleep(rng.uniform(2.0, 4.5))  # interpreter start-up is about 2 s
    else:
        where = run_dir / "checkpoints" if kind == "checkpoint" else run_dir
        skip = rng.randrange(4) if kind == "checkpoint" else 0
        while proc.poll() is None and time.monotonic() < deadline:
            if temporaries(where):
                if skip == 0:
                    break
                skip -= 1
                while temporaries(where) and proc.poll() is None:
                    pass
            time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


KINDS = ["checkpoint"] * 9 + ["final"] * 4 + ["random"] * 5 + ["finished"] * 2


@pytest.mark.parametrize("seed", range(len(KINDS)))
def test_killed_run_resumes_bit_identical(tmp_path, reference, seed):
    rng = random.Random(seed)
    kind = KINDS[seed]
    (tmp_path / "c.toml").write_text(CONFIG)
    run_dir = tmp_path / "run"
    kill_at(start("run", str(tmp_path / "c.toml"), "--out", str(run_dir), "-q"), run_dir, kind,
            rng)  # fmt: skip
    for attempt in range(3):
        if not (run_dir / "config.toml").exists():  # killed before anything was written
            proc = start("run", str(tmp_path / "c.toml"), "--out", str(run_dir), "-q")
        else:
            proc = start("resume", str(run_dir), "-q", "--restart")
        if attempt == 0 and rng.random() < 0.3:  # sometimes kill the resumed run too
            kill_at(proc, run_dir, "random", rng)
            continue
        assert proc.wait(timeout=180) == 0, proc.stderr.read()
        break
    ref_w, got_w = (
        load_file(reference / "model.safetensors"),
        load_file(run_dir / "model.safetensors"),
    )
    assert ref_w.keys() == got_w.keys()
    for key in ref_w:
        assert (ref_w[key] == got_w[key]).all(), key
    assert table(run_dir / "metrics.csv") == table(reference / "metrics.csv")
    assert table(run_dir / "grad_norms.csv") == table(reference / "grad_norms.csv")
    assert summary(run_dir) == summary(reference)
    assert summary(reference)["stop_reason"] != "max_epochs"  # it early-stopped
