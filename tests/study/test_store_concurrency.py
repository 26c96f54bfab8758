"""Several processes on one results store, on SQLite and on a real PostgreSQL server.

Two processes that run the same study at once train every run once, write no row twice
and get the results of one process; a killed co-runner's run is trained again by the
other; ten processes opening a fresh store at once never raise; a dead claimer's run is
claimed again, and a stale finisher writes nothing. The PostgreSQL cases start a
throwaway server (tests/study/postgres.py) and skip with the reason where they cannot.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w
from sqlalchemy import Column, Float, Integer, MetaData, String, Table, Text, create_engine, text

from tests.study import postgres
from trainwell.study import execute
from trainwell.study.execute import _Lease, _safe_run, run_study
from trainwell.study.owners import new_owner, release_owner
from trainwell.study.store import Store

ROOT = Path(__file__).resolve().parents[2]
TINY = {"epochs": 2, "batch_size": 32, "data": {"train_size": 120}, "model": {"hidden": [16]}}
RAW = {**TINY, "ablation": {"seeds": 3, "grid": {"l2": [1e-3]}}}  # 6 runs
N_RUNS = 6
SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture(scope="module")
def pg_server() -> Iterator[str]:
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(postgres.server())
        except postgres.Unavailable as err:
            pytest.skip(f"no PostgreSQL server for the concurrency tests: {err}")
        yield url


def _fresh_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a new, empty store on ``backend``."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / f'{uuid.uuid4().hex[:8]}.sqlite'}"
    server = request.getfixturevalue("pg_server")
    return postgres.create_database(server, f"s{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def fresh(backend: str, request: pytest.FixtureRequest, tmp_path: Path):
    return lambda: _fresh_url(backend, request, tmp_path)


@pytest.fixture(scope="module")
def reference() -> dict:
    """The final metrics of the study run by one process into an in-memory store."""
    store = Store("sqlite://")
    return _finals(store, run_study(RAW, store))


def _finals(store: Store, study_id: int) -> dict:
    def clean(values: dict) -> dict:
        return {k: None if math.isnan(v) else v for k, v in values.items()}

    return {(r["variant"], r["seed"]): clean(r["final"]) for r in store.runs(study_id)}


def _duplicates(store: Store) -> tuple[int, int]:
    """Rows stored more than once: (epoch_metric, final_metric)."""
    with store.engine.connect() as conn:
        epochs = conn.execute(text(
            "SELECT count(*) FROM (SELECT run_id FROM epoch_metric"
            " GROUP BY run_id, epoch, name HAVING count(*) > 1) AS d"
        )).scalar()  # fmt: skip
        finals = conn.execute(text(
            "SELECT count(*) FROM (SELECT run_id FROM final_metric"
            " GROUP BY run_id, name HAVING count(*) > 1) AS d"
        )).scalar()  # fmt: skip
    return int(epochs), int(finals)


def _check_study(url: str, reference: dict, attempts: int = 1) -> list[dict]:
    """Every run done, no duplicate rows, each run with its curves, results as one process."""
    store = Store(url)
    study_id = store.study_id("study")
    runs = store.runs(study_id)
    assert len(runs) == N_RUNS and {r["status"] for r in runs} == {"done"}
    assert _duplicates(store) == (0, 0)
    assert all(len(r["history"]["val_loss"]) == TINY["epochs"] for r in runs)  # no doubled curve
    assert sum(r["attempts"] for r in runs) == N_RUNS - 1 + attempts
    assert _finals(store, study_id) == reference
    return runs


def _counting_run(raw: dict) -> tuple:
    """``_safe_run`` that first notes the run in the marker file (one line per training)."""
    with open(os.environ["TRAINWELL_TEST_MARKER"], "a") as f:
        f.write(json.dumps([raw.get("seed"), raw.get("regularization")], sort_keys=True) + "\n")
    return _safe_run(raw)


def _study_process(url: str, barrier, jobs: int, marker: str) -> None:
    os.environ["TRAINWELL_TEST_MARKER"] = marker  # the pool's workers inherit it
    execute._safe_run = _counting_run  # type: ignore[assignment]
    barrier.wait(timeout=120)
    run_study(RAW, Store(url), jobs=jobs)  # opening the fresh store is part of the race


def test_two_processes_train_every_run_once(backend, fresh, reference, tmp_path):
    url, marker = fresh(), tmp_path / "trained.txt"
    barrier = SPAWN.Barrier(2)
    # both loops (in process, and a pool of two workers) on PostgreSQL; the pool's own
    # process start costs seconds on a small machine, so SQLite runs two in-process loops
    jobs = (1, 2) if backend == "postgresql" else (1, 1)
    processes = [
        SPAWN.Process(target=_study_process, args=(url, barrier, j, str(marker))) for j in jobs
    ]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=180)
    assert [p.exitcode for p in processes] == [0, 0]
    trained = Counter(marker.read_text().splitlines())
    assert len(trained) == N_RUNS and set(trained.values()) == {1}, trained
    _check_study(url, reference)


def _cli(config: Path, url: str, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "trainwell", "ablate", str(config), "--db", url]
    command += ["--out", str(out), "--jobs", "1", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_a_killed_co_runners_run_is_trained_by_the_other(fresh, reference, tmp_path):
    url, config = fresh(), tmp_path / "study.toml"
    config.write_text(tomli_w.dumps({**RAW, "ablation": {**RAW["ablation"], "name": "study"}}))
    Store(url)  # the tables, so both CLIs and the watcher can read at once
    victim = _cli(config, url, tmp_path / "a")
    other = _cli(config, url, tmp_path / "b")
    engine = Store(url).engine
    query = text("SELECT id FROM run WHERE status = 'running' AND owner LIKE :pid")
    deadline, held = time.monotonic() + 90, None
    while held is None and time.monotonic() < deadline and victim.poll() is None:
        with engine.connect() as conn:
            held = conn.execute(query, {"pid": f"%:{victim.pid}:%"}).scalar()
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert held is not None, "the victim finished before it held a run"
    _, err = other.communicate(timeout=180)
    assert other.returncode == 0, err.decode()
    runs = {r["id"]: r for r in _check_study(url, reference, attempts=2)}
    assert runs[held]["attempts"] == 2 and f":{other.pid}:" in runs[held]["owner"]


def test_ten_processes_open_a_fresh_store_at_once(fresh):
    urls = [fresh() for _ in range(4)]
    barrier, results = SPAWN.Barrier(10), SPAWN.Queue()
    processes = [
        SPAWN.Process(target=postgres.open_fresh_stores, args=(urls, barrier, results))
        for _ in range(10)
    ]
    for p in processes:
        p.start()
    outcomes = [results.get(timeout=180) for _ in processes]
    for p in processes:
        p.join(timeout=30)
    errors = [o for out in outcomes for o in out if isinstance(o, str)]
    assert errors == []
    for i, url in enumerate(urls):  # every process got the same study and runs
        assert len({json.dumps(out[i]) for out in outcomes}) == 1
        with Store(url).engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM study")).scalar() == 1
            assert conn.execute(text("SELECT count(*) FROM run")).scalar() == 4


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


PAYLOAD = {
    "history": [{"epoch": 0, "val_loss": 1.0}, {"epoch": 1, "val_loss": 0.5}],
    "test": {"test_acc": 0.75},
}


def test_a_dead_claim_is_claimed_again_and_a_stale_finisher_writes_nothing(fresh):
    store = Store(fresh())
    sid = store.study("s", {})
    first, second, third = (store.plan(sid, "v", "d", s, s, {}, "{}") for s in range(3))
    host = new_owner().split(":")[0]
    dead = f"{host}:{_dead_pid()}:gone"
    assert store.claim(sid, dead) == first
    with store.engine.begin() as conn:  # a partial row the dead attempt left
        conn.execute(text(f"INSERT INTO epoch_metric (run_id, epoch, name, value) "
                          f"VALUES ({first}, 0, 'val_loss', 9.0)"))  # fmt: skip
    alive = new_owner()
    assert store.claim(sid, alive) == first  # its owner's PID is gone: free at once
    assert store.runs(sid)[0]["history"] == {}  # the dead attempt's rows dropped by the claim
    assert store.finish(first, PAYLOAD, alive)
    assert not store.finish(first, PAYLOAD, dead)  # the dead attempt's finish lands nowhere
    assert not store.fail(first, "late", None, dead)

    remote = "another-machine:123:abc"  # never known dead: only its lease frees the run
    assert store.claim(sid, remote) == second
    taker = new_owner()
    assert store.claim(sid, taker, lease_s=60) == third  # the fresh remote claim is kept
    assert store.claim(sid, taker, lease_s=60) is None
    time.sleep(0.3)
    assert store.claim(sid, taker, lease_s=0.2) == second  # the lease ran out
    assert not store.heartbeat(second, remote)
    assert store.finish(second, PAYLOAD, taker) and store.finish(third, PAYLOAD, taker)
    assert not store.finish(second, {**PAYLOAD, "test": {"test_acc": 0.1}}, remote)
    runs = store.runs(sid)
    assert [r["status"] for r in runs] == ["done"] * 3 and _duplicates(store) == (0, 0)
    assert [r["final"]["test_acc"] for r in runs] == [0.75] * 3  # nothing overwritten
    assert [r["history"]["val_loss"] for r in runs] == [[1.0, 0.5]] * 3
    assert [r["attempts"] for r in runs] == [2, 2, 1]
    time.sleep(0.05)  # finished runs are never claimed again, whatever the lease
    assert store.claim(sid, new_owner(), lease_s=0.01, retry_failed_before=time.time()) is None
    release_owner(alive)
    release_owner(taker)


def test_the_lease_keeps_a_long_run_and_gives_back_what_it_holds(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'lease.sqlite'}")
    sid = store.study("s", {})
    rid = store.plan(sid, "v", "d", 0, 0, {}, "{}")
    owner, other = new_owner(), new_owner()
    assert store.claim(sid, owner, lease_s=0.3) == rid
    lease = _Lease(store, owner, lease_s=0.3)
    lease.hold(rid)
    with lease:
        for _ in range(4):  # longer than the lease, renewed every 0.1 s
            time.sleep(0.25)
            assert store.claim(sid, other, lease_s=0.3) is None
    # leaving the lease with the run still held (an error, Ctrl-C) gives it back at once
    assert store.status(rid) == "pending" and not store.release(rid, owner)
    assert store.claim(sid, other, lease_s=60) == rid
    release_owner(other)  # this process says the owner is done: its claim is free at once
    assert store.claim(sid, owner, lease_s=60) == rid and not store.release(rid, other)
    release_owner(owner)


def test_a_store_made_before_claims_is_upgraded(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    old = MetaData()  # the schema of a store written before claims existed (no owner columns)
    Table("study", old, Column("id", Integer, primary_key=True), Column("name", String(200)),
          Column("created", String(40)), Column("spec", Text))  # fmt: skip
    Table("run", old, Column("id", Integer, primary_key=True), Column("study_id", Integer),
          Column("variant", String(200)), Column("data", String(200)), Column("seed", Integer),
          Column("position", Integer), Column("overrides", Text), Column("config", Text),
          Column("status", String(20)), Column("error", Text), Column("wall_seconds", Float),
          Column("started", String(40)), Column("finished", String(40)))  # fmt: skip
    engine = create_engine(url)
    old.create_all(engine)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO study (id, name) VALUES (1, 'study')"))
        conn.execute(text("INSERT INTO run (id, study_id, variant, data, seed, position, status)"
                          " VALUES (1, 1, 'v', 'd', 0, 0, 'done'),"
                          " (2, 1, 'v', 'd', 1, 1, 'running')"))  # fmt: skip
    engine.dispose()
    store = Store(url)  # adds the claim columns
    owner = new_owner()
    assert store.claim(1, owner) == 2  # killed by an older version: no owner, free
    assert store.claim(1, owner) is None  # the done run stays done
    release_owner(owner)


def test_a_postgresql_url_without_the_driver_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if "psycopg" in name else real(name, *a)
    )
    with pytest.raises(
        ValueError,
        match=r"^postgresql needs the psycopg driver, which is not installed: "
        r"pip install 'trainwell\[postgres\]'$",
    ):
        Store("postgresql://user@localhost/db")
