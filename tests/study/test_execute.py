"""Executing a study: failed runs recorded, kill and resume without redoing finished runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w

from trainwell.study.execute import run_study
from trainwell.study.store import Store, default_url

TINY = {"epochs": 2, "batch_size": 32, "data": {"train_size": 120}, "model": {"hidden": [16]}}


def _raw(ablation: dict, **extra) -> dict:
    return {**TINY, **extra, "ablation": ablation}


def test_failed_runs_are_recorded_and_the_study_goes_on():
    variants = {
        "diverges": {
            "optimizer.name": "sgd",
            "optimizer.lr": 1e6,
            "gradients.skip_nonfinite": False,
        },
        "invalid": {"model.dropout": 2.0},
    }
    store = Store("sqlite://")
    sid = run_study(_raw({"seeds": 1, "grid": {"l2": [1e-3]}, "variants": variants}), store)
    runs = {r["variant"]: r for r in store.runs(sid)}
    assert {v: r["status"] for v, r in runs.items()} == {
        "base": "done", "l2=0.001": "done", "diverges": "failed", "invalid": "failed"
    }  # fmt: skip
    assert "non-finite train loss" in runs["diverges"]["error"]
    assert "model.dropout" in runs["invalid"]["error"]
    assert runs["base"]["final"]["test_acc"] > 0 and runs["base"]["epochs_run"] == 2
    assert store.pending(sid) == []  # failed runs are finished; retry_failed picks them up
    assert len(store.pending(sid, retry_failed=True)) == 2
    with pytest.raises(ValueError, match="jobs"):
        run_study(_raw({}), store, jobs=0)


def _final(store: Store) -> dict:
    return {
        (r["variant"], r["seed"]): (r["status"], r["final"]) for r in store.runs(store.study_id())
    }


def test_killed_study_resumes_without_redoing_finished_runs(tmp_path):
    raw = _raw({"seeds": 3, "grid": {"l2": [1e-3], "dropout.p": [0.3]}}, epochs=3)
    raw["data"] = {"train_size": 300}
    config = tmp_path / "study.toml"
    config.write_text(tomli_w.dumps(raw), encoding="utf-8")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "trainwell", "ablate", str(config), "--out", str(out)]
    cmd += ["--jobs", "1", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    db = out / "results.sqlite"
    deadline = time.monotonic() + 60
    done: dict = {}
    while time.monotonic() < deadline and proc.poll() is None:
        if db.is_file():
            try:
                done = {k: v for k, v in _final(Store(default_url(out))).items() if v[0] == "done"}
            except Exception:  # noqa: BLE001 - the study is not created yet
                done = {}
            if len(done) >= 2:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= len(done) < 9, "the study finished before it could be killed"
    before = {r["id"]: r for r in Store(default_url(out)).runs(1) if r["status"] == "done"}
    finished = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    after = {r["id"]: r for r in Store(default_url(out)).runs(1)}
    assert len(after) == 9 and all(r["status"] == "done" for r in after.values())
    for rid, run in before.items():  # not redone: same timestamps and measured times
        assert after[rid]["finished"] == run["finished"]
        assert after[rid]["train_seconds"] == run["train_seconds"]
    assert (out / "report.html").is_file() and (out / "summary.png").is_file()
    reference = Store("sqlite://")
    run_study(raw, reference, name="study")
    assert _final(Store(default_url(out))) == _final(reference)
