"""Ablation studies: a base config and its variants x data sizes x seeds, in worker processes.

The ``[ablation]`` section of a run config describes the study::

    [ablation]
    mode = "one-at-a-time"          # or "grid": every combination of the grid keys
    seeds = 3
    [ablation.grid]                 # strength grids, one variant per value
    l2 = [1e-4, 1e-3]               # short names: l1 l2 weight_decay dropout.p clip.max_norm ...
    "model.dropout" = [0.2, 0.5]    # or any dotted config key
    "data.train_fraction" = [0.1, 0.3, 1.0]   # data.* keys are crossed with every variant
    [ablation.variants.ema]         # named variants switch several keys at once
    "ema.enabled" = true

Each (variant, data size, seed) is one run, planned in the results store first; a
study run again skips the runs that finished and restarts the ones a kill cut off.
A run that raises (invalid value, diverged loss) is stored as failed with its
message and the study goes on.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

from trainwell.config import apply_overrides, validate
from trainwell.store import Store

ALIASES = {
    "l1": "regularization.l1",
    "l2": "regularization.l2",
    "max_norm": "regularization.max_norm",
    "weight_decay": "optimizer.weight_decay",
    "lr": "optimizer.lr",
    "dropout.p": "dropout.p",
    "dropout": "dropout.p",
    "clip.max_norm": "gradients.clip.max_norm",
    "clip.value": "gradients.clip.value",
    "clip.mode": "gradients.clip.mode",
    "accumulate": "gradients.accumulate",
    "early_stopping": "early_stopping.enabled",
    "patience": "early_stopping.patience",
    "ema": "ema.enabled",
    "swa": "swa.enabled",
    "train_fraction": "data.train_fraction",
    "train_size": "data.train_size",
}
SPEC_KEYS = {"name", "mode", "seeds", "grid", "variants", "base"}


@dataclass
class PlannedRun:
    """One run of a study: its variant and data labels, seed and full raw config."""

    variant: str
    data: str
    seed: int
    overrides: dict[str, Any]
    raw: dict[str, Any] = field(repr=False)


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resolve_key(key: str) -> str:
    """The dotted config key of a grid key or its short name.

    Example:
        >>> resolve_key("l2"), resolve_key("clip.max_norm"), resolve_key("model.dropout")
        ('regularization.l2', 'gradients.clip.max_norm', 'model.dropout')
    """
    return ALIASES.get(key, key)


def _label(overrides: dict[str, Any]) -> str:
    parts = []
    for key, value in overrides.items():
        aliases = [a for a, k in ALIASES.items() if k == key]
        short = min(aliases, key=len) if aliases else key
        shown = (
            "on"
            if value is True
            else "off"
            if value is False
            else f"{value:g}"
            if isinstance(value, float)
            else str(value)
        )
        parts.append(f"{short}={shown}")
    return ", ".join(parts)


def _with_implied(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides plus what they need to take effect (a clip threshold switches clipping on)."""
    out = dict(overrides)
    clip_mode = raw.get("gradients", {}).get("clip", {}).get("mode", "none")
    if "gradients.clip.mode" not in out and clip_mode == "none":
        if "gradients.clip.max_norm" in out:
            out["gradients.clip.mode"] = "norm"
        elif "gradients.clip.value" in out:
            out["gradients.clip.mode"] = "value"
    return out


def plan_study(raw: dict[str, Any], seeds: int | None = None) -> list[PlannedRun]:
    """Every run of the study the ``[ablation]`` section of ``raw`` describes.

    Variants whose config equals the base config (e.g. ``l2 = 0`` when the base has
    no L2) are dropped: they are the base run. Seeds are ``seed, seed+1, ...``.

    Example:
        >>> runs = plan_study({"ablation": {"seeds": 2, "grid": {"l2": [0, 1e-3]}}})
        >>> [(r.variant, r.seed) for r in runs]
        [('base', 0), ('l2=0.001', 0), ('base', 1), ('l2=0.001', 1)]
    """
    spec = raw.get("ablation", {})
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ValueError(
            f"ablation: unknown key(s) {sorted(unknown)}; accepted: {sorted(SPEC_KEYS)}"
        )
    mode = spec.get("mode", "one-at-a-time")
    if mode not in ("one-at-a-time", "grid"):
        raise ValueError(f"ablation.mode must be 'one-at-a-time' or 'grid', got {mode!r}")
    n_seeds = int(seeds if seeds is not None else spec.get("seeds", 3))
    if n_seeds < 1:
        raise ValueError(f"seeds must be a positive integer, got {n_seeds}")
    base = {k: v for k, v in raw.items() if k != "ablation"}
    base = apply_overrides(copy.deepcopy(base), _flatten(spec.get("base", {})))
    grid = {resolve_key(k): v for k, v in _flatten(spec.get("grid", {})).items()}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(
                f"ablation.grid.{key} must be a non-empty list of values, got {values!r}"
            )
    data_axes = {k: v for k, v in grid.items() if k.startswith("data.")}
    axes = {k: v for k, v in grid.items() if not k.startswith("data.")}
    variants: list[tuple[str, dict[str, Any]]] = [("base", {})]
    if mode == "grid" and axes:
        for combo in itertools.product(*axes.values()):
            variants.append(("", dict(zip(axes, combo, strict=False))))
    else:
        variants += [("", {k: v}) for k, values in axes.items() for v in values]
    for name, table in spec.get("variants", {}).items():
        if not isinstance(table, dict):
            raise ValueError(f"ablation.variants.{name} must be a table of config keys")
        variants.append((name, {resolve_key(k): v for k, v in _flatten(table).items()}))
    datas = [
        dict(zip(data_axes, combo, strict=False))
        for combo in itertools.product(*data_axes.values())
    ]
    base_seed = int(base.get("seed", 0))
    runs: list[PlannedRun] = []
    for seed_index in range(n_seeds):
        for data in datas or [{}]:
            data_label = _label(data) or "all data"
            seen: list[str] = []
            for name, given in variants:
                overrides = _with_implied(base, given)
                cfg = apply_overrides(copy.deepcopy(base), {**data, **overrides})
                cfg["seed"] = base_seed + seed_index
                key = json.dumps(_canonical(cfg), sort_keys=True, default=str)
                if key in seen:
                    continue
                seen.append(key)
                label = name or _label(given)
                runs.append(PlannedRun(label, data_label, base_seed + seed_index, overrides, cfg))
    return runs


def _canonical(raw: dict[str, Any]) -> Any:
    """The validated config as a dict (so ``l2 = 0`` equals no l2); raw when invalid."""
    try:
        return validate(copy.deepcopy(raw)).model_dump(mode="json")
    except ValueError:
        return raw


def execute_run(raw: dict[str, Any]) -> dict[str, Any]:
    """Train one run in this process; the payload the store keeps. Raises on failure."""
    import resource

    import torch

    from trainwell.runner import train

    started = time.perf_counter()
    config = validate(copy.deepcopy(raw))
    result, _ = train(config)
    losses = [row.get("train_loss", 0.0) for row in result.history]
    bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
    if bad is not None or not all(math.isfinite(v) for v in result.test.values()):
        epoch = bad if bad is not None else len(losses) - 1
        raise FloatingPointError(f"training diverged: non-finite train loss at epoch {epoch}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if torch.cuda.is_available() and config.device.startswith("cuda"):
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
