"""``fit()``: one readable training loop that composes trainwell's techniques.

It reads top to bottom like a hand-written loop. Per optimizer step, in order:

1. forward and backward (through the ``Accumulator`` when accumulating),
2. unscale (AMP ``GradScaler``; before anything reads or adds to ``.grad``),
3. the regularizer's gradient (``Regularizer.apply_``), gradient monitoring, gradient
   transforms (clipping, non-finite guard),
4. ``optimizer.step()`` unless a transform said skip, the max-norm constraint,
   EMA update, per-step dropout schedule.

Per epoch: validation (live, EMA and SWA models), early stopping, checkpoint.
Every technique is an argument; leave it ``None`` and the line does nothing.
``callbacks`` only observe (logging, progress, reports).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainwell import distributed as dist_utils
from trainwell.training.evaluation import evaluate
from trainwell.training.progress import Progress
from trainwell.training.result import FitResult
from trainwell.training.snapshot import Snapshot


def _to_device(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch[0], batch[1]
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _call(callbacks: Sequence[Any], event: str, *args: Any) -> None:
    for callback in callbacks:
        method = getattr(callback, event, None)
        if method is not None:
            method(*args)


def fit(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable | None,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    *,
    epochs: int,
    device: str | torch.device | None = None,
    scheduler: Any = None,
    regularizer: Any = None,
    max_norm: float | None = None,
    dropout_schedule: Any = None,
    transforms: Any = None,
    accumulator: Any = None,
    scaler: Any = None,
    autocast_dtype: torch.dtype | None = None,
    monitor: Any = None,
    early_stopping: Any = None,
    checkpoints: Any = None,
    restore_best: bool = False,
    resume: str | Path | bool | None = None,
    ema: Any = None,
    swa: Any = None,
    callbacks: Sequence[Any] = (),
    progress: bool = False,
) -> FitResult:
    """Train ``model`` for ``epochs`` and return its history.

    Args:
        model: the model (may be wrapped in ``DistributedDataParallel``).
        train_loader: yields ``(x, y)`` batches; a ``sampler.set_epoch`` is called per epoch.
        val_loader: validation batches, or None for no validation.
        optimizer: any torch optimizer.
        loss_fn: ``loss_fn(outputs, targets)``, a mean over the batch.
        epochs: number of epochs (a resumed run continues up to it).
        device: where batches go (default: where the model's parameters are).
        scheduler: an LR scheduler stepped once per epoch.
        regularizer: a ``Regularizer``; its gradient is added after backward.
        max_norm: max-norm constraint applied to weights after each step.
        dropout_schedule: a ``DropoutSchedule`` (stepped per step or per epoch by its ``unit``).
        transforms: a gradient transform or ``chain(...)``; ``"skip"`` skips the step.
        accumulator: an ``Accumulator`` for gradient accumulation (exact weighted mean).
        scaler: a ``torch.amp.GradScaler`` for float16 mixed precision.
        autocast_dtype: run the forward pass under ``torch.autocast`` with this dtype.
        monitor: a ``GradMonitor``.
        early_stopping: an ``EarlyStopping``; judged on the validation metrics dict.
        checkpoints: a ``CheckpointManager``; a checkpoint is written after each epoch.
        restore_best: leave the best weights in the model at the end, whatever stopped training.
        resume: a checkpoint path, or True for the manager's latest checkpoint.
        ema: an ``EMA`` updated after every optimizer step and validated each epoch.
        swa: an ``SWA`` updated at the end of each epoch and recalibrated at the end.
        callbacks: objects with optional ``on_epoch_end(row)`` / ``on_fit_end(result)``.
        progress: show a rich progress bar (only on a terminal, rank 0).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    params = [(n, p) for n, p in dist_utils.unwrap(model).named_parameters() if p.requires_grad]
    snapshot = Snapshot(
        model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, ema=ema, swa=swa,
        early_stopping=early_stopping, transforms=transforms, accumulator=accumulator,
        dropout_schedule=dropout_schedule, monitor=monitor,
    )  # fmt: skip
    result = FitResult()
    best_state: dict[str, torch.Tensor] | None = None
    best_loss = float("inf")
    start_epoch = 0
    if resume:
        # under DDP: wait for rank 0's last write, then every rank loads rank 0's choice
        dist_utils.barrier()
        path = checkpoints.latest() if resume is True else Path(resume)
        path = dist_utils.broadcast_object(path)
        if path is not None:
            start_epoch, result, best_state, best_loss = snapshot.restore(path)
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    bar = Progress(enabled=progress and dist_utils.is_main_process(), epochs=epochs)

    def optimizer_step() -> None:
        """Steps 2-4 of the docstring, once the (accumulated) gradient is complete."""
        if scaler is not None:
            scaler.unscale_(optimizer)
        if regularizer is not None:
            regularizer.apply_(model)
        if monitor is not None:
            monitor.before_step(result.steps)
        stats = transforms.apply_(params) if transforms is not None else {}
        skip = bool(stats.get("skip", False))
        if skip:
            result.skipped_steps += 1
        elif scaler is not None:
            scaler.step(optimizer)
        else:
            optimizer.step()
        if scaler is not None:
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if not skip:
            if max_norm is not None:
                _max_norm_(model, max_norm)
            if monitor is not None:
                monitor.after_step(result.steps)
            if ema is not None:
                ema.update(model)
        if dropout_schedule is not None and dropout_schedule.unit == "step":
            dropout_schedule.step()
        result.steps += 1

    started = time.perf_counter()
    try:
        with bar:
            for epoch in range(start_epoch, epochs):
                t0 = time.perf_counter()
                sampler = getattr(train_loader, "sampler", None)
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(epoch)
                model.train()
                loss_sum, items = torch.zeros((), device=device), 0
                batches = len(train_loader) if hasattr(train_loader, "__len__") else None
                bar.start_epoch(epoch, batches)
                for i, batch in enumerate(train_loader):
                    x, y = _to_device(batch, device)
                    # DDP decides at forward time whether backward all-reduces: the forward of
                    # every micro-step that does not end a window runs under no_sync()
                    sync = (
                        accumulator.no_sync(last=i + 1 == batches)
                        if accumulator is not None
                        else contextlib.nullcontext()
                    )
                    with sync, autocast:
                        loss = loss_fn(model(x), y)
                    loss_sum += loss.detach() * len(y)
                    items += len(y)
                    # 1. backward; an accumulated window is the exact weighted mean of its items
                    if accumulator is None:
                        (scaler.scale(loss) if scaler is not None else loss).backward()
                        optimizer_step()
                    elif accumulator.backward(loss, weight=len(y), last=i + 1 == batches):
                        optimizer_step()
                    bar.advance(loss_sum, items)
                if accumulator is not None and accumulator.flush():
                    optimizer_step()  # a loader without len(): the last window ends here
                # per epoch: schedules, SWA, validation, early stopping, checkpoint
                if (swa is None or not swa.update(model, epoch)) and scheduler is not None:
                    scheduler.step()
                if dropout_schedule is not None and dropout_schedule.unit == "epoch":
                    dropout_schedule.step()
                row = {"train_loss": float(loss_sum) / max(items, 1)}
                if val_loader is not None:
                    row.update(evaluate(model, val_loader, loss_fn, device, "val_"))
                    if ema is not None:
                        row.update(evaluate(ema.module, val_loader, loss_fn, device, "ema_val_"))
                    if swa is not None and getattr(swa, "n_averaged", 0):
                        row.update(evaluate(swa.module, val_loader, loss_fn, device, "swa_val_"))
                row = {"epoch": epoch, **dist_utils.all_reduce_mean(row)}
                row["lr"] = optimizer.param_groups[0]["lr"]
                row["seconds"] = time.perf_counter() - t0
                result.history.append(row)
                result.epochs_run = epoch + 1
                stop = False
                if early_stopping is not None:
                    stop = bool(early_stopping(row, step=epoch))
                    improved = bool(getattr(early_stopping, "improved", False))
                else:
                    improved = row.get("val_loss", float("inf")) < best_loss
                    best_loss = min(best_loss, row.get("val_loss", float("inf")))
                if improved:
                    result.best_epoch, result.best_metrics = epoch, dict(row)
                    if restore_best:
                        best_state = Snapshot.copy_weights(model)
                if checkpoints is not None:
                    snapshot.save(checkpoints, epoch, result, best_state, best_loss, row)
                bar.end_epoch(row)
                _call(callbacks, "on_epoch_end", row)
                if stop:
                    result.stop_reason = getattr(early_stopping, "reason", None) or "early_stop"
                    break
    except KeyboardInterrupt:
        result.stop_reason = "interrupted"
    finally:
        if restore_best and best_state is not None:
            dist_utils.unwrap(model).load_state_dict(best_state)
    if swa is not None and getattr(swa, "n_averaged", 0):
        swa.finalize(train_loader)
    if monitor is not None:
        result.grad_history = list(monitor.history)
    result.seconds = time.perf_counter() - started
    _call(callbacks, "on_fit_end", result)
    return result


def _max_norm_(model: nn.Module, max_norm: float) -> None:
    from trainwell.regularization.penalties import max_norm_

    max_norm_(dist_utils.unwrap(model), max_norm)
