"""The loop's progress bar: rich, only on a terminal, silent otherwise."""

from __future__ import annotations

import sys
from typing import Any

import torch


class Progress:
    """Epochs and steps with a live loss; a no-op when disabled or not on a TTY."""

    def __init__(self, enabled: bool, epochs: int) -> None:
        self.enabled = enabled and sys.stdout.isatty()
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
        if self._bar is None:
            return
        shown = " ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith("val_"))
        self._bar.update(self._epochs, completed=row["epoch"] + 1, info=shown)
