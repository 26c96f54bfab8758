"""A run SIGKILLed at random points (some during a checkpoint write) and resumed ends
bit-identical to a run that was never interrupted: weights, history and stop epoch."""

import csv
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
epochs = 25
batch_size = 32
[model]
hidden = [128, 128]
dropout = 0.2
[regularization]
l2 = 1e-4
[early_stopping]
enabled = true
patience = 6
[checkpoint]
enabled = true
[ema]
enabled = true
decay = 0.9
"""


def trainwell(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "trainwell", *args], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def history(run_dir: Path) -> list[dict]:
    with (run_dir / "metrics.csv").open() as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    (root / "c.toml").write_text(CONFIG)
    proc = trainwell("run", str(root / "c.toml"), "--out", str(root / "run"), "-q")
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    return root / "run"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_random_points_then_resume_is_bit_identical(tmp_path, reference, seed):
    rng = random.Random(seed)
    (tmp_path / "c.toml").write_text(CONFIG)
    run_dir = tmp_path / "run"
    proc = trainwell("run", str(tmp_path / "c.toml"), "--out", str(run_dir), "-q")
    checkpoints = run_dir / "checkpoints"
    deadline = time.monotonic() + 60
    while not (checkpoints.exists() and any(checkpoints.iterdir())) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.3))  # somewhere in later epochs, possibly mid-write
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    kills = 1
    while True:
        resumed = trainwell("resume", str(run_dir), "-q")
        if kills < 2 and rng.random() < 0.7:  # sometimes kill the resumed run too
            time.sleep(rng.uniform(1.5, 2.5))
            if resumed.poll() is None:
                resumed.send_signal(signal.SIGKILL)
                resumed.wait(timeout=30)
                kills += 1
                continue
        assert resumed.wait(timeout=120) == 0, resumed.stderr.read()
        break
    ref_w, got_w = (
        load_file(reference / "model.safetensors"),
        load_file(run_dir / "model.safetensors"),
    )
    assert ref_w.keys() == got_w.keys()
    for key in ref_w:
        assert (ref_w[key] == got_w[key]).all(), key
    assert history(run_dir) == history(reference)
