"""What ``fit()`` returns: the per-epoch history and how training ended."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FitResult:
    """What ``fit()`` returns: per-epoch history and how training ended."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    stop_reason: str = "max_epochs"
    epochs_run: int = 0
    steps: int = 0
    skipped_steps: int = 0
    grad_history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    #: True once a stop rule (early stopping) ended training: resuming it trains nothing more.
    #: A run that reached its last epoch can be resumed with more epochs.
    finished: bool = False
