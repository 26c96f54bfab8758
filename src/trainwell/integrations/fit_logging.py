"""What the ``fit()`` loggers share (:mod:`.tensorboard_log`, :mod:`.mlflow_log`).

* :func:`step_scalars`: the scalars of an optimizer step, only every ``every_n_steps``
  steps: the loss, the learning rate and the numbers the gradient transforms measured.
  Other steps cost nothing (``info["loss"]`` is a tensor on the device; reading it is a
  host-device sync).
* :class:`MonitorRows`: the rows a ``GradMonitor`` recorded since the last call (its
  history holds the rows from before a resume too; those are not logged again).
* :func:`flatten`: a nested config as dotted keys (``optimizer.lr``), for params / hparams.
* :func:`is_logging_rank`: only the main process (rank 0 under DDP) logs.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import torch

from trainwell.distributed import is_main_process


def is_logging_rank() -> bool:
    """True on the process that logs: the only one, or rank 0 of a process group."""
    return is_main_process()


def flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys; other values are kept as they are.

    Example:
        >>> flatten({"optimizer": {"lr": 0.1, "args": {}}, "epochs": 3, "hidden": [8]})
        {'optimizer.lr': 0.1, 'epochs': 3, 'hidden': [8]}
    """
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def step_scalars(step: int, info: Mapping[str, Any], every_n_steps: int) -> dict[str, float]:
    """The scalars to log after optimizer step ``step`` (counted from 1): ``loss``, ``lr``
    and every number or 0-d tensor of the transforms' stats, each as a float; ``{}`` (no
    host sync) unless ``every_n_steps`` divides ``step``.

    Example:
        >>> step_scalars(10, {"loss": torch.tensor(0.5), "lr": 0.1, "skip": False}, 5)
        {'loss': 0.5, 'lr': 0.1}
        >>> step_scalars(11, {"loss": torch.tensor(0.5)}, 5), step_scalars(10, {}, 0)
        ({}, {})
    """
    if every_n_steps < 1 or step % every_n_steps:
        return {}
    out: dict[str, float] = {}
    for key, value in info.items():
        if isinstance(value, bool) or key == "skip":
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[key] = float(value.detach())
        elif isinstance(value, numbers.Real):
            out[key] = float(value)
    return out


class MonitorRows:
    """The rows a ``GradMonitor`` appended since :meth:`start` or the last :meth:`new`.

    Each row is ``{"step": s, "grad_norm": ..., "grad_norm/<layer>": ...,
    "update_ratio/<layer>": ...}`` with ``s`` the monitor's step index (from 0); the
    loggers plot it at ``s + 1``, the optimizer steps taken, like every per-step scalar.
    """

    def __init__(self, monitor: Any = None) -> None:
        self.monitor = monitor
        self.seen = 0

    def start(self) -> None:
        """Skip the rows already there (a resumed monitor's history from before the resume)."""
        self.seen = len(self._history())

    def _history(self) -> list[dict[str, float]]:
        return getattr(self.monitor, "history", None) or []

    def new(self) -> list[tuple[int, dict[str, float]]]:
        """``(steps taken, {name: value})`` for every row not returned before."""
        history = self._history()
        if len(history) <= self.seen:  # the common case: nothing new, nothing copied
            return []
        rows, self.seen = history[self.seen :], len(history)
        return [
            (int(row["step"]) + 1, {k: float(v) for k, v in row.items() if k != "step"})
            for row in rows
        ]
