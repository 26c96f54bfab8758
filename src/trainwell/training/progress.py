"""The loop's progress: a rich bar on a terminal; one plain line per epoch otherwise
(a log file or a CI job shows the run as it goes, not only its final table)."""

from __future__ import annotations

import sys
from typing import Any

import torch


class Progress:
    """Epochs and steps with a live loss on a TTY; a line per epoch when stdout is not one;
    a no-op when disabled."""

    def __init__(self, enabled: bool, epochs: int) -> None:
        self.enabled = enabled and sys.stdout.isatty()
        self.plain = enabled and not self.enabled
        self.epochs = epochs
        self._bar: Any = None
        self._steps: Any = None
        self._count = 0

    def __enter__(self) -> Progress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                transient=True,
            )
            self._bar.__enter__()
            self._epochs = self._bar.add_task("epochs", total=self.epochs, info="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def start_epoch(self, epoch: int, batches: int | None) -> None:
        if self._bar is None:
            return
        if self._steps is not None:
            self._bar.remove_task(self._steps)
        self._steps = self._bar.add_task(f"epoch {epoch + 1}", total=batches, info="")
        self._count = 0

    def advance(self, loss_sum: torch.Tensor, items: int) -> None:
        if self._bar is None:
            return
        self._count += 1
        # reading the loss syncs with the device: do it every 10 steps only
        info = f"loss {float(loss_sum) / max(items, 1):.4f}" if self._count % 10 == 0 else None
        self._bar.update(self._steps, advance=1, **({"info": info} if info else {}))

    def end_epoch(self, row: dict[str, float]) -> None:
        if self.plain:
            print(epoch_line(row, self.epochs), flush=True)
        if self._bar is None:
            return
        shown = " ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith("val_"))
        self._bar.update(self._epochs, completed=row["epoch"] + 1, info=shown)


def epoch_line(row: dict[str, float], epochs: int) -> str:
    """``epoch 3/20  train_loss 0.4123  val_loss 0.3811  val_acc 0.8812  lr 0.001  1.2 s``.

    Example:
        >>> epoch_line({"epoch": 2, "train_loss": 0.41234, "val_acc": 0.9, "lr": 1e-3,
        ...             "seconds": 1.23}, 20)
        'epoch 3/20  train_loss 0.4123  val_acc 0.9000  lr 0.001  1.2 s'
    """
    shown = [f"epoch {int(row['epoch']) + 1}/{epochs}"]
    shown += [f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "lr", "seconds")]
    if "lr" in row:
        shown.append(f"lr {row['lr']:.3g}")
    if "seconds" in row:
        shown.append(f"{row['seconds']:.1f} s")
    return "  ".join(shown)
