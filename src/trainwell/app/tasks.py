"""The task of a run: its loss, its metrics and which way each metric is better.

``[task] kind = "classification" | "regression"`` decides the defaults: cross-entropy and
accuracy / NLL / ECE / Brier for classification, MSE and MSE / MAE / R^2 for regression.
``loss`` is a name (``cross_entropy``, ``mse``, ``l1``, ``huber``, ``bce_with_logits``) or
``"module:function"``; ``metrics`` adds ``"module:function"`` metrics
``fn(outputs, targets) -> float``, reported as ``val_<name>`` and ``test_<name>``.

Shapes are never broadcast silently: for regression, outputs ``(N, 1)`` against targets
``(N,)`` are squeezed (``mse_loss`` would broadcast them to ``(N, N)`` and return a wrong
number with a warning); any other mismatch is an error that names both shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from trainwell import metrics as M
from trainwell.app.entry_points import resolve_callable
from trainwell.stopping import METRIC_DIRECTIONS, METRIC_PREFIXES, metric_base_name, metric_mode

LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
    "l1": F.l1_loss,
    "huber": F.huber_loss,
    "bce_with_logits": F.binary_cross_entropy_with_logits,
}
DEFAULT_LOSS = {"classification": "cross_entropy", "regression": "mse"}

#: Metric base names (after any ``val_`` / ``test_`` / ``ema_`` ... prefix) that are better high:
#: derived from the one table of directions, :data:`trainwell.stopping.METRIC_DIRECTIONS`.
HIGHER_IS_BETTER = {name: mode == "max" for name, mode in METRIC_DIRECTIONS.items()}
PREFIXES = METRIC_PREFIXES

#: The test metrics a study reports per task, the primary one first.
STUDY_METRICS = {
    "classification": ("test_nll", "test_acc", "test_ece"),
    "regression": ("test_mse", "test_mae", "test_r2"),
}
METRIC_NAMES = {"test_acc": "accuracy", "test_nll": "NLL", "test_ece": "ECE",
                "test_mse": "MSE", "test_mae": "MAE", "test_r2": "R²"}  # fmt: skip


def base_name(metric: str) -> str:
    """``"ema_val_acc"`` -> ``"acc"``: the metric without its split / averaging prefixes.

    Example:
        >>> base_name("ema_val_acc"), base_name("test_r2"), base_name("val_loss")
        ('acc', 'r2', 'loss')
    """
    return metric_base_name(metric)


def higher_is_better(metric: str) -> bool | None:
    """True / False for a metric trainwell knows the direction of, None otherwise.

    Example:
        >>> higher_is_better("swa_val_acc"), higher_is_better("val_nll"), higher_is_better("f1")
        (True, False, None)
    """
    mode = metric_mode(metric)
    return None if mode is None else mode == "max"


def _as_classes(outputs: torch.Tensor) -> torch.Tensor:
    """One logit per item (binary, ``bce_with_logits``) as two-class logits ``[0, z]``."""
    if outputs.dim() == 1 or (outputs.dim() == 2 and outputs.shape[1] == 1):
        z = outputs.reshape(-1, 1)
        return torch.cat([torch.zeros_like(z), z], dim=1)
    return outputs


def match_shapes(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``outputs`` shaped like ``targets`` when they differ only by a trailing 1, else as is."""
    if outputs.shape == targets.shape:
        return outputs
    if (
        outputs.dim() == targets.dim() + 1
        and outputs.shape[-1] == 1
        and (outputs.shape[:-1] == targets.shape)
    ):
        return outputs.squeeze(-1)
    raise ValueError(
        f"model outputs of shape {tuple(outputs.shape)} do not match targets of shape "
        f"{tuple(targets.shape)}; return one value per target"
    )


def _regression_loss(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.to(outputs.dtype)
        return fn(match_shapes(outputs, targets), targets)

    loss.__name__ = getattr(fn, "__name__", "loss")
    return loss


def _binary_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    targets = targets.to(outputs.dtype)
    return F.binary_cross_entropy_with_logits(match_shapes(outputs, targets), targets)


@dataclass
class Task:
    """A run's loss and validation / test metrics, built from the ``[task]`` section."""

    kind: str
    loss: Callable[..., torch.Tensor]
    metrics: dict[str, Callable[[torch.Tensor, Any], float]] = field(default_factory=dict)

    def evaluate(self, outputs: torch.Tensor, targets: Any, prefix: str) -> dict[str, float]:
        """Every metric of the task on concatenated outputs and targets."""
        return {prefix + name: float(fn(outputs, targets)) for name, fn in self.metrics.items()}


def classification_metrics() -> dict[str, Callable[[torch.Tensor, Any], float]]:
    return {
        "acc": lambda o, y: M.accuracy(_as_classes(o), y),
        "nll": lambda o, y: M.nll(_as_classes(o), y, kind="logits"),
        "ece": lambda o, y: M.ece(_as_classes(o), y, kind="logits"),
        "brier": lambda o, y: M.brier(_as_classes(o), y, kind="logits"),
    }


def regression_metrics() -> dict[str, Callable[[torch.Tensor, Any], float]]:
    return {"mse": M.mse, "mae": M.mae, "r2": M.r2}


def build_task(kind: str, loss: str | None, extra_metrics: list[str]) -> Task:
    """The :class:`Task` of a ``[task]`` section; entry points are resolved here."""
    if kind not in DEFAULT_LOSS:
        raise ValueError(f"task.kind must be 'classification' or 'regression', got {kind!r}")
    name = loss or DEFAULT_LOSS[kind]
    if name in LOSSES:
        fn = LOSSES[name]
        if kind == "regression" and name != "cross_entropy":
            fn = _regression_loss(fn)
        elif name == "bce_with_logits":
            fn = _binary_loss
    else:
        fn = resolve_callable("task.loss", name)
    metrics = classification_metrics() if kind == "classification" else regression_metrics()
    for target in extra_metrics:
        metric = resolve_callable("task.metrics", target)
        metrics[target.rpartition(":")[2].rpartition(".")[2]] = metric
    return Task(kind, fn, metrics)


def validation_metrics(task: Task) -> Mapping[str, Callable[[torch.Tensor, Any], float]]:
    """What each epoch's validation reports besides the loss: the cheap task metrics."""
    keep = {"classification": ("acc",), "regression": ("mse", "mae", "r2")}[task.kind]
    builtin = classification_metrics() if task.kind == "classification" else regression_metrics()
    return {k: v for k, v in task.metrics.items() if k in keep or k not in builtin}
