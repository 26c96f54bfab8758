"""Executing a planned study: every unfinished run, here, in worker processes or on Ray.

Each (variant, data size, seed) is one run, planned in the results store first; a
study run again skips the runs that finished and restarts the ones a kill cut off.
Several processes may run one study on a shared store: each claims free runs one at a
time, so every run is trained once (see :mod:`trainwell.study.store`).
Every planned run's config is checked before the store is touched
(:func:`trainwell.study.checks.check_study`), so a bad grid value fails the study at once.
A run that raises while training (diverged loss, user code that fails) is stored as
failed with a one-line message (:func:`trainwell.study.failures.error_line`) and the
study goes on; :func:`trainwell.study.failures.failure_summary` says which failed.
The local process pool is the default executor; ``executor="ray"`` trains each run as
a Ray task (:mod:`trainwell.study.executors`), and this process alone writes the store.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from typing import Any

from trainwell.app.config import validate
from trainwell.study.checks import check_study
from trainwell.study.executors import EXECUTORS, read_resources, require_ray, run_on_ray
from trainwell.study.failures import error_line
from trainwell.study.owners import new_owner, release_owner
from trainwell.study.plan import PlannedRun, plan_study, seed_bounds
from trainwell.study.sequential import comparisons, decide, next_seeds
from trainwell.study.store import DEFAULT_LEASE_S, Store


def execute_run(raw: dict[str, Any]) -> dict[str, Any]:
    """Train one run in this process; the payload the store keeps. Raises on failure."""
    import resource

    import torch

    from trainwell.app.runner import train

    started = time.perf_counter()
    config = validate(copy.deepcopy(raw))
    result, model = train(config)
    losses = [row.get("train_loss", 0.0) for row in result.history]
    bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
    if bad is not None or not all(math.isfinite(v) for v in result.test.values()):
        epoch = bad if bad is not None else len(losses) - 1
        raise FloatingPointError(f"training diverged: non-finite train loss at epoch {epoch}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    from trainwell.app.runner import resolve_device

    if torch.cuda.is_available() and resolve_device(config.device).startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    keep = ("step", "grad_norm")
    payload = {
        "history": result.history,
        "test": result.test,
        "extra": {k: v for k, v in result.extra.items() if isinstance(v, float) and "test" in k},
        "wall_seconds": time.perf_counter() - started,
        "train_seconds": result.seconds,
        "peak_memory_mb": peak,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "stop_reason": result.stop_reason,
        "steps": result.steps,
        "skipped_steps": result.skipped_steps,
        "n_params": result.n_params,
        "grad_trace": [{k: row[k] for k in keep if k in row} for row in result.grad_history],
    }
    from trainwell.study.seed_ensembles import run_predictions
    from trainwell.study.seed_soups import encode_weights

    # test-split predictions for ensembles of seeds (base64 float32 probabilities)
    payload["predictions"] = run_predictions(config, model)
    # soups of seeds: the starting-weights fingerprint, and the final weights of models up
    # to seed_soups.WEIGHTS_LIMIT values (base64 safetensors: JSON- and Ray-safe, no pickle)
    payload["init_hash"] = result.extra.get("init_hash")
    # a built-in model starts from the run's seed: its seeds never share a start
    payload["weights"] = encode_weights(model, keep=config.model.target is not None)
    return payload


def _worker_init() -> None:
    """One torch thread per worker, and the worker dies with the study's process."""
    from trainwell.app.lifetime import worker_init

    worker_init(threads=1)


def _safe_run(raw: dict[str, Any]) -> tuple[bool, Any]:
    """``(True, payload)`` or ``(False, ("Error: message", seconds))``; never raises."""
    started = time.perf_counter()
    try:
        return True, execute_run(raw)
    except Exception as err:  # noqa: BLE001 - a failed run is data, not a crash
        return False, (error_line(err), time.perf_counter() - started)


def run_study(
    raw: dict[str, Any],
    store: Store,
    *,
    name: str = "study",
    seeds: int | None = None,
    jobs: int | None = 1,
    progress: bool = False,
    retry_failed: bool = False,
    lease_s: float = DEFAULT_LEASE_S,
    executor: str = "local",
    address: str | None = None,
) -> int:
    """Plan the study in ``store``, run every unfinished run, and return the study id.

    Every run's config is checked first (:func:`~trainwell.study.checks.check_study`):
    a problem raises :class:`~trainwell.app.config.ConfigError`, one line each, before
    the store is written. Runs that fail while training do not raise: they are stored
    as failed; :func:`trainwell.study.failures.failure_summary` reports them.

    ``executor="local"`` (the default): ``jobs > 1`` trains in that many spawned worker
    processes with one torch thread each; ``jobs == 1`` trains in this process (with one
    torch thread too); ``jobs=None`` means ``min(4, CPUs)`` workers.
    ``executor="ray"``: each run is a Ray task asking for ``[ablation.resources]``, on
    the cluster at ``address`` (or a Ray started here); at most ``jobs`` runs are in
    flight (``None``: as many as the cluster fits); see :mod:`trainwell.study.executors`.
    Either way only this process writes the store.

    Several processes (on one machine or many) may run the same study on one store:
    each claims one free run at a time (:meth:`Store.claim`), renews its lease every
    ``lease_s / 3`` seconds while training, and stores the result only while the claim
    is still its own, so every run is trained and written once. A run whose claimer
    died is claimed again once its lease of ``lease_s`` seconds runs out, or at once
    when the claimer was a process of this machine that has exited (a killed study
    run again). The call returns when no run of the study is left, so every process
    sees the whole study finished.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be 'local' or 'ray', got {executor!r}")
    if address is not None and executor != "ray":
        raise ValueError(f"address {address!r} is the Ray cluster's: pass executor='ray' too")
    if jobs is not None and jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs}")
    if not lease_s > 0:
        raise ValueError(f"lease_s must be a positive number of seconds, got {lease_s}")
    if executor == "ray":
        require_ray()  # before anything is planned
    resources = read_resources(raw.get("ablation"))
    planned = check_study(raw, seeds)
    n_min, n_max = seed_bounds(raw, seeds)
    spec = {"ablation": raw.get("ablation", {}), "seeds": seeds, "runs": len(planned)}
    study_id = store.study(name, spec)
    by_id: dict[int, PlannedRun] = {}
    for position, run in enumerate(planned):
        config_text = json.dumps(run.raw, default=str)
        by_id[
            store.plan(
                study_id, run.variant, run.data, run.seed, position, run.overrides, config_text
            )
        ] = run
    retry_before = store.now() if retry_failed else None
    todo = [i for i in store.pending(study_id, retry_failed) if i in by_id]
    tracker = _Tracker(total=len(planned), done=len(planned) - len(todo), enabled=progress)
    owner = new_owner()
    lease = _Lease(store, owner, lease_s)
    claims = _Claims(store, study_id, by_id, owner, lease, tracker, lease_s, retry_before)
    local_jobs = jobs or max(1, min(4, os.cpu_count() or 1))

    def execute() -> None:
        if executor == "ray":
            run_on_ray(claims, _safe_run, jobs=jobs, resources=resources, address=address)
        elif local_jobs == 1:
            _run_here(claims)
        else:
            _run_in_pool(claims, local_jobs)

    try:
        with tracker, lease:
            execute()
            if n_max > n_min:
                _add_seeds(raw, store, study_id, claims, execute, n_min, n_max)
    finally:
        release_owner(owner)
    return study_id


def _add_seeds(
    raw: dict[str, Any],
    store: Store,
    study_id: int,
    claims: _Claims,
    execute: Any,
    n_min: int,
    n_max: int,
) -> None:
    """Seeds where they matter (``seeds = {min, max}``; :mod:`trainwell.study.sequential`).

    Each round: run what the store still holds pending (a round a kill cut off), else
    decide every comparison from the stored runs, plan the next seed of each undecided
    one below ``n_max`` and of the base of its data size, and run them with the same
    executor; stop when no comparison wants another seed. Decisions are recomputed
    from the store each round, so a study run again continues where it stopped.
    """
    full = plan_study(raw, all_seeds=True)
    where = {(r.data, r.variant, r.seed): (i, r) for i, r in enumerate(full)}
    first = min(r.seed for r in full)  # seeds are first, first + 1, ...
    section = raw.get("ablation", {})
    metric, correction = section.get("metric"), section.get("correction", "holm")
    while True:
        runs = store.runs(study_id)
        known = {r["id"]: where.get((r["data"], r["variant"], r["seed"])) for r in runs}
        batch = {i: known[i][1] for i in store.pending(study_id) if known.get(i) is not None}
        if not batch:
            found = decide(comparisons(runs, metric), n_min, n_max, correction)
            for data, variant, index in next_seeds(found, n_max):
                position, run = where[(data, variant, first + index)]
                config_text = json.dumps(run.raw, default=str)
                run_id = store.plan(
                    study_id, variant, data, run.seed, position, run.overrides, config_text
                )
                if store.status(run_id) == "pending":
                    batch[run_id] = run
        if not batch:
            return
        claims.by_id = batch
        claims.tracker.total += len(batch)
        execute()


class _Claims:
    """The study's runs for an executor: claim one in the store, its config, its result."""

    def __init__(
        self,
        store: Store,
        study_id: int,
        by_id: dict[int, PlannedRun],
        owner: str,
        lease: _Lease,
        tracker: _Tracker,
        lease_s: float,
        retry_before: float | None,
    ) -> None:
        self.store, self.study_id, self.by_id, self.owner = store, study_id, by_id, owner
        self.lease, self.tracker, self.lease_s = lease, tracker, lease_s
        self.retry_before = retry_before
        self.poll = min(0.5, lease_s / 4)  # seconds between asks while others hold runs

    def top_up(self, running: dict[Any, int], jobs: int, next_claim: float, submit: Any) -> float:
        """``submit(run_id)`` claimed runs until ``jobs`` are in flight or none is free;
        returns when to ask the store again (at once while runs were free)."""
        while len(running) < jobs and time.monotonic() >= next_claim:
            run_id = self.claim()
            if run_id is None:
                return time.monotonic() + self.poll
            submit(run_id)
        return next_claim

    def idle(self, next_claim: float) -> bool:
        """Nothing in flight: False when no run is left to anyone, else wait until
        ``next_claim`` and return True."""
        if not self.others_left():
            return False
        time.sleep(max(0.0, next_claim - time.monotonic()))
        return True

    def claim(self) -> int | None:
        run_id = self.store.claim(
            self.study_id,
            self.owner,
            self.lease_s,
            run_ids=self.by_id,
            retry_failed_before=self.retry_before,
        )
        if run_id is not None:
            self.lease.hold(run_id)
            self.tracker.started()
        return run_id

    def config(self, run_id: int) -> dict[str, Any]:
        return self.by_id[run_id].raw

    def others_left(self) -> bool:
        """Runs still pending or running elsewhere: wait, a dead claimer's run comes free."""
        return any(i in self.by_id for i in self.store.pending(self.study_id))

    def record(self, run_id: int, ok: bool, payload: Any) -> None:
        self.lease.drop(run_id)
        if ok:
            self.store.finish(run_id, payload, self.owner)  # False: the lease ran out
        else:
            self.store.fail(run_id, payload[0], payload[1], self.owner)
        self.tracker.finished(ok)

    def tick(self) -> None:
        self.tracker.tick()


def _run_here(claims: _Claims) -> None:
    """Every run in this process, one at a time, with one torch thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        while True:
            run_id = claims.claim()
            if run_id is not None:
                claims.record(run_id, *_safe_run(claims.config(run_id)))
            elif claims.others_left():
                time.sleep(claims.poll)
            else:
                break
    finally:
        torch.set_num_threads(threads)


def _run_in_pool(claims: _Claims, jobs: int) -> None:
    """Every run in ``jobs`` spawned worker processes with one torch thread each."""
    context = get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init) as pool:
        running: dict[Future, int] = {}

        def submit(run_id: int) -> None:
            running[pool.submit(_safe_run, claims.config(run_id))] = run_id

        next_claim = 0.0  # when to ask the store again after it had nothing free
        while True:
            next_claim = claims.top_up(running, jobs, next_claim, submit)
            if not running:
                if not claims.idle(next_claim):
                    break
                continue
            finished, _ = wait(list(running), timeout=0.5, return_when=FIRST_COMPLETED)
            for future in finished:
                run_id = running.pop(future)
                try:
                    ok, payload = future.result()
                except Exception as err:  # noqa: BLE001 - a worker died
                    text = f"worker process failed: {error_line(err)}"
                    ok, payload = False, (text, None)
                claims.record(run_id, ok, payload)
                next_claim = 0.0  # a slot is free: claim at once
            claims.tick()


class _Lease:
    """A daemon thread that renews this process's claims every ``lease_s / 3`` seconds."""

    def __init__(self, store: Store, owner: str, lease_s: float) -> None:
        self.store, self.owner, self.every = store, owner, lease_s / 3
        self.held: set[int] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def hold(self, run_id: int) -> None:
        with self.lock:
            self.held.add(run_id)

    def drop(self, run_id: int) -> None:
        with self.lock:
            self.held.discard(run_id)

    def __enter__(self) -> _Lease:
        if self.store.shared:  # nobody else can see an in-memory store
            self.thread = threading.Thread(target=self._beat, name="trainwell-lease", daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
        for run_id in sorted(self.held):  # left by an error or Ctrl-C: free them for others
            with contextlib.suppress(Exception):
                self.store.release(run_id, self.owner)

    def _beat(self) -> None:
        while not self.stop.wait(self.every):
            with self.lock:
                held = sorted(self.held)
            for run_id in held:
                try:
                    if not self.store.heartbeat(run_id, self.owner):
                        self.drop(run_id)  # taken over; finish() will say so too
                except Exception:  # noqa: BLE001 - a busy or unreachable store: try again
                    pass


class _Tracker:
    """A rich progress bar: runs done, running, failed, and the time left."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        self.total, self.done, self.running, self.failed = total, done, 0, 0
        self.enabled = enabled
        self.progress: Any = None

    def __enter__(self) -> _Tracker:
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("ablation"),
                BarColumn(),
                TextColumn("{task.fields[text]}"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            self.progress.start()
            self.task = self.progress.add_task(
                "runs", total=self.total, completed=self.done, text=""
            )
            self.tick()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.tick()
            self.progress.stop()

    def started(self) -> None:
        self.running += 1
        self.tick()

    def finished(self, ok: bool) -> None:
        self.running -= 1
        self.done += 1
        self.failed += 0 if ok else 1
        self.tick()

    def tick(self) -> None:
        if self.progress is not None:
            text = f"{self.done}/{self.total} done, {self.running} running, {self.failed} failed"
            self.progress.update(self.task, completed=self.done, text=text)
