"""Executing a planned study: every unfinished run, in this process or in worker processes.

Each (variant, data size, seed) is one run, planned in the results store first; a
study run again skips the runs that finished and restarts the ones a kill cut off.
A run that raises (invalid value, diverged loss) is stored as failed with its
message and the study goes on.
"""

from __future__ import annotations

import copy
import json
import math
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from typing import Any

from trainwell.app.config import validate
from trainwell.study.plan import PlannedRun, plan_study
from trainwell.study.store import Store


def execute_run(raw: dict[str, Any]) -> dict[str, Any]:
    """Train one run in this process; the payload the store keeps. Raises on failure."""
    import resource

    import torch

    from trainwell.app.runner import train

    started = time.perf_counter()
    config = validate(copy.deepcopy(raw))
    result, _ = train(config)
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
    return {
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


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def _safe_run(raw: dict[str, Any]) -> tuple[bool, Any]:
    """``(True, payload)`` or ``(False, "Error: message")``; never raises."""
    started = time.perf_counter()
    try:
        return True, execute_run(raw)
    except Exception as err:  # noqa: BLE001 - a failed run is data, not a crash
        message = str(err).strip().splitlines()
        text = f"{type(err).__name__}: {' '.join(message)}" if message else type(err).__name__
        return False, (text, time.perf_counter() - started)


def run_study(
    raw: dict[str, Any],
    store: Store,
    *,
    name: str = "study",
    seeds: int | None = None,
    jobs: int = 1,
    progress: bool = False,
    retry_failed: bool = False,
) -> int:
    """Plan the study in ``store``, run every unfinished run, and return the study id.

    ``jobs > 1`` trains in that many spawned worker processes with one torch thread
    each; ``jobs == 1`` trains in this process (with one torch thread too).
    """
    if jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs}")
    planned = plan_study(raw, seeds)
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
    todo = [i for i in store.pending(study_id, retry_failed) if i in by_id]
    tracker = _Tracker(total=len(planned), done=len(planned) - len(todo), enabled=progress)

    def record(run_id: int, ok: bool, payload: Any) -> None:
        if ok:
            store.finish(run_id, payload)
        else:
            store.fail(run_id, payload[0], payload[1])
        tracker.finished(ok)

    with tracker:
        if jobs == 1:
            import torch

            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                for run_id in todo:
                    store.start(run_id)
                    tracker.started()
                    record(run_id, *_safe_run(by_id[run_id].raw))
            finally:
                torch.set_num_threads(threads)
            return study_id
        context = get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init) as pool:
            queue = list(todo)
            running: dict[Future, int] = {}
            while queue or running:
                while queue and len(running) < jobs:
                    run_id = queue.pop(0)
                    store.start(run_id)
                    running[pool.submit(_safe_run, by_id[run_id].raw)] = run_id
                    tracker.started()
                finished, _ = wait(list(running), timeout=0.5, return_when=FIRST_COMPLETED)
                for future in finished:
                    run_id = running.pop(future)
                    try:
                        ok, payload = future.result()
                    except Exception as err:  # noqa: BLE001 - a worker died
                        ok, payload = False, (f"worker process failed: {err}", None)
                    record(run_id, ok, payload)
                tracker.tick()
    return study_id


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
