"""The results store of an ablation study: SQLAlchemy tables, SQLite by default.

Six tables: ``study`` (one row per study), ``run`` (one per variant x data size x
seed, with its config, status, error, wall time and peak memory), ``epoch_metric``
(one row per run, epoch and metric), ``final_metric`` (one per run and metric),
``predictions`` (one per done run that kept its test predictions, for ensembles of seeds)
and ``weights`` (one per done run: the fingerprint of its starting weights and, for
models up to :data:`trainwell.study.seed_soups.WEIGHTS_LIMIT` values, its final weights
as safetensors bytes, for soups of seeds). A store made before a table gets it on opening.
Any SQLAlchemy URL works (``sqlite:///DIR/results.sqlite`` is the default;
``postgresql://...`` lets several processes or machines share one study and needs the
driver: ``pip install 'trainwell[postgres]'``); :mod:`trainwell.study.database` opens it
and says in one line what is wrong with a URL or a database. A database that holds
tables but not a ``study`` table is not a results store and is refused, never written to.

Several processes may run the same study on one store at once. Opening a store,
creating a study and planning its runs tolerate a concurrent creator (the schema is
created under a lock, rows are inserted with *on conflict do nothing*). A process
takes a run with :meth:`Store.claim`, one transaction that marks one pending run
``running`` with the claimer's ``owner`` and a ``heartbeat`` time (``SELECT ... FOR
UPDATE SKIP LOCKED`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), keeps the lease
with :meth:`Store.heartbeat`, and stores the result with :meth:`Store.finish` or
:meth:`Store.fail`, which write only while that owner still holds the claim. A run
whose claimer died (its heartbeat is older than the lease, or its owner is a process
of this machine that no longer exists) is claimed again, the way Optuna's RDB storage
retries the trials of a dead worker; only that new claim drops the partial rows of
the dead attempt, and a finished run's metrics are never deleted by a claim.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from trainwell.study.database import StoreError, connection_errors, open_engine, shown
from trainwell.study.owners import owner_is_dead

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
    # the claim: who trains the run, when it last said so (Unix seconds), how many claims
    Column("owner", String(200)),
    Column("heartbeat", Float),
    Column("attempts", Integer),
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
    UniqueConstraint("run_id", "epoch", "name"),
)
final_table = Table(
    "final_metric",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("run.id"), nullable=False, index=True),
    Column("name", String(60), nullable=False),
    Column("value", Float),
    UniqueConstraint("run_id", "name"),
)
# a done run's test-split predictions (JSON of trainwell.study.seed_ensembles'
# encode_predictions: base64 float32 probabilities, targets, test indices); stores made
# before it get the table on opening
predictions_table = Table(
    "predictions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("run.id"), nullable=False, unique=True),
    Column("data", Text, nullable=False),
)
# a done run's starting-weights fingerprint (``init_hash``), its number of state values and
# its final weights (safetensors bytes; NULL when the model was above the size cap)
weights_table = Table(
    "weights",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("run.id"), nullable=False, unique=True),
    Column("init_hash", String(64)),
    Column("n_values", Integer),
    Column("data", LargeBinary(length=2**32 - 1)),
)

FINISHED = ("done", "failed")
CLAIM_COLUMNS = ("owner", "heartbeat", "attempts")  # added to stores made before claims
DEFAULT_LEASE_S = 60.0
_SCHEMA_LOCK = 7_412_093_118  # pg_advisory_xact_lock key that serializes schema creation


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


def _retryable(err: Exception) -> bool:
    """A concurrent creator got there first, or SQLite stayed locked past its timeout."""
    message = str(err).lower()
    return any(word in message for word in ("already exists", "duplicate", "locked", "deadlock"))


class Store:
    """A study's results in a SQL database, safe for several processes at once.

    Example:
        >>> from trainwell.study.owners import new_owner
        >>> store = Store("sqlite://")  # in memory
        >>> sid = store.study("demo", {"seeds": 1})
        >>> rid = store.plan(sid, "base", "all data", 0, 0, {}, "{}")
        >>> owner = new_owner()
        >>> store.claim(sid, owner) == rid, store.claim(sid, owner)  # one run, claimed once
        (True, None)
        >>> payload = {"test": {"test_acc": 0.9}, "history": [{"epoch": 0, "val_loss": 1}]}
        >>> store.finish(rid, payload, owner), store.finish(rid, payload, new_owner())
        (True, False)
        >>> store.runs(sid)[0]["final"]["test_acc"], store.pending(sid)
        (0.9, [])
    """

    def __init__(self, url: str, *, create: bool = True) -> None:
        """Open the store at ``url``, creating its tables unless ``create`` is False.

        Raises :class:`~trainwell.study.database.StoreError` (a ``ValueError``, one line)
        when the URL, the driver, the server or the database cannot be used; with
        ``create=False`` also when the store does not exist or holds no study table yet.
        """
        self.url = url
        self.engine: Engine = open_engine(url, create=create)
        if self.engine.dialect.name == "sqlite":
            _sqlite_transactions(self.engine)
        with connection_errors(url):
            self._create(create)

    @property
    def shared(self) -> bool:
        """False for an in-memory SQLite store, which no other process can see."""
        url = self.engine.url
        return not (
            url.get_backend_name() == "sqlite"
            and (url.database in (None, "", ":memory:") or url.query.get("mode") == "memory")
        )

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction (``BEGIN IMMEDIATE`` on SQLite: writers take turns)."""
        with self.engine.connect() as conn:
            conn = conn.execution_options(trainwell_write=True)
            with conn.begin():
                yield conn

    def now(self) -> float:
        """The store's clock in Unix seconds (the server's on PostgreSQL) that leases use."""
        with self.engine.connect() as conn:
            return self._clock(conn)

    @staticmethod
    def _clock(conn: Connection) -> float:
        # one clock for every machine sharing a server, so their clocks may disagree
        if conn.dialect.name == "postgresql":
            return float(
                conn.execute(text("SELECT extract(epoch FROM clock_timestamp())")).scalar()
            )
        return time.time()

    def _create(self, create: bool = True) -> None:
        """Create the tables (and add the claim columns to an older store), idempotently.

        A database with other tables and no ``study`` table is someone else's: refused.
        """
        for attempt in range(8):
            try:
                with self._write() as conn:
                    if conn.dialect.name == "postgresql":
                        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK})
                    tables = set(inspect(conn).get_table_names())
                    if "study" not in tables and (tables or not create):
                        what = "no study table" if tables else "no study table; it is empty"
                        raise StoreError(
                            f"{shown(self.url)} is not a trainwell results store ({what})"
                        )
                    metadata.create_all(conn, checkfirst=True)
                    have = {c["name"] for c in inspect(conn).get_columns("run")}
                    quote = conn.dialect.identifier_preparer.quote
                    for name in CLAIM_COLUMNS:
                        if name not in have:
                            kind = run_table.c[name].type.compile(conn.dialect)
                            conn.execute(text(f"ALTER TABLE run ADD COLUMN {quote(name)} {kind}"))
                return
            except (IntegrityError, ProgrammingError, OperationalError) as err:
                if attempt == 7 or not _retryable(err):
                    raise
                time.sleep(0.05 * (attempt + 1))

    def study(self, name: str, spec: dict[str, Any]) -> int:
        """The id of the study called ``name``, created if new (its spec is updated)."""
        values = {"name": name, "created": _now(), "spec": json.dumps(spec)}
        with self._write() as conn:
            _insert_ignore(conn, study_table, values, ["name"])
            row = conn.execute(
                select(study_table.c.id, study_table.c.spec).where(study_table.c.name == name)
            ).one()
            if row.spec != values["spec"]:
                conn.execute(
                    update(study_table)
                    .where(study_table.c.id == row.id)
                    .values(spec=values["spec"])
                )
            return int(row.id)

    def study_names(self) -> list[str]:
        with self.engine.connect() as conn:
            return [
                r[0] for r in conn.execute(select(study_table.c.name).order_by(study_table.c.id))
            ]

    def study_id(self, name: str | None = None) -> int:
        """The id of the named study, or of the newest one when ``name`` is None.

        A name the store does not hold is a one-line ``ValueError`` listing the names it
        holds.
        """
        with self.engine.connect() as conn:
            query = select(study_table.c.id).order_by(study_table.c.id.desc())
            if name is not None:
                query = query.where(study_table.c.name == name)
            row = conn.execute(query).first()
        if row is None:
            names = self.study_names()
            wanted = "no study" if name is None else f"no study {name!r}"
            listed = ", ".join(repr(n) for n in names[:20]) or "none yet"
            more = f" and {len(names) - 20} more" if len(names) > 20 else ""
            raise ValueError(
                f"{wanted} in the results store {shown(self.url)}; its studies: {listed}{more}"
            )
        return int(row[0])

    def counts(self, study_id: int) -> dict[str, int]:
        """How many runs of a study are in each status (``done``, ``failed``, ...)."""
        c = run_table.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(c.status, func.count()).where(c.study_id == study_id).group_by(c.status)
            )
            return {str(status): int(n) for status, n in rows}

    def failed(self, study_id: int) -> list[dict[str, Any]]:
        """The failed runs of a study, in plan order: variant, data, seed and error."""
        c = run_table.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(c.id, c.variant, c.data, c.seed, c.error)
                .where((c.study_id == study_id) & (c.status == "failed"))
                .order_by(c.position, c.id)
            ).mappings()
            return [dict(r) for r in rows]

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
        values = dict(
            study_id=study_id,
            variant=variant,
            data=data,
            seed=seed,
            position=position,
            overrides=json.dumps(overrides),
            config=config,
            status="pending",
            attempts=0,
        )
        with self._write() as conn:
            _insert_ignore(conn, run_table, values, ["study_id", "variant", "data", "seed"])
            row = conn.execute(select(run_table.c.id, run_table.c.position).where(key)).one()
            if row.position != position:
                conn.execute(
                    update(run_table).where(run_table.c.id == row.id).values(position=position)
                )
            return int(row.id)

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

    def claim(
        self,
        study_id: int,
        owner: str,
        lease_s: float = DEFAULT_LEASE_S,
        *,
        run_ids: Iterable[int] | None = None,
        retry_failed_before: float | None = None,
    ) -> int | None:
        """Take one run to train, or None when no run is free; one transaction.

        A run is free when it is pending, or running under a dead claim: a heartbeat
        older than ``lease_s`` seconds, no owner (a store written before claims), or an
        owner that ``owners.owner_is_dead`` knows has exited. With ``retry_failed_before``
        (Unix seconds), runs that failed before then are free too. The claimed run is
        marked running with ``owner`` and a fresh heartbeat, and whatever a dead attempt
        left is dropped. ``run_ids`` limits the claim to those runs (the ones this
        process planned). Two claimers never get the same run: PostgreSQL skips the
        rows another transaction has locked, SQLite runs one writer at a time.
        """
        if lease_s <= 0:
            raise ValueError(f"lease_s must be a positive number of seconds, got {lease_s}")
        c = run_table.c
        scope = c.study_id == study_id
        if run_ids is not None:
            scope &= c.id.in_(sorted(set(run_ids)))
        with self._write() as conn:
            now = self._clock(conn)
            owners = conn.execute(
                select(c.owner).where(scope & (c.status == "running")).distinct()
            ).scalars()
            dead = [o for o in owners if o and owner_is_dead(o)]
            stale = c.heartbeat.is_(None) | (c.heartbeat < now - lease_s) | c.owner.is_(None)
            if dead:
                stale |= c.owner.in_(dead)
            free = (c.status == "pending") | ((c.status == "running") & stale)
            if retry_failed_before is not None:
                old = c.heartbeat.is_(None) | (c.heartbeat < retry_failed_before)
                free |= (c.status == "failed") & old
            run_id = conn.execute(
                select(c.id)
                .where(scope & free)
                .order_by(c.position, c.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).scalar()
            if run_id is None:
                return None
            _drop_results(conn, run_id)
            conn.execute(
                update(run_table)
                .where(c.id == run_id)
                .values(
                    status="running",
                    owner=owner,
                    heartbeat=now,
                    attempts=func.coalesce(c.attempts, 0) + 1,
                    error=None,
                    started=_now(),
                    finished=None,
                )
            )
            return int(run_id)

    def heartbeat(self, run_id: int, owner: str) -> bool:
        """Renew ``owner``'s lease on a run; False when the claim is no longer its own."""
        c = run_table.c
        with self._write() as conn:
            result = conn.execute(
                update(run_table)
                .where((c.id == run_id) & (c.status == "running") & (c.owner == owner))
                .values(heartbeat=self._clock(conn))
            )
            return result.rowcount == 1

    def release(self, run_id: int, owner: str) -> bool:
        """Give a claimed run back (pending again) so another process takes it at once."""
        c = run_table.c
        with self._write() as conn:
            result = conn.execute(
                update(run_table)
                .where((c.id == run_id) & (c.status == "running") & (c.owner == owner))
                .values(status="pending", owner=None, heartbeat=None)
            )
            return result.rowcount == 1

    def start(self, run_id: int) -> None:
        """Mark a run running and drop whatever a killed earlier attempt left.

        For one process that owns the store; concurrent processes use :meth:`claim`,
        which never touches a run another live process holds or has finished.
        """
        with self.engine.begin() as conn:
            _drop_results(conn, run_id)
            conn.execute(
                update(run_table)
                .where(run_table.c.id == run_id)
                .values(status="running", error=None, started=_now(), owner=None, heartbeat=None)
            )

    def _held(self, run_id: int, owner: str | None) -> Any:
        held = run_table.c.id == run_id
        if owner is not None:
            held &= (run_table.c.status == "running") & (run_table.c.owner == owner)
        return held

    def fail(
        self,
        run_id: int,
        error: str,
        wall_seconds: float | None = None,
        owner: str | None = None,
    ) -> bool:
        """Store a run as failed; with ``owner``, only while that owner holds its claim."""
        with self._write() as conn:
            result = conn.execute(
                update(run_table)
                .where(self._held(run_id, owner))
                .values(
                    status="failed",
                    error=error,
                    wall_seconds=wall_seconds,
                    finished=_now(),
                    heartbeat=self._clock(conn),
                )
            )
            return result.rowcount == 1

    def finish(self, run_id: int, payload: dict[str, Any], owner: str | None = None) -> bool:
        """Store a finished run: its summary, per-epoch and final metrics, predictions at once.

        With ``owner`` it writes only while that owner still holds the run's claim and
        returns False otherwise (the lease ran out and another process took the run):
        a run's metrics are written once. Without ``owner`` (one process owning the
        store) it replaces whatever the run had.
        """
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
        with self._write() as conn:
            # the update first: it checks the claim and, on PostgreSQL, locks the row
            result = conn.execute(
                update(run_table)
                .where(self._held(run_id, owner))
                .values(
                    status="done",
                    error=None,
                    finished=_now(),
                    heartbeat=self._clock(conn),
                    grad_trace=json.dumps(payload.get("grad_trace", [])),
                    **values,
                )
            )
            if result.rowcount != 1:
                return False
            _drop_results(conn, run_id)
            if epochs:
                conn.execute(insert(epoch_table), epochs)
            if final_rows:
                conn.execute(insert(final_table), final_rows)
            if payload.get("predictions"):
                stored = {"run_id": run_id, "data": json.dumps(payload["predictions"])}
                conn.execute(insert(predictions_table), [stored])
            kept = _weights_row(run_id, payload)
            if kept is not None:
                conn.execute(insert(weights_table), [kept])
            return True

    def predictions(self, study_id: int) -> dict[int, dict[str, Any]]:
        """The kept test predictions of a study's runs, by run id (see ``finish``)."""
        p = predictions_table.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(p.run_id, p.data)
                .join(run_table, run_table.c.id == p.run_id)
                .where(run_table.c.study_id == study_id)
            )
            return {int(run_id): json.loads(data) for run_id, data in rows}

    def fingerprints(self, study_id: int) -> dict[int, dict[str, Any]]:
        """Per run id of a study: ``init_hash``, ``n_values`` and ``kept`` (weights stored).

        Runs finished before the ``weights`` table existed have no entry.
        """
        w = weights_table.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(w.run_id, w.init_hash, w.n_values, w.data.is_not(None).label("kept"))
                .join(run_table, run_table.c.id == w.run_id)
                .where(run_table.c.study_id == study_id)
            ).mappings()
            return {int(r["run_id"]): {**r, "kept": bool(r["kept"])} for r in rows}

    def weights(self, run_ids: Iterable[int]) -> dict[int, bytes]:
        """The kept final weights (safetensors bytes) of these runs, by run id."""
        w = weights_table.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(w.run_id, w.data).where(
                    w.run_id.in_(sorted(set(run_ids))) & w.data.is_not(None)
                )
            )
            return {int(run_id): bytes(data) for run_id, data in rows}

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


def _drop_results(conn: Connection, run_id: int) -> None:
    """Delete a run's metrics, predictions and weights (a new attempt writes them again)."""
    for table in (epoch_table, final_table, predictions_table, weights_table):
        conn.execute(delete(table).where(table.c.run_id == run_id))


def _weights_row(run_id: int, payload: dict[str, Any]) -> dict[str, Any] | None:
    """The ``weights`` row of a payload's ``init_hash`` and ``weights`` (base64 safetensors
    from :func:`trainwell.study.seed_soups.encode_weights`), None when it has neither."""
    kept = payload.get("weights") or {}
    if payload.get("init_hash") is None and not kept:
        return None
    data = kept.get("data")
    return {
        "run_id": run_id,
        "init_hash": payload.get("init_hash"),
        "n_values": kept.get("values"),
        "data": None if data is None else base64.b64decode(data),
    }


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _sqlite_transactions(engine: Engine) -> None:
    """SQLite transactions begun by SQLAlchemy, writes with ``BEGIN IMMEDIATE``.

    pysqlite's own deferred ``BEGIN`` lets two processes read, then both try to write,
    and one fails with "database is locked" at once; ``BEGIN IMMEDIATE`` takes the
    write lock first (waiting up to the connect timeout) so writers simply take turns.
    """

    @event.listens_for(engine, "connect")
    def _no_pysqlite_begin(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("trainwell_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _insert_ignore(conn: Connection, table: Table, values: dict, keys: list[str]) -> None:
    """Insert a row unless one with the same ``keys`` exists (a concurrent insert too)."""
    name = conn.dialect.name
    if name in ("postgresql", "sqlite"):
        if name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        conn.execute(
            dialect_insert(table).values(**values).on_conflict_do_nothing(index_elements=keys)
        )
        return
    with contextlib.suppress(IntegrityError), conn.begin_nested():
        conn.execute(insert(table).values(**values))
