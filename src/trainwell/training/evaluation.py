"""Evaluation passes used by the loop and the runner: eval mode, no autograd, modes restored.

Every batch goes through the same step hook as training (:mod:`trainwell.training.steps`),
so a batch ``fit()`` can train on is a batch ``evaluate()`` can score.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainwell.training.steps import Step, StepOutput, as_step_output, supervised_step, to_device

Metric = Callable[[torch.Tensor, Any], float]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own flag afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


def check_metrics(metrics: Any) -> Mapping[str, Metric] | None:
    """``metrics`` must be None or a mapping of names to callables ``fn(outputs, targets)``."""
    if metrics is None:
        return None
    if not isinstance(metrics, Mapping) or not all(
        isinstance(name, str) and callable(fn) for name, fn in metrics.items()
    ):
        raise TypeError(
            "metrics must be a mapping {name: fn(outputs, targets) -> float}, e.g. "
            f"{{'mse': trainwell.mse}}, got {metrics!r}"
        )
    return metrics


def _no_loss(outputs: Any, targets: Any) -> torch.Tensor:
    return torch.zeros(())


def _steps(
    model: nn.Module, loader: Iterable, device: torch.device | str, step: Step, loss_fn: Any
) -> Iterator[StepOutput]:
    """The step's output for every batch, in eval mode and without autograd."""
    with torch.no_grad(), eval_mode(model):
        for batch in loader:
            yield as_step_output(step(model, to_device(batch, device), loss_fn))


def _cat(chunks: list[Any], what: str) -> torch.Tensor:
    if not chunks:
        raise ValueError("the loader yielded no batches: nothing to evaluate")
    if not all(isinstance(c, torch.Tensor) for c in chunks):
        raise TypeError(
            f"the step's {what} must be tensors to be concatenated over the loader, "
            f"got {type(chunks[0]).__name__}"
        )
    return torch.cat(chunks)


def predict(
    model: nn.Module,
    loader: Iterable,
    device: torch.device | str = "cpu",
    *,
    step: Step = supervised_step,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated outputs (as float) and targets over a loader (eval mode, no grad).

    Each batch goes through ``step(model, to_device(batch, device), loss_fn)``; the loss it
    computes is discarded (with ``loss_fn=None`` the step gets a stand-in returning 0).

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> data = DataLoader(TensorDataset(torch.randn(5, 3), torch.arange(5)), batch_size=2)
        >>> outputs, targets = predict(nn.Linear(3, 4), data)
        >>> outputs.shape, targets.tolist()
        (torch.Size([5, 4]), [0, 1, 2, 3, 4])
    """
    outputs, targets = [], []
    for out in _steps(model, loader, device, step, loss_fn if loss_fn is not None else _no_loss):
        outputs.append(out.outputs.float())
        targets.append(out.targets)
    return _cat(outputs, "outputs"), _cat(targets, "targets")


def _default_acc_applies(outputs: Any, targets: Any) -> bool:
    return (
        isinstance(outputs, torch.Tensor)
        and isinstance(targets, torch.Tensor)
        and outputs.dim() == 2
        and targets.dtype in (torch.int64, torch.int32)
    )


def evaluate(
    model: nn.Module,
    loader: Iterable,
    loss_fn: Callable[[Any, Any], torch.Tensor] = F.cross_entropy,
    device: torch.device | str = "cpu",
    prefix: str = "val_",
    *,
    step: Step = supervised_step,
    metrics: Mapping[str, Metric] | None = None,
) -> dict[str, float]:
    """Mean loss and metrics over a loader, as ``{prefix + "loss", prefix + name, ...}``.

    ``prefix + "loss"`` is the item-weighted mean of the step's batch losses,
    ``sum_b n_b loss_b / sum_b n_b`` (with a mean ``loss_fn`` this is the mean over every
    item: equal, up to float rounding, to ``loss_fn`` on the concatenated outputs). Each
    metric is ``fn(all_outputs, all_targets)`` on the outputs (as float) and targets
    concatenated over the loader. With ``metrics=None``: ``prefix + "acc"`` (accuracy)
    when the outputs are 2-D scores and the targets integer labels, no metric otherwise;
    ``metrics={}`` computes the loss only and keeps no outputs.

    Args:
        model: the model (evaluated in eval mode, without autograd; modes restored).
        loader: the batches.
        loss_fn: ``loss_fn(outputs, targets)``, a mean over the batch.
        device: where batches go.
        prefix: prepended to every key.
        step: ``step(model, batch, loss_fn) -> StepOutput``, as in ``fit()``.
        metrics: ``{name: fn(outputs, targets) -> float}``, e.g.
            ``{"mse": trainwell.mse, "r2": trainwell.r2}``.

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> data = DataLoader(TensorDataset(torch.eye(4), torch.arange(4)), batch_size=2)
        >>> model = nn.Linear(4, 4)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.eye(4) * 10); _ = model.bias.zero_()
        >>> evaluate(model, data)["val_acc"]
        1.0
        >>> from trainwell.metrics import mae
        >>> reg = DataLoader(TensorDataset(torch.eye(4), torch.full((4, 1), 2.0)), batch_size=3)
        >>> zero = nn.Linear(4, 1)
        >>> _ = nn.init.zeros_(zero.weight), nn.init.zeros_(zero.bias)
        >>> evaluate(zero, reg, F.mse_loss, metrics={"mae": mae})
        {'val_loss': 4.0, 'val_mae': 2.0}
    """
    metrics = check_metrics(metrics)
    keep: bool | None = bool(metrics) if metrics is not None else None  # None: see batch 1
    loss_sum: torch.Tensor | float = 0.0
    items: int | torch.Tensor = 0
    outputs, targets = [], []
    for out in _steps(model, loader, device, step, loss_fn):
        n = out.n_items
        loss_sum = loss_sum + out.loss.detach().float() * n
        items = items + n
        if keep is None:
            keep = _default_acc_applies(out.outputs, out.targets)
        if keep:
            outputs.append(out.outputs.float())
            targets.append(out.targets)
    if keep is None:
        raise ValueError("the loader yielded no batches: nothing to evaluate")
    n_total = float(items)  # host syncs only once the pass is over
    result = {prefix + "loss": float(loss_sum) / n_total if n_total else float("nan")}
    if keep:
        all_outputs, all_targets = _cat(outputs, "outputs"), _cat(targets, "targets")
        if metrics is None:
            correct = (all_outputs.argmax(dim=1) == all_targets).float().mean()
            result[prefix + "acc"] = float(correct)
        else:
            for name, fn in metrics.items():
                result[prefix + name] = float(fn(all_outputs, all_targets))
    return result
