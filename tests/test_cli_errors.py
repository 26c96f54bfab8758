"""Every bad input and runtime failure the CLI can meet: one line, the right exit status.

One table row per input named in issue 15. Each row builds its files in a fresh folder,
runs the real CLI in-process and checks: the exit status (2: refused before training,
1: failed after training started), at most two ``trainwell: error:`` lines naming the
argument, no traceback, and -- for a refused ``run`` -- no run directory left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from trainwell.cli import app

runner = CliRunner()
BASE = """seed = 0
epochs = 2
batch_size = 32
[data]
source = "digits"
train_size = 120
[model]
hidden = [16]
"""
EXPLODE = ["--set", "optimizer.name=sgd", "--set", "optimizer.lr=1e30", "--set", "epochs=6"]


def config(tmp: Path, text: str = "", name: str = "c.toml") -> str:
    path = tmp / name
    path.write_text(BASE + text, encoding="utf-8")
    return str(path)


def raw_config(tmp: Path, data: bytes) -> str:
    path = tmp / "c.toml"
    path.write_bytes(data)
    return str(path)


def npz_config(tmp: Path, **arrays: np.ndarray) -> list[str]:
    np.savez(tmp / "d.npz", **arrays)
    text = BASE.replace('source = "digits"\ntrain_size = 120', f'source = "{tmp / "d.npz"}"')
    (tmp / "c.toml").write_text(text, encoding="utf-8")
    return ["run", str(tmp / "c.toml"), "-q"]


def continuous_csv(tmp: Path) -> list[str]:
    rng = np.random.default_rng(0)
    rows = ["a,b,y", *(f"{a:.3f},{b:.3f},{a * 3 + b:.6f}" for a, b in rng.normal(size=(200, 2)))]
    (tmp / "d.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    text = BASE.replace(
        'source = "digits"\ntrain_size = 120', f'source = "{tmp / "d.csv"}"\ntarget = "y"'
    )
    (tmp / "c.toml").write_text(text, encoding="utf-8")
    return ["run", str(tmp / "c.toml"), "-q"]


def trained_run(tmp: Path) -> Path:
    """A finished run with three checkpoints (for soup and report rows)."""
    out = tmp / "trained"
    args = ["run", config(tmp, "[checkpoint]\nenabled = true\nkeep_last = 3\n", "t.toml")]
    result = runner.invoke(app, [*args, "-q", "--out", str(out), "--set", "epochs=3"])
    assert result.exit_code == 0, result.output
    return out


def ablation(tmp: Path, grid: str, *extra: str) -> list[str]:
    text = f"[ablation]\nseeds = 1\n[ablation.grid]\n{grid}\n"
    return ["ablate", config(tmp, text), "-q", "--jobs", "1", "--out", str(tmp / "study"), *extra]


def ablation_of_failing_runs(tmp: Path) -> list[str]:
    text = '[optimizer]\nname = "sgd"\nlr = 1e30\n'
    text += "[ablation]\nseeds = 1\n[ablation.grid]\nl2 = [1e-3]\n"
    return ["ablate", config(tmp, text), "-q", "--jobs", "1", "--out", str(tmp / "study")]


@contextlib.contextmanager
def tmpfs(where: Path, options: str):
    """A real small (or read-only) filesystem at ``where``; skips where mounting is refused."""
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True)  # fmt: skip
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


Row = tuple[str, Callable[[Path], list[str]], int, list[str]]
ROWS: list[Row] = [
    # config values
    ("device cuda on a CPU-only torch", lambda t: ["run", config(t), "--set", "device=cuda"], 2,
     ["device", "cuda"]),
    ("unknown device string", lambda t: ["run", config(t), "--set", "device=gpu0"], 2,
     ["device", "gpu0"]),
    ("hidden width 0", lambda t: ["run", config(t), "--set", "model.hidden=[0]"], 2,
     ["model.hidden"]),
    ("hidden width -1", lambda t: ["run", config(t), "--set", "model.hidden=[-1]"], 2,
     ["model.hidden"]),
    ("epochs absurdly large", lambda t: ["run", config(t), "--set", "epochs=" + "9" * 23], 2,
     ["epochs"]),
    ("batch_size absurdly large", lambda t: ["run", config(t), "--set", "batch_size=10**23"], 2,
     ["batch_size"]),
    ("batch_size with 5000 digits in --set",
     lambda t: ["run", config(t), "--set", "batch_size=1" + "0" * 5000], 2, ["batch_size"]),
    ("an integer with 5000 digits in the file",
     lambda t: ["run", raw_config(t, b"epochs = 1" + b"0" * 5000 + b"\n")], 2, ["c.toml"]),
    ("deeply nested TOML",
     lambda t: ["run", raw_config(t, b"x = " + b"[" * 100_000 + b"]" * 100_000 + b"\n")], 2,
     ["c.toml"]),
    ("invalid UTF-8 in the config",
     lambda t: ["run", raw_config(t, b"epochs = 2\n# caf\xe9 \xff\n")], 2, ["c.toml", "UTF-8"]),
    ("the config is a directory", lambda t: ["run", str(t)], 2, ["work"]),
    ("the config does not exist", lambda t: ["run", str(t / "nope.toml")], 2, ["nope.toml"]),
    ("lr is NaN", lambda t: ["run", config(t), "--set", "optimizer.lr=nan"], 2,
     ["optimizer.lr"]),
    ("--set without =", lambda t: ["run", config(t), "--set", "epochs"], 2, ["--set"]),
    # data
    ("a continuous float target under classification", continuous_csv, 2,
     ["task.kind", "regression"]),
    ("a 2-D y", lambda t: npz_config(t, X=np.zeros((60, 3)), y=np.zeros((60, 3))), 2, ["y"]),
    ("an empty NPZ", lambda t: npz_config(t), 2, ["d.npz"]),
    ("complex features", lambda t: npz_config(t, X=np.ones((60, 3), complex),
                                              y=np.arange(60) % 2), 2, ["X"]),
    ("string features", lambda t: npz_config(t, X=np.full((60, 3), "a"), y=np.arange(60) % 2),
     2, ["X"]),
    # files and folders
    ("run --out is a file",
     lambda t: ["run", config(t), "--out", str((t / "f").touch() or t / "f")], 2, ["--out"]),
    ("soup --out is a directory", lambda t: ["soup", str(trained_run(t)), "--out", str(t)], 2,
     ["--out"]),
    ("report on a folder with no results store", lambda t: ["report", str(t)], 2,
     ["results.sqlite"]),
    ("report --db on a file that is not a results store",
     lambda t: ["report", str(t), "--db",
                f"sqlite:///{(t / 'x.txt').write_text('hello') and t / 'x.txt'}"], 2,
     ["results store"]),
    ("--db into a missing directory",
     lambda t: ["report", str(t), "--db", f"sqlite:///{t}/missing/results.sqlite"], 2,
     ["missing"]),
    ("--db with a missing database driver",
     lambda t: ["report", str(t), "--db", "postgresql+nosuchdriver://u@localhost/db"], 2,
     ["nosuchdriver", "postgresql"]),
    # ablate
    ("ablate a config with no [ablation] section", lambda t: ["ablate", config(t)], 2,
     ["no [ablation] section"]),
    ("an unknown grid key", lambda t: ablation(t, "l3 = [0.1]"), 2, ["l3", "l2"]),
    ("a grid value the schema refuses", lambda t: ablation(t, "l2 = [-1.0]"), 2,
     ["regularization.l2"]),
    ("an unknown --executor", lambda t: ablation(t, "l2 = [1e-3]", "--executor", "slurm"), 2,
     ["--executor", "slurm"]),
    ("--address without --executor ray",
     lambda t: ablation(t, "l2 = [1e-3]", "--address", "10.0.0.1:6379"), 2, ["--executor ray"]),
    ("a bad [ablation.resources] table",
     lambda t: ablation(t, "l2 = [1e-3]\n[ablation.resources]\ncpus = -1"), 2, ["cpus"]),
    ("a study whose runs fail", ablation_of_failing_runs, 1, ["2 of 2", "failures.txt"]),
    # failures during training
    ("gradients NaN past the guard", lambda t: ["run", config(t), "-q", *EXPLODE], 1,
     ["NaN/Inf", "Lower the learning rate"]),
    ('early_stopping.nan_policy = "raise"',
     lambda t: ["run", config(t, "[early_stopping]\nenabled = true\nnan_policy = 'raise'\n"
                                 "[gradients]\nskip_nonfinite = false\n"), "-q", *EXPLODE], 1,
     ["nan_policy"]),
]  # fmt: skip


def test_usage_errors_are_one_line_too():
    """Typer's own errors (unknown option, missing argument, out-of-range value) through the
    console-script entry point: one line, exit 2, no box."""
    for args, needle in [(["soup", "x", "-q"], "No such option: -q"),
                         (["run"], "Missing argument"), (["demo", "--seeds", "0"], "--seeds"),
                         (["bogus"], "No such command")]:  # fmt: skip
        done = subprocess.run([sys.executable, "-m", "trainwell", *args], capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert lines[0].startswith("trainwell: error:") and needle in lines[0]


def error_lines(result) -> list[str]:
    text = result.stderr if result.stderr_bytes is not None else result.output
    return [line for line in text.splitlines() if line.startswith("trainwell: error:")]


@pytest.mark.parametrize(("build", "code", "needles"), [r[1:] for r in ROWS],
                         ids=[r[0] for r in ROWS])  # fmt: skip
def test_bad_input_is_one_line_with_the_right_exit_status(tmp_path, monkeypatch, build, code,
                                                          needles):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    args = build(work)
    if "device=cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = error_lines(result)
    assert 1 <= len(lines) <= 2, result.output
    for needle in needles:
        assert needle in " ".join(lines), (needle, lines)
    if args[0] == "run" and code == 2:
        assert not (tmp_path / "runs").exists(), "a refused run left its directory behind"


def test_a_run_that_fails_in_training_keeps_what_it_has(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", config(tmp_path), "-q", "--out", str(out), *EXPLODE])
    assert result.exit_code == 1
    summary = json.loads((out / "summary.json").read_text())
    assert "NaN/Inf" in summary["failed"] and summary["epochs_run"] >= 0
    assert (out / "config.toml").is_file()


def test_traceback_flag_and_debug_variable_show_the_traceback(tmp_path, monkeypatch):
    args = ["run", config(tmp_path), "--set", "device=cuda"]
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert runner.invoke(app, args).exception.__class__ is SystemExit
    result = runner.invoke(app, ["--traceback", *args])
    assert isinstance(result.exception, ValueError) and "CUDA" in str(result.exception)
    monkeypatch.setenv("TRAINWELL_DEBUG", "1")
    assert isinstance(runner.invoke(app, args).exception, ValueError)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a filesystem needs root")
def test_disk_full_during_checkpoints_is_one_line_exit_1(tmp_path):
    with tmpfs(tmp_path / "small", "size=96k") as disk:
        args = ["run", config(tmp_path, "[checkpoint]\nenabled = true\n"), "-q", "--out",
                str(disk / "run"), "--set", "model.hidden=[512, 512]"]  # fmt: skip
        result = runner.invoke(app, args)
        lines = error_lines(result)
        assert result.exit_code == 1 and len(lines) == 1, result.output
        assert "no space left" in lines[0] and "Traceback" not in result.output


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a filesystem needs root")
def test_read_only_directory_is_one_line_exit_2(tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=64k") as disk:
        result = runner.invoke(app, ["run", config(tmp_path), "-q", "--out", str(disk / "run")])
        lines = error_lines(result)
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert "cannot write" in lines[0] and str(disk) in lines[0]
