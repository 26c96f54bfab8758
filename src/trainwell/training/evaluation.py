"""Evaluation passes used by the loop and the runner: eval mode, no autograd, modes restored."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


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


@torch.no_grad()
def predict(
    model: nn.Module, loader: Iterable, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated model outputs and targets over a loader (eval mode, no grad)."""
    outputs, targets = [], []
    with eval_mode(model):
        for batch in loader:
            x, y = batch[0].to(device), batch[1].to(device)
            outputs.append(model(x).float())
            targets.append(y)
    return torch.cat(outputs), torch.cat(targets)


def evaluate(
    model: nn.Module,
    loader: Iterable,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    device: torch.device | str = "cpu",
    prefix: str = "val_",
) -> dict[str, float]:
    """Mean loss and accuracy over a loader, as ``{prefix + "loss", prefix + "acc"}``.

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> data = DataLoader(TensorDataset(torch.eye(4), torch.arange(4)), batch_size=2)
        >>> model = nn.Linear(4, 4)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.eye(4) * 10); _ = model.bias.zero_()
        >>> evaluate(model, data)["val_acc"]
        1.0
    """
    outputs, targets = predict(model, loader, device)
    metrics = {prefix + "loss": float(loss_fn(outputs, targets))}
    if outputs.dim() == 2 and targets.dtype in (torch.int64, torch.int32):
        metrics[prefix + "acc"] = float((outputs.argmax(dim=1) == targets).float().mean())
    return metrics
