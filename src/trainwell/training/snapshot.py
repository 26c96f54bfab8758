"""What the loop saves after each epoch and restores on resume: one consistent snapshot.

Every stateful part (model, optimizer, scheduler, scaler, EMA, SWA, stopper, gradient
transforms, accumulator, dropout schedule) plus the RNG states and the loop's own
counters and history go into one checkpoint, so a resumed run continues exactly where
an uninterrupted one would be.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainwell import checkpoints
from trainwell.distributed import unwrap
from trainwell.training.result import FitResult


class Snapshot:
    """The loop's stateful parts, saved and restored together."""

    def __init__(self, *, model: nn.Module, **parts: Any) -> None:
        self.model = model
        self.parts = {name: part for name, part in parts.items() if part is not None}

    @staticmethod
    def copy_weights(model: nn.Module) -> dict[str, torch.Tensor]:
        """A detached copy of the model's state (for restore-best)."""
        return {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}

    def state(self, epoch: int, result: Any, best_state: dict | None, best_loss: float) -> dict:
        parts = {
            name: part.state_dict()
            for name, part in self.parts.items()
            if hasattr(part, "state_dict")
        }
        return {
            "model": unwrap(self.model).state_dict(),
            "parts": parts,
            "rng": checkpoints.rng_state(),
            "best_model": best_state,
            "loop": {
                "epoch": epoch,
                "steps": result.steps,
                "skipped_steps": result.skipped_steps,
                "history": result.history,
                "best_epoch": result.best_epoch,
                "best_metrics": result.best_metrics,
                "best_loss": best_loss,
                "stop_reason": result.stop_reason,
                "finished": result.finished,
            },
        }

    def save(
        self,
        manager: Any,
        epoch: int,
        result: Any,
        best_state: dict | None,
        best_loss: float,
        metrics: dict[str, float],
    ) -> Path:
        return manager.save(self.state(epoch, result, best_state, best_loss), epoch, metrics)

    def restore(self, path: str | Path) -> tuple[int, Any, dict | None, float]:
        """Load a snapshot; returns (next epoch, FitResult so far, best weights, best loss)."""
        state = checkpoints.load(path)
        unwrap(self.model).load_state_dict(state["model"])
        for name, part in self.parts.items():
            if name in state["parts"]:
                part.load_state_dict(state["parts"][name])
        checkpoints.set_rng_state(state["rng"])
        loop = state["loop"]
        result = FitResult(
            history=list(loop["history"]),
            best_epoch=loop["best_epoch"],
            best_metrics=dict(loop["best_metrics"]),
            epochs_run=loop["epoch"] + 1,
            steps=loop["steps"],
            skipped_steps=loop["skipped_steps"],
            stop_reason=loop.get("stop_reason", "max_epochs"),
            finished=bool(loop.get("finished", False)),
        )
        return loop["epoch"] + 1, result, state.get("best_model"), float(loop["best_loss"])
