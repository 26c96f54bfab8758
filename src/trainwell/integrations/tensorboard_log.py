"""A ``fit()`` callback that writes TensorBoard event files (``[logging] tensorboard``).

One folder is one run. What it writes (each a scalar, plotted against the x below):

* ``epoch/<key>``: every key of each epoch's history row (``train_loss``, ``val_loss``,
  ``val_acc``, ``lr``, ``seconds``, ...), at x = the epoch (from 0, as in ``metrics.csv``);
* ``step/<key>``: the training loss, learning rate and the gradient transforms' numbers
  every ``every_n_steps`` optimizer steps, at x = the optimizer steps taken;
* ``grad/<key>``: each ``GradMonitor`` row (``grad_norm``, ``grad_norm/<layer>``,
  ``update_ratio/<layer>``), at x = the steps taken (``grad_norms.csv``'s ``step`` + 1);
* ``test/<key>`` (:meth:`TensorBoardLogger.log_test`), at x = the last epoch, together
  with the run's hyperparameters (the HParams tab) and, once, the config as text.

A resumed fit appends to the same folder: its first step writes a TensorBoard session
start at that step, so whatever the killed run wrote past its checkpoint is dropped by
TensorBoard's reader; a fit that starts at step 1 drops everything written there before.
TensorBoard (``torch.utils.tensorboard``) is imported only when the first event is written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainwell.integrations import require
from trainwell.integrations.fit_logging import MonitorRows, flatten, is_logging_rank, step_scalars


def require_tensorboard() -> None:
    """Raise :class:`~trainwell.integrations.MissingExtra` unless TensorBoard imports."""
    require("tensorboard", "tensorboard", "[logging] tensorboard")


class TensorBoardLogger:
    """Log a ``fit()`` run to TensorBoard event files in ``log_dir``.

    Args:
        log_dir: the run's folder (``tensorboard --logdir`` its parent to compare runs).
        every_n_steps: log ``step/*`` every N optimizer steps (0: never); other steps cost
            nothing (no host-device sync).
        monitor: the ``GradMonitor`` passed to ``fit()``, whose rows become ``grad/*``.
        params: the run's hyperparameters (a nested mapping: a config's ``model_dump()``),
            flattened to ``optimizer.lr``-style keys for the HParams tab.
        text: the config as text (TOML), shown in the Text tab.

    Only the main process (rank 0 under DDP) writes. A missing TensorBoard raises
    :class:`~trainwell.integrations.MissingExtra` here, before anything trains.

    Example:
        >>> import tempfile, torch
        >>> from trainwell import fit
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> data = DataLoader(TensorDataset(torch.randn(16, 3), torch.randn(16, 1)), batch_size=8)
        >>> net = torch.nn.Linear(3, 1)
        >>> logger = TensorBoardLogger(tempfile.mkdtemp(), every_n_steps=1)
        >>> _ = fit(net, data, data, torch.optim.SGD(net.parameters(), lr=0.1),
        ...         torch.nn.functional.mse_loss, epochs=2, callbacks=[logger])
        >>> len(list(logger.log_dir.glob("events.out.tfevents.*")))
        1
    """

    def __init__(
        self,
        log_dir: str | Path,
        *,
        every_n_steps: int = 50,
        monitor: Any = None,
        params: Mapping[str, Any] | None = None,
        text: str | None = None,
    ) -> None:
        require_tensorboard()
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int):
            raise TypeError(f"every_n_steps must be an int >= 0, got {every_n_steps!r}")
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be an int >= 0, got {every_n_steps}")
        self.log_dir = Path(log_dir)
        self.every_n_steps = every_n_steps
        self.params = dict(params or {})
        self.text = text
        self.rows = MonitorRows(monitor)
        self.writer: Any = None
        self.active = True
        self.last_epoch = 0

    def _open(self, purge_step: int | None) -> Any:
        """The ``SummaryWriter``, created at the first event (``purge_step``: see the module)."""
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(self.log_dir), purge_step=purge_step)
            if purge_step == 0 and self.text:
                self.writer.add_text("config", _as_code(self.text), 0)
        return self.writer

    def on_fit_start(self) -> None:
        self.active = is_logging_rank()
        self.rows.start()

    def on_step_end(self, step: int, info: Mapping[str, Any]) -> None:
        if not self.active:
            return
        writer = self._open(purge_step=0 if step == 1 else step)
        for key, value in step_scalars(step, info, self.every_n_steps).items():
            writer.add_scalar(f"step/{key}", value, step)
        self._monitor_rows()

    def _monitor_rows(self) -> None:
        for taken, row in self.rows.new():
            for key, value in row.items():
                self._open(None).add_scalar(f"grad/{key}", value, taken)

    def on_epoch_end(self, row: Mapping[str, Any]) -> None:
        if not self.active:
            return
        writer = self._open(None)
        self.last_epoch = int(row.get("epoch", self.last_epoch))
        for key, value in row.items():
            if key != "epoch" and isinstance(value, int | float):
                writer.add_scalar(f"epoch/{key}", float(value), self.last_epoch)
        writer.flush()

    def on_fit_end(self, result: Any) -> None:
        if not self.active:
            return
        self._monitor_rows()
        if self.writer is not None:
            self.writer.flush()

    def log_test(self, metrics: Mapping[str, float]) -> None:
        """Write ``test/<key>`` scalars and the hyperparameters with these metrics."""
        if not self.active:
            return
        from torch.utils.tensorboard.summary import hparams

        writer = self._open(None)
        values = {k: float(v) for k, v in metrics.items()}
        for key, value in values.items():
            writer.add_scalar(f"test/{key}", value, self.last_epoch)
        if self.params:
            tagged = {f"test/{k}": v for k, v in values.items()}
            for summary in hparams(_hparam_values(self.params), tagged):
                writer.file_writer.add_summary(summary)
        writer.flush()

    def close(self, status: str | None = None) -> None:
        """Flush and close the event file (``status`` is for symmetry with MLflow)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _hparam_values(params: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """The flattened params as the types the HParams plugin takes (others as JSON text)."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in flatten(params).items():
        ok = isinstance(value, bool | int | float | str)
        out[key] = value if ok else json.dumps(value, default=str)
    return out


def _as_code(text: str) -> str:
    """Text as a Markdown code block (the Text tab renders Markdown)."""
    return "\n".join("    " + line for line in text.splitlines())
