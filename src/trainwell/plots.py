"""Figures of a run: learning curves (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def learning_curves(history: list[dict[str, float]], path: Path) -> None:
    """Train/val loss and val accuracy per epoch, side by side, as a PNG."""
    epochs = [row["epoch"] + 1 for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
    for key, label in (("train_loss", "train"), ("val_loss", "val"), ("ema_val_loss", "EMA val")):
        if history and key in history[0]:
            ax_loss.plot(epochs, [row[key] for row in history], label=label)
    for key, label in (("val_acc", "val"), ("ema_val_acc", "EMA val")):
        if history and key in history[0]:
            ax_acc.plot(epochs, [row[key] for row in history], label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)
