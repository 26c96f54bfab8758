"""A user's module (model class, datasets function, loss) through every command, end to end:
``run``, ``resume`` after SIGKILL (bit-identical), ``soup``, ensemble training, ``--nproc 2``,
``ablate`` from Python (``trainwell.ablate`` with worker processes; the CLI study is in
tests/test_examples.py), and a ``torch.compile`` d model that trains and resumes."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import trainwell
from tests.app import user_code

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CONFIG = """
epochs = {epochs}
batch_size = 24
seed = 3
[task]
loss = "user_code.py:smoothed_ce"
[model]
target = "user_code.py:Net"
[model.args]
hidden = 32
[data]
target = "user_code.py:blobs"
[data.args]
n = {n}
[regularization]
l2 = 1e-4
[checkpoint]
enabled = true
keep_last = 3
[ema]
enabled = true
decay = 0.9
"""


def write_config(tmp_path: Path, epochs: int = 12, extra: str = "", n: int = 8000) -> Path:
    (tmp_path / "user_code.py").write_text((HERE / "user_code.py").read_text())
    path = tmp_path / "c.toml"
    path.write_text(CONFIG.format(epochs=epochs, n=n) + extra)
    return path


def trainwell_cli(*args: str, cwd: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "trainwell", *args]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    return subprocess.Popen(command, cwd=cwd, env=env, **pipes, **kw)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out + err
    return out


def rows(run_dir: Path) -> list[dict]:
    with (run_dir / "metrics.csv").open() as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    config = write_config(root)
    finish(trainwell_cli("run", str(config), "--out", str(root / "run"), "-q", cwd=root))
    return root / "run"


def test_run_writes_the_task_metrics_and_a_config_that_finds_the_user_code(reference):
    summary = json.loads((reference / "summary.json").read_text())
    assert set(summary["test"]) == {"test_acc", "test_nll", "test_ece", "test_brier"}
    assert summary["test"]["test_acc"] > 0.6
    saved = (reference / "config.toml").read_text()
    assert f'"{(reference.parent / "user_code.py").resolve()}:Net"' in saved  # absolute


@pytest.mark.parametrize("delay", [0.1, 0.6])
def test_sigkill_then_resume_is_bit_identical(tmp_path, reference, delay):
    config = write_config(tmp_path)
    run_dir = tmp_path / "run"
    proc = trainwell_cli("run", str(config), "--out", str(run_dir), "-q", cwd=tmp_path)
    checkpoints = run_dir / "checkpoints"
    deadline = time.monotonic() + 120
    while not (checkpoints.exists() and any(checkpoints.iterdir())) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the run ended before the kill"
    finish(trainwell_cli("resume", str(run_dir), "-q", cwd=ROOT))  # another cwd on purpose
    same_weights(reference, run_dir)
    assert rows(run_dir) == rows(reference)


def test_soup_of_a_user_model(reference, tmp_path):
    out = finish(trainwell_cli("soup", str(reference), "--out", str(tmp_path / "s.safetensors"),
                               cwd=ROOT))  # fmt: skip
    assert "greedy soup" in out and (tmp_path / "s.safetensors").is_file()


def test_ensemble_of_user_models(tmp_path):
    config = write_config(tmp_path, epochs=3, extra="[ensemble]\nmembers = 2\n", n=480)
    finish(trainwell_cli("run", str(config), "--out", str(tmp_path / "e"), "-q", cwd=tmp_path))
    ens = json.loads((tmp_path / "e" / "ensemble.json").read_text())
    assert len(ens["members"]) == 2 and 0.0 <= ens["ensemble"]["acc"] <= 1.0


def test_nproc_two_with_a_user_model(tmp_path):
    config = write_config(tmp_path, epochs=2, n=480)
    args = ["run", str(config), "--nproc", "2", "--out", str(tmp_path / "d"), "-q"]
    proc = trainwell_cli(*args, cwd=tmp_path)
    out, err = proc.communicate(timeout=180)
    if proc.returncode != 0 and "terminate called without an active exception" in err:
        # a rank aborted in C++ teardown at exit (seen intermittently under a full suite
        # with torch 2.13's gloo; see tests/test_distributed.py): run it once more
        finish(trainwell_cli(*args, "--overwrite", cwd=tmp_path), timeout=180)
    else:
        assert proc.returncode == 0, out + err
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["extra"]["processes"] == 2 and "test_acc" in summary["test"]


def test_python_ablate_with_callables_in_worker_processes(tmp_path):
    config = {
        "epochs": 2, "batch_size": 32, "data": {"args": {"n": 240}},
        "ablation": {"seeds": 2, "grid": {"l2": [1e-2], "data.train_fraction": [0.5, 1.0]}},
    }  # fmt: skip
    result = trainwell.ablate(
        config, model=user_code.Net, data=user_code.blobs, loss=user_code.smoothed_ce,
        out=tmp_path / "study", jobs=2,
    )  # fmt: skip
    assert {r["status"] for r in result.runs} == {"done"} and len(result.runs) == 8
    assert result.report.is_file() and "test NLL" in result.verdict
    stored = json.loads(result.runs[0]["config"])
    assert stored["model"]["target"] == "tests.app.user_code:Net"
    variants = {(r["data"], r["variant"]) for r in result.rows}
    assert ("train_fraction=0.5", "l2=0.01") in variants


def test_python_ablate_refuses_a_lambda(tmp_path):
    with pytest.raises(ValueError, match="lambda"):
        trainwell.ablate({"ablation": {"seeds": 1}}, loss=lambda o, y: o.sum(), out=tmp_path)


def test_compiled_model_trains_and_resumes(tmp_path):
    config = write_config(tmp_path, epochs=3, n=480)
    config.write_text(config.read_text().replace("seed = 3\n", "seed = 3\ncompile = true\n"))
    run_dir = tmp_path / "run"
    finish(trainwell_cli("run", str(config), "--out", str(run_dir), "-q", cwd=tmp_path), 600)
    assert len(rows(run_dir)) == 3
    weights = load_file(run_dir / "model.safetensors")
    assert not any(k.startswith("_orig_mod") for k in weights)  # plain module state
    full = rows(run_dir)
    (run_dir / "checkpoints" / "ckpt-00000002.safetensors").unlink()  # as if killed in epoch 3
    finish(trainwell_cli("resume", str(run_dir), "-q", cwd=tmp_path), 600)
    assert rows(run_dir) == full  # epoch 3 trained again, from epoch 2's checkpoint
    resumed = load_file(run_dir / "model.safetensors")
    for key in weights:
        torch.testing.assert_close(resumed[key], weights[key], rtol=1e-5, atol=1e-6)
