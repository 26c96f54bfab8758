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

from trainwell.app.config import ConfigError
from trainwell.study.execute import run_study
from trainwell.study.failures import FailedRun, failed_runs, failure_summary
from trainwell.study.store import Store, default_url

TINY = {"epochs": 2, "batch_size": 32, "data": {"train_size": 120}, "model": {"hidden": [16]}}


def _raw(ablation: dict, **extra) -> dict:
    return {**TINY, **extra, "ablation": ablation}


def test_failed_runs_are_recorded_and_the_study_goes_on(tmp_path):
    variants = {
        "diverges": {
            "optimizer.name": "sgd",
            "optimizer.lr": 1e6,
            "gradients.skip_nonfinite": False,
        },
    }
    store = Store("sqlite://")
    sid = run_study(_raw({"seeds": 1, "grid": {"l2": [1e-3]}, "variants": variants}), store)
    runs = {r["variant"]: r for r in store.runs(sid)}
    assert {v: r["status"] for v, r in runs.items()} == {
        "base": "done", "l2=0.001": "done", "diverges": "failed"
    }  # fmt: skip
    error = runs["diverges"]["error"]
    assert error.startswith("FloatingPointError: training diverged: non-finite train loss")
    assert "\n" not in error and "Traceback" not in error
    assert runs["base"]["final"]["test_acc"] > 0 and runs["base"]["epochs_run"] == 2
    assert store.pending(sid) == []  # failed runs are finished; retry_failed picks them up
    assert len(store.pending(sid, retry_failed=True)) == 1
    assert failed_runs(store, sid) == [FailedRun("diverges", "all data", 0, error)]
    summary = failure_summary(store, sid, tmp_path)
    assert summary == (
        f"1 of 3 runs failed; their messages are in {tmp_path / 'failures.txt'} "
        "(rerun with --retry-failed)"
    )
    text = (tmp_path / "failures.txt").read_text(encoding="utf-8")
    assert "variant: diverges" in text and f"error:   {error}" in text and "seed:    0" in text
    with pytest.raises(ValueError, match="jobs"):
        run_study(_raw({}), store, jobs=0)


def test_an_invalid_variant_fails_the_study_before_the_store_is_written():
    store = Store("sqlite://")
    raw = _raw({"seeds": 2, "grid": {"l2": [1e-3]}, "variants": {"bad": {"model.dropout": 2.0}}})
    with pytest.raises(ConfigError, match=r"^ablation\.variants\.bad \(variant bad\): model"):
        run_study(raw, store)
    assert store.study_names() == []  # nothing planned, nothing trained


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
