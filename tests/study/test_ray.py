"""The Ray executor on a real local Ray instance: the same runs as the local pool, run for run."""

from __future__ import annotations

import sys

import pytest
import ray

from trainwell.app.config import ConfigError
from trainwell.study import executors
from trainwell.study.execute import run_study
from trainwell.study.store import Store, default_url

TINY = {"epochs": 2, "batch_size": 32, "data": {"train_size": 120}, "model": {"hidden": [16]}}
DIVERGES = {"optimizer.name": "sgd", "optimizer.lr": 1e30, "gradients.skip_nonfinite": False}
QUIET = {  # a small, quiet Ray for a 2-core machine
    "RAY_AUTH_MODE": "disabled",  # no token written to ~/.ray, no warning
    "RAY_USAGE_STATS_ENABLED": "0",
}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One real local Ray instance with 2 CPUs for the whole module."""
    with pytest.MonkeyPatch.context() as env:
        for key, value in QUIET.items():
            env.setenv(key, value)
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            object_store_memory=80 * 2**20,
        )
        try:
            yield
        finally:
            ray.shutdown()


def _study(**ablation) -> dict:
    return {**TINY, "ablation": {"seeds": 2, **ablation}}


def _runs(store: Store) -> dict:
    """``{(variant, data, seed): what the run stored}``, what must not depend on the executor."""
    keep = ("status", "error", "final", "epochs_run", "steps", "n_params")
    return {
        (r["variant"], r["data"], r["seed"]): {
            **{k: r[k] for k in keep},
            "history": {k: v for k, v in r["history"].items() if k != "seconds"},
        }
        for r in store.runs(store.study_id())
    }


def test_ray_runs_equal_the_local_pool_runs_and_a_rerun_trains_nothing(tmp_path):
    raw = _study(
        grid={"l2": [1e-3]},
        variants={"diverges": DIVERGES},
        resources={"cpus": 1, "gpus": 0},
    )
    local, on_ray = Store(default_url(tmp_path)), Store(f"sqlite:///{tmp_path / 'ray.sqlite'}")
    run_study(raw, local, jobs=2)
    sid = run_study(raw, on_ray, jobs=2, executor="ray")
    assert _runs(on_ray) == _runs(local)  # bitwise: seeded, one torch thread each
    runs = _runs(on_ray)
    assert len(runs) == 6 and {k[0] for k in runs} == {"base", "l2=0.001", "diverges"}
    assert {k[0]: r["status"] for k, r in runs.items()} == {
        "base": "done", "l2=0.001": "done", "diverges": "failed"
    }  # fmt: skip
    error = runs[("diverges", "all data", 0)]["error"]
    assert error.startswith("FloatingPointError: training diverged: non-finite train loss")
    assert runs[("base", "all data", 1)]["final"]["test_acc"] > 0

    before = {r["id"]: (r["attempts"], r["started"], r["finished"]) for r in on_ray.runs(sid)}
    assert {a for a, _, _ in before.values()} == {1}  # each run claimed and trained once
    assert run_study(raw, on_ray, jobs=2, executor="ray") == sid
    after = {r["id"]: (r["attempts"], r["started"], r["finished"]) for r in on_ray.runs(sid)}
    assert after == before  # nothing claimed, nothing trained again


CRASHES = """
import os
from pathlib import Path

import torch


def make(n_features, n_classes, marker, crashes):
    marker = Path(marker)
    count = int(marker.read_text()) if marker.exists() else 0
    marker.write_text(str(count + 1))
    Path(marker.parent / "gpus.txt").write_text(repr(os.environ.get("CUDA_VISIBLE_DEVICES")))
    if count < crashes:
        os._exit(1)  # the worker process dies, as with its node
    return torch.nn.Sequential(torch.nn.Linear(n_features, 8), torch.nn.Linear(8, n_classes))
"""


def test_a_run_lost_with_its_worker_is_retried_then_stored_as_done(tmp_path, monkeypatch):
    monkeypatch.setattr(executors, "RETRIES", 1)  # each retry starts a worker: ~2 s
    code, marker = tmp_path / "crashy.py", tmp_path / "attempts.txt"
    code.write_text(CRASHES, encoding="utf-8")
    crashes = executors.RETRIES + 1  # Ray's own retries run out; the driver's resubmits it
    model = {"target": f"{code}:make", "args": {"marker": str(marker), "crashes": crashes}}
    raw = {**TINY, "model": model, "ablation": {"seeds": 1}}
    store = Store(default_url(tmp_path))
    sid = run_study(raw, store, executor="ray")
    [run] = store.runs(sid)
    assert run["status"] == "done", run["error"]
    assert int(marker.read_text()) == crashes + 1 and run["attempts"] == 1
    assert (tmp_path / "gpus.txt").read_text() == "''"  # gpus = 0: no GPU is visible

    marker.unlink()
    raw["model"]["args"]["crashes"] = 99  # more than every retry: a failed run, one line
    sid = run_study(raw, store, name="always-crashes", executor="ray")
    [run] = store.runs(sid)
    assert run["status"] == "failed" and int(marker.read_text()) == (executors.RETRIES + 1) ** 2
    assert run["error"].startswith("worker process failed: ") and "\n" not in run["error"]


def test_resources_are_checked_before_the_store_is_written():
    store = Store("sqlite://")
    bad = {"cpus": -1, "gpus": "one", "tpus": 1}
    with pytest.raises(ConfigError) as caught:
        run_study(_study(resources=bad), store, executor="ray")
    assert str(caught.value).splitlines() == [
        "ablation.resources: unknown key(s) ['tpus']; accepted: cpus, gpus",
        "ablation.resources.cpus must be a non-negative number, got -1",
        "ablation.resources.gpus must be a non-negative number, got 'one'",
    ]
    with pytest.raises(ConfigError, match=r"^ablation.resources must be a table"):
        run_study(_study(resources=2), store)
    assert store.study_names() == []
    assert executors.read_resources({"resources": {"cpus": 2.5}}).threads == 2
    assert executors.read_resources({}) == executors.Resources(cpus=1.0, gpus=0.0)


def test_executor_arguments_and_a_missing_ray_are_one_line_errors(monkeypatch):
    store = Store("sqlite://")
    with pytest.raises(ValueError, match=r"^executor must be 'local' or 'ray', got 'dask'$"):
        run_study(_study(), store, executor="dask")
    with pytest.raises(ValueError, match=r"^address 'head:6379' is the Ray cluster's"):
        run_study(_study(), store, address="head:6379")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ValueError) as caught:
        run_study(_study(), store, executor="ray")
    assert str(caught.value) == "--executor ray needs Ray: pip install 'trainwell[ray]'"
    assert store.study_names() == []  # said before anything is planned


def test_lost_tells_a_dead_worker_from_a_run_whose_code_raised():
    from ray import exceptions as rex

    assert executors.lost(rex.WorkerCrashedError())
    assert executors.lost(rex.NodeDiedError("node 1 died"))
    wrapped = rex.RayTaskError("task", "Traceback ...", rex.WorkerCrashedError())
    assert executors.lost(wrapped)
    assert not executors.lost(rex.RayTaskError("task", "Traceback ...", ValueError("bad")))
    assert not executors.lost(ValueError("bad"))
