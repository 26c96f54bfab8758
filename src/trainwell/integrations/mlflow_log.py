"""A ``fit()`` callback that logs a run to MLflow (``[logging] mlflow = "<tracking URI>"``).

One ``fit()`` is one MLflow run, in the experiment named ``experiment`` (created if
missing). What it logs:

* params: the run's config, flattened (``optimizer.lr``, ``model.hidden``, ...; values as
  text, non-strings as JSON) -- once, when the run is created;
* tags: the given ones (a study adds ``variant``, ``data``, ``seed``, ``study``);
* metrics: every key of each epoch's history row (``train_loss``, ``val_loss``, ``lr``,
  ...) at step = the epoch (from 0, as in ``metrics.csv``); ``step/<key>`` (training loss,
  learning rate, the transforms' numbers) every ``every_n_steps`` optimizer steps and each
  ``GradMonitor`` row as ``grad/grad_norm``, ``grad/grad_norm.<layer>``,
  ``grad/update_ratio.<layer>``, at step = the optimizer steps taken (``grad_norms.csv``'s
  ``step`` + 1); a ``/`` in a name becomes ``.`` (:func:`metric_name`); the test metrics
  (:meth:`MLflowLogger.log_test`) at step = the last epoch;
* artifacts: files given to :meth:`MLflowLogger.log_files` (``trainwell run`` gives the run
  directory's ``config.toml``, ``metrics.csv``, ``summary.json``, ``curves.png``, ...).

Metrics are buffered and sent once per epoch (one ``log_batch``), never per step.
``run_id`` continues an existing run (a resumed fit: its steps continue there), and
``run_id_path`` keeps the run's id in a file (JSON) as soon as the run exists, so a
killed run can be resumed into the same MLflow run. MLflow keeps its "file store"
(``file:./mlruns``) behind ``MLFLOW_ALLOW_FILE_STORE=true``; a ``file:`` URI given here
sets it for this process when it is unset, since asking for one is the user's opt-in.
MLflow is imported only inside the functions here.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from trainwell.checkpoints.atomic import atomic_write
from trainwell.integrations import require
from trainwell.integrations.fit_logging import MonitorRows, flatten, is_logging_rank, step_scalars

#: What MLflow accepts in a metric or param name (the colon is refused on Windows).
_BAD_NAME = re.compile(r"[^\w./\- ]")
MAX_BATCH_METRICS, MAX_BATCH_PARAMS, MAX_VALUE = 1000, 100, 6000


def require_mlflow() -> Any:
    """The ``mlflow`` module, or :class:`~trainwell.integrations.MissingExtra`."""
    return require("mlflow", "mlflow", "[logging] mlflow")


def client_for(tracking_uri: str | None) -> Any:
    """An ``MlflowClient`` for ``tracking_uri`` (None: MLflow's default), allowing the
    file store when the URI names one (see the module docstring)."""
    require_mlflow()
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or ""
    if uri.startswith("file:") or (uri and ":" not in uri):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri)


def experiment_id(client: Any, name: str) -> str:
    """The id of experiment ``name``, created if missing (another process may race us)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    try:
        return str(client.create_experiment(name))
    except MlflowException:  # created meanwhile by a parallel run of the same study
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return str(found.experiment_id)


def prepare_experiment(tracking_uri: str | None, name: str) -> str:
    """Open the store and make sure experiment ``name`` exists; its id. A store that
    cannot be opened is a one-line ``ValueError`` naming the URI."""
    require_mlflow()
    from mlflow.exceptions import MlflowException

    try:
        return experiment_id(client_for(tracking_uri), name)
    except MlflowException as err:
        raise _refused(tracking_uri, err) from None


def _refused(tracking_uri: str | None, err: Exception) -> ValueError:
    first = next(iter(str(err).splitlines()), "")[:300]
    return ValueError(f"logging.mlflow = {tracking_uri!r}: {first}")


def metric_name(key: str, prefix: str = "") -> str:
    """``prefix + key`` as an MLflow name: what MLflow refuses becomes ``_`` and a ``/``
    of ``key`` a ``.`` (the file store keeps ``a/b`` in a folder ``a``, which a metric
    ``a`` -- ``grad_norm`` next to ``grad_norm/<layer>`` -- would already be).

    Example:
        >>> metric_name("grad_norm/(root)", "grad/"), metric_name("val_acc")
        ('grad/grad_norm._root_', 'val_acc')
    """
    return (prefix + _BAD_NAME.sub("_", key).replace("/", "."))[:250] or "_"


def log_artifacts(tracking_uri: str | None, run_id: str, paths: Iterable[str | Path]) -> None:
    """Upload the existing files of ``paths`` to run ``run_id`` (its status unchanged)."""
    client = client_for(tracking_uri)
    for path in paths:
        if Path(path).is_file():
            client.log_artifact(run_id, str(path))


def saved_run_id(path: str | Path) -> str | None:
    """The MLflow run id an :class:`MLflowLogger` kept in ``path``, or None."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    run_id = data.get("run_id") if isinstance(data, dict) else None
    return run_id if isinstance(run_id, str) and run_id else None


class MLflowLogger:
    """Log a ``fit()`` run to MLflow.

    Args:
        tracking_uri: where MLflow keeps runs (``file:./mlruns``, ``sqlite:///mlflow.db``,
            ``http://host:5000``); None: MLflow's default (``MLFLOW_TRACKING_URI``).
        experiment: the experiment's name (created if missing).
        run_name: the run's name in the UI.
        run_id: continue this run (a resumed fit) instead of creating one; a run id
            that the store does not hold starts a new run.
        run_id_path: write the run's id here (JSON) once the run exists.
        params: the run's config (nested mapping), logged flattened as params.
        tags: tags of a new run (values as text).
        every_n_steps: log ``step/*`` every N optimizer steps (0: never).
        monitor: the ``GradMonitor`` passed to ``fit()``.

    Only the main process (rank 0 under DDP) logs. A missing MLflow raises
    :class:`~trainwell.integrations.MissingExtra` here, before anything trains; a store
    that cannot be opened raises ``ValueError`` from :meth:`start` (``on_fit_start``).
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "trainwell",
        *,
        run_name: str | None = None,
        run_id: str | None = None,
        run_id_path: str | Path | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        every_n_steps: int = 50,
        monitor: Any = None,
    ) -> None:
        require_mlflow()
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int):
            raise TypeError(f"every_n_steps must be an int >= 0, got {every_n_steps!r}")
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be an int >= 0, got {every_n_steps}")
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.run_id = run_id
        self.run_id_path = Path(run_id_path) if run_id_path is not None else None
        self.params = dict(params or {})
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.every_n_steps = every_n_steps
        self.rows = MonitorRows(monitor)
        self.client: Any = None
        self.active = True
        self.pending: list[Any] = []
        self.ended = False
        self.last_epoch = 0

    def start(self) -> str | None:
        """Open (or reopen) the run; its id, or None on a process that does not log."""
        self.active = is_logging_rank()
        if not self.active or self.client is not None:
            return self.run_id
        from mlflow.exceptions import MlflowException

        try:
            self.client = client_for(self.tracking_uri)
            if not self._reopen():
                self._create()
        except MlflowException as err:
            self.client = None
            raise _refused(self.tracking_uri, err) from None
        if self.run_id_path is not None:
            saved = {"run_id": self.run_id, "tracking_uri": self.client.tracking_uri}
            atomic_write(self.run_id_path, lambda f: f.write(json.dumps(saved).encode()))
        return self.run_id

    def _reopen(self) -> bool:
        """Continue ``run_id`` when the store holds it (marked running again)."""
        from mlflow.exceptions import MlflowException

        if self.run_id is None:
            return False
        try:
            self.client.get_run(self.run_id)
        except MlflowException:
            return False
        self.client.update_run(self.run_id, status="RUNNING")
        self.ended = False
        return True

    def _create(self) -> None:
        from mlflow.entities import Param

        exp = experiment_id(self.client, self.experiment)
        run = self.client.create_run(exp, run_name=self.run_name, tags=self.tags)
        self.run_id = run.info.run_id
        params = [Param(metric_name(k), _text(v)) for k, v in flatten(self.params).items()]
        for i in range(0, len(params), MAX_BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=params[i : i + MAX_BATCH_PARAMS])

    def _add(self, values: Mapping[str, float], step: int, prefix: str = "") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in values.items():
            self.pending.append(Metric(metric_name(key, prefix), float(value), now, step))

    def flush(self) -> None:
        """Send the buffered metrics (one ``log_batch`` per 1000)."""
        if self.client is None or not self.pending:
            return
        pending, self.pending = self.pending, []
        for i in range(0, len(pending), MAX_BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=pending[i : i + MAX_BATCH_METRICS])

    def on_fit_start(self) -> None:
        self.start()
        self.rows.start()

    def on_step_end(self, step: int, info: Mapping[str, Any]) -> None:
        if not self.active:
            return
        self._add(step_scalars(step, info, self.every_n_steps), step, "step/")
        for taken, row in self.rows.new():
            self._add(row, taken, "grad/")

    def on_epoch_end(self, row: Mapping[str, Any]) -> None:
        if not self.active:
            return
        self.last_epoch = int(row.get("epoch", self.last_epoch))
        self._add({k: v for k, v in row.items() if k != "epoch" and _number(v)}, self.last_epoch)
        self.flush()

    def on_fit_end(self, result: Any) -> None:
        """Send what is left and end the run (``KILLED`` after Ctrl-C, else ``FINISHED``)."""
        if not self.active:
            return
        for taken, row in self.rows.new():
            self._add(row, taken, "grad/")
        interrupted = getattr(result, "stop_reason", None) == "interrupted"
        self.close("KILLED" if interrupted else "FINISHED")

    def log_test(self, metrics: Mapping[str, float]) -> None:
        """Log the test metrics (``test_acc``, ``test_nll``, ...) at step = the last epoch."""
        if self.active and self.client is not None:
            self._add({k: v for k, v in metrics.items() if _number(v)}, self.last_epoch)
            self.flush()

    def log_files(self, paths: Iterable[str | Path], text: Mapping[str, str] | None = None) -> None:
        """Upload the existing ``paths`` as artifacts, and each ``{name: text}`` as a file."""
        if not self.active or self.client is None:
            return
        log_artifacts(self.tracking_uri, self.run_id, paths)
        for name, content in (text or {}).items():
            self.client.log_text(self.run_id, content, name)

    def close(self, status: str | None = None) -> None:
        """Send what is buffered and end the run with ``status`` (FINISHED, FAILED,
        KILLED); without one, a run that ended already keeps its status."""
        if self.client is None:
            return
        self.flush()
        if status is not None or not self.ended:
            self.client.set_terminated(self.run_id, status or "FINISHED")
            self.ended = True


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _text(value: Any) -> str:
    """A param value: text as it is, anything else as JSON; cut to MLflow's limit."""
    return (value if isinstance(value, str) else json.dumps(value, default=str))[:MAX_VALUE]
