"""The results store of an ablation study: SQLAlchemy tables, SQLite by default.

Four tables: ``study`` (one row per study), ``run`` (one per variant x data size x
seed, with its config, status, error, wall time and peak memory), ``epoch_metric``
(one row per run, epoch and metric) and ``final_metric`` (one per run and metric).
Any SQLAlchemy URL works (``sqlite:///DIR/results.sqlite`` is the default;
``postgresql://...`` lets several machines share one study). Only the main process
of a study writes, so SQLite needs no locking beyond its own.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine

metadata = MetaData()

study_table = Table(
    "study",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), unique=True, nullable=False),
    Column("created", String(40)),
    Column("spec", Text),
)
run_table = Table(
    "run",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_id", Integer, ForeignKey("study.id"), nullable=False),
    Column("variant", String(200), nullable=False),
    Column("data", String(200), nullable=False),
    Column("seed", Integer, nullable=False),
    Column("position", Integer),
    Column("overrides", Text),
    Column("config", Text),
    Column("status", String(20), nullable=False),
    Column("error", Text),
    Column("wall_seconds", Float),
    Column("train_seconds", Float),
    Column("peak_memory_mb", Float),
    Column("epochs_run", Integer),
    Column("best_epoch", Integer),
    Column("stop_reason", String(40)),
    Column("steps", Integer),
    Column("skipped_steps", Integer),
    Column("n_params", Integer),
    Column("grad_trace", Text),
    Column("started", String(40)),
    Column("finished", String(40)),
    UniqueConstraint("study_id", "variant", "data", "seed"),
)
epoch_table = Table(
    "epoch_metric",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("run.id"), nullable=False, index=True),
    Column("epoch", Integer, nullable=False),
    Column("name", String(60), nullable=False),
    Column("value", Float),
)
final_table = Table(
    "final_metric",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("run.id"), nullable=False, index=True),
    Column("name", String(60), nullable=False),
    Column("value", Float),
)

FINISHED = ("done", "failed")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _num(value: Any) -> float | None:
    """A float for the database; NaN and Inf are stored as NULL."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def default_url(directory: str | Path) -> str:
    """The SQLite URL of ``DIR/results.sqlite``.

    Example:
        >>> default_url("runs/x")
        'sqlite:///runs/x/results.sqlite'
    """
    return f"sqlite:///{Path(directory) / 'results.sqlite'}"


class Store:
    """A study's results in a SQL database.

    Example:
        >>> store = Store("sqlite://")  # in memory
        >>> sid = store.study("demo", {"seeds": 1})
        >>> rid = store.plan(sid, "base", "all data", 0, 0, {}, "{}")
        >>> store.finish(rid, {"test": {"test_acc": 0.9}, "history": [{"epoch": 0, "val_loss": 1}]})
        >>> store.runs(sid)[0]["final"]["test_acc"], store.pending(sid)
        (0.9, [])
    """

    def __init__(self, url: str) -> None:
        if not isinstance(url, str) or "://" not in url:
            raise ValueError(f"db url must be a SQLAlchemy URL like sqlite:///path.db, got {url!r}")
        self.url = url
        self.engine: Engine = create_engine(url)
        metadata.create_all(self.engine)

    def study(self, name: str, spec: dict[str, Any]) -> int:
        """The id of the study called ``name``, created if new (its spec is updated)."""
        with self.engine.begin() as conn:
            row = conn.execute(select(study_table.c.id).where(study_table.c.name == name)).first()
            if row is not None:
                conn.execute(
                    update(study_table)
                    .where(study_table.c.id == row[0])
                    .values(spec=json.dumps(spec))
                )
                return int(row[0])
            values = {"name": name, "created": _now(), "spec": json.dumps(spec)}
            return int(conn.execute(insert(study_table).values(**values)).inserted_primary_key[0])

    def study_names(self) -> list[str]:
        with self.engine.connect() as conn:
            return [
                r[0] for r in conn.execute(select(study_table.c.name).order_by(study_table.c.id))
            ]

    def study_id(self, name: str | None = None) -> int:
        """The id of the named study, or of the newest one when ``name`` is None."""
        with self.engine.connect() as conn:
            query = select(study_table.c.id).order_by(study_table.c.id.desc())
            if name is not None:
                query = query.where(study_table.c.name == name)
            row = conn.execute(query).first()
        if row is None:
            raise ValueError(f"no study {name or ''} in {self.url}".replace("  ", " "))
        return int(row[0])

    def plan(
        self,
        study_id: int,
        variant: str,
        data: str,
        seed: int,
        position: int,
        overrides: dict,
        config: str,
    ) -> int:
        """The id of a planned run, inserted as pending if it is not in the store yet."""
        key = (
            (run_table.c.study_id == study_id)
            & (run_table.c.variant == variant)
            & (run_table.c.data == data)
            & (run_table.c.seed == seed)
        )
        with self.engine.begin() as conn:
            row = conn.execute(select(run_table.c.id).where(key)).first()
            if row is not None:
                conn.execute(update(run_table).where(key).values(position=position))
                return int(row[0])
            values = dict(
                study_id=study_id,
                variant=variant,
                data=data,
                seed=seed,
                position=position,
                overrides=json.dumps(overrides),
                config=config,
                status="pending",
            )
            return int(conn.execute(insert(run_table).values(**values)).inserted_primary_key[0])

    def status(self, run_id: int) -> str:
        with self.engine.connect() as conn:
            return str(
                conn.execute(select(run_table.c.status).where(run_table.c.id == run_id)).scalar()
            )

    def pending(self, study_id: int, retry_failed: bool = False) -> list[int]:
        """Ids of the runs still to do (pending, or running when a study was killed)."""
        done = ("done",) if retry_failed else FINISHED
        with self.engine.connect() as conn:
            query = (
                select(run_table.c.id)
                .where((run_table.c.study_id == study_id) & run_table.c.status.not_in(done))
                .order_by(run_table.c.position)
            )
            return [int(r[0]) for r in conn.execute(query)]

    def start(self, run_id: int) -> None:
        """Mark a run running and drop whatever a killed earlier attempt left."""
        with self.engine.begin() as conn:
            conn.execute(delete(epoch_table).where(epoch_table.c.run_id == run_id))
            conn.execute(delete(final_table).where(final_table.c.run_id == run_id))
            conn.execute(
                update(run_table)
                .where(run_table.c.id == run_id)
                .values(status="running", error=None, started=_now())
            )

    def fail(self, run_id: int, error: str, wall_seconds: float | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(run_table)
                .where(run_table.c.id == run_id)
                .values(status="failed", error=error, wall_seconds=wall_seconds, finished=_now())
            )

    def finish(self, run_id: int, payload: dict[str, Any]) -> None:
        """Store a finished run: its summary, per-epoch metrics and final metrics at once."""
        epochs = [
            {"run_id": run_id, "epoch": int(row["epoch"]), "name": k, "value": _num(v)}
            for row in payload.get("history", [])
            for k, v in row.items()
            if k != "epoch"
        ]
        finals = {**payload.get("test", {}), **payload.get("extra", {})}
        final_rows = [{"run_id": run_id, "name": k, "value": _num(v)} for k, v in finals.items()]
        values = {k: payload.get(k) for k in (
            "wall_seconds", "train_seconds", "peak_memory_mb", "epochs_run", "best_epoch",
            "stop_reason", "steps", "skipped_steps", "n_params",
        )}  # fmt: skip
        with self.engine.begin() as conn:
            conn.execute(delete(epoch_table).where(epoch_table.c.run_id == run_id))
            conn.execute(delete(final_table).where(final_table.c.run_id == run_id))
            if epochs:
                conn.execute(insert(epoch_table), epochs)
            if final_rows:
                conn.execute(insert(final_table), final_rows)
            conn.execute(
                update(run_table)
                .where(run_table.c.id == run_id)
                .values(
                    status="done",
                    error=None,
                    finished=_now(),
                    grad_trace=json.dumps(payload.get("grad_trace", [])),
                    **values,
                )
            )

    def runs(self, study_id: int) -> list[dict[str, Any]]:
        """Every run of a study as a dict, with ``final`` and ``history`` filled in."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(run_table)
                .where(run_table.c.study_id == study_id)
                .order_by(run_table.c.position)
            ).mappings()
            runs = {r["id"]: {**r, "final": {}, "history": {}} for r in rows}
            ids = list(runs)
            if not ids:
                return []
            for r in conn.execute(
                select(final_table).where(final_table.c.run_id.in_(ids))
            ).mappings():
                runs[r["run_id"]]["final"][r["name"]] = _nan(r["value"])
            query = (
                select(epoch_table).where(epoch_table.c.run_id.in_(ids)).order_by(epoch_table.c.id)
            )
            for r in conn.execute(query).mappings():
                runs[r["run_id"]]["history"].setdefault(r["name"], []).append(_nan(r["value"]))
        for run in runs.values():
            run["grad_trace"] = json.loads(run["grad_trace"] or "[]")
            run["overrides"] = json.loads(run["overrides"] or "{}")
        return list(runs.values())


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)
