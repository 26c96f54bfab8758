"""A tiny LightningModule, its data and a quiet Trainer for the Lightning callback tests.

Shared by ``test_lightning.py`` and the DDP script ``lightning_ddp.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning")

FEATURES = 4


def make_loader(n: int = 32, batch_size: int = 4, seed: int = 1) -> DataLoader:
    """A fixed regression data set (no shuffling: every run sees the same batches)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    y = x @ torch.linspace(-1.0, 1.0, FEATURES).unsqueeze(1) + 0.1 * torch.randn(n, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def make_net(dropout: float = 0.0) -> nn.Sequential:
    """The same small MLP every time (seeded)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 1))


class Regression(L.LightningModule):
    """MSE regression on ``make_net()``.

    Args:
        optimizer: ``"sgd"`` or ``"adam"`` (or ``"adam-fused"``).
        lr: the learning rate.
        nan_batches: ``(epoch, batch_idx)`` pairs whose loss is multiplied by NaN.
        val_losses: a scripted ``val_loss`` per epoch (one list per rank under DDP)
            instead of the measured one.
        penalty: a callable ``penalty(module) -> Tensor`` added to every training loss.
        dropout: the rate of the dropout layer.
    """

    def __init__(
        self,
        optimizer: str = "sgd",
        lr: float = 0.1,
        nan_batches: Sequence[tuple[int, int]] = (),
        val_losses: Sequence[float] | Sequence[Sequence[float]] | None = None,
        penalty: Callable[[nn.Module], torch.Tensor] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.net = make_net(dropout)
        self.optimizer_name, self.lr = optimizer, lr
        self.nan_batches = {tuple(b) for b in nan_batches}
        self.val_losses = val_losses
        self.penalty = penalty
        self.epochs_seen: list[int] = []
        self.val_weights: list[torch.Tensor] = []
        self.backward_norms: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        if (self.current_epoch, batch_idx) in self.nan_batches:
            loss = loss * float("nan")
        if self.penalty is not None:
            loss = loss + self.penalty(self)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        if batch_idx == 0:
            self.val_weights.append(self.net[0].weight.detach().clone())
        value: Any = F.mse_loss(self(x), y)
        if self.val_losses is not None:
            scripted = self.val_losses
            if isinstance(scripted[0], Sequence):
                scripted = scripted[self.global_rank]  # type: ignore[assignment]
            value = float(scripted[self.current_epoch])  # type: ignore[arg-type]
        self.log("val_loss", value)

    def on_train_epoch_start(self) -> None:
        self.epochs_seen.append(self.current_epoch)

    def on_after_backward(self) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.backward_norms.append(float(torch.nn.utils.get_total_norm(grads)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        fused = self.optimizer_name == "adam-fused"
        return torch.optim.Adam(self.parameters(), lr=self.lr, fused=fused or None)


def quiet_trainer(**kwargs: Any) -> L.Trainer:
    """A Trainer on one CPU without progress bar, logger, checkpoints or sanity check."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    options.update(kwargs)
    return L.Trainer(**options)
