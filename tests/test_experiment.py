"""Ablation planning, failure handling, and kill/resume of a study."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w

from trainwell.demo_study import DEMO_TOML, demo_config
from trainwell.experiment import plan_study, resolve_key, run_study
from trainwell.store import Store, default_url

TINY = {"epochs": 2, "batch_size": 32, "data": {"train_size": 120}, "model": {"hidden": [16]}}


def _raw(ablation: dict, **extra) -> dict:
    return {**TINY, **extra, "ablation": ablation}


def test_one_at_a_time_crossed_with_data_and_seeds():
    grid = {"l2": [0, 1e-3, 1e-2], "dropout.p": [0.2], "data.train_fraction": [0.5, 1.0]}
    runs = plan_study(_raw({"seeds": 3, "grid": grid}))
    # l2 = 0 equals the base config and is dropped: base + 2 l2 + 1 dropout, x 2 data x 3 seeds
    assert len(runs) == 4 * 2 * 3
    assert {r.variant for r in runs} == {"base", "l2=0.001", "l2=0.01", "dropout=0.2"}
    assert {r.data for r in runs} == {"train_fraction=0.5", "train_fraction=1"}
    assert sorted({r.seed for r in runs}) == [0, 1, 2]
    run = next(r for r in runs if r.variant == "l2=0.01" and r.data == "train_fraction=0.5")
    assert run.raw["regularization"]["l2"] == 0.01 and run.raw["data"]["train_fraction"] == 0.5
    assert run.raw["seed"] == run.seed and "ablation" not in run.raw


def test_grid_mode_is_the_cartesian_product():
    grid = {"l2": [1e-4, 1e-3], "clip.max_norm": [0.5, 1.0, 2.0]}
    runs = plan_study(_raw({"seeds": 1, "mode": "grid", "grid": grid}))
    assert len(runs) == 1 + 2 * 3
    combo = next(r for r in runs if r.variant == "l2=0.001, clip.max_norm=2")
    # a clip threshold switches clipping on when the base has it off
    assert combo.raw["gradients"]["clip"] == {"max_norm": 2.0, "mode": "norm"}


def test_named_variants_and_seed_override():
    variants = {"ema": {"ema.enabled": True}, "acc": {"gradients": {"accumulate": 2}}}
    runs = plan_study(_raw({"seeds": 5, "variants": variants}), seeds=2)
    assert [(r.variant, r.seed) for r in runs] == [
        ("base", 0), ("ema", 0), ("acc", 0), ("base", 1), ("ema", 1), ("acc", 1)
    ]  # fmt: skip
    assert runs[2].raw["gradients"]["accumulate"] == 2
    assert resolve_key("weight_decay") == "optimizer.weight_decay"


@pytest.mark.parametrize(
    ("ablation", "match"),
    [
        ({"mode": "random"}, "ablation.mode must be"),
        ({"grids": {}}, "unknown key"),
        ({"grid": {"l2": 0.1}}, "non-empty list"),
        ({"seeds": 0}, "seeds must be a positive integer"),
        ({"variants": {"x": 1}}, "must be a table"),
    ],
)
def test_bad_spec_raises(ablation, match):
    with pytest.raises(ValueError, match=match):
        plan_study(_raw(ablation))


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


def test_demo_config_matches_the_example_and_covers_every_technique():
    root = Path(__file__).resolve().parents[1]
    assert (root / "examples" / "ablation.toml").read_text(encoding="utf-8") == DEMO_TOML
    raw = demo_config()
    runs = plan_study(raw, seeds=1)
    keys = {k for r in runs for k in r.overrides}
    for key in ("regularization.l1", "regularization.l2", "dropout.p", "optimizer.weight_decay",
                "gradients.clip.max_norm", "gradients.accumulate", "early_stopping.enabled",
                "ema.enabled", "swa.enabled"):  # fmt: skip
        assert key in keys


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
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
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
