"""``fit()``: one readable training loop that composes trainwell's techniques.

It reads top to bottom like a hand-written loop. Per optimizer step, in order:

1. the step hook ``step(model, batch, loss_fn) -> StepOutput`` (forward and loss; the
   default unpacks ``(*inputs, targets)``), then backward (through the ``Accumulator``
   when accumulating, weighted by the step's ``n_items``),
2. unscale (AMP ``GradScaler``; before anything reads or adds to ``.grad``),
3. the regularizer's gradient (``Regularizer.apply_``), gradient monitoring, gradient
   transforms (clipping, non-finite guard),
4. ``optimizer.step()`` unless a transform said skip, the max-norm constraint,
   EMA update, per-step dropout schedule, a ``scheduler_interval="step"`` scheduler.

Per epoch: an ``"epoch"`` scheduler, validation (live, EMA and SWA models, with the
same step and ``metrics``), a plateau scheduler on the monitored metric, early stopping,
checkpoint.
Every technique is an argument; leave it ``None`` and the line does nothing.
``callbacks`` only observe (logging, progress, reports).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainwell import distributed as dist_utils
from trainwell.training.evaluation import Metric, check_metrics, evaluate
from trainwell.training.progress import Progress
from trainwell.training.result import FitResult
from trainwell.training.snapshot import Snapshot
from trainwell.training.steps import Step, as_step_output, supervised_step, to_device

SCHEDULER_INTERVALS = ("epoch", "step")


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
    step: Step = supervised_step,
    metrics: Mapping[str, Metric] | None = None,
    scheduler_interval: str = "epoch",
    scheduler_monitor: str = "val_loss",
) -> FitResult:
    """Train ``model`` for ``epochs`` and return its history.

    Args:
        model: the model (may be wrapped in ``DistributedDataParallel``).
        train_loader: yields batches (``(x, y)``, ``(x1, x2, y)``, or anything ``step``
            understands); a ``sampler.set_epoch`` is called per epoch.
        val_loader: validation batches, or None for no validation.
        optimizer: any torch optimizer.
        loss_fn: ``loss_fn(outputs, targets)``, a mean over the batch (``step`` calls it).
        epochs: number of epochs (a resumed run continues up to it).
        device: where batches go (default: where the model's parameters are).
        scheduler: an LR scheduler, stepped per ``scheduler_interval``; a
            ``ReduceLROnPlateau`` is stepped with ``row[scheduler_monitor]`` after validation.
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
        callbacks: objects with optional ``on_fit_start()`` (before the first batch),
            ``on_step_end(step, info)`` (after every optimizer step, skipped ones included:
            ``step`` counts them from 1; ``info`` holds the transforms' stats, ``"skip"``,
            ``"loss"`` -- the last micro-batch's loss, a tensor on the device -- and ``"lr"``),
            ``on_epoch_end(row)`` and ``on_fit_end(result)``.
        progress: show a rich progress bar (only on a terminal, rank 0).
        step: ``step(model, batch, loss_fn) -> StepOutput(loss, outputs, targets, n_items)``
            (or a tuple of four), called on every batch after ``to_device``, in training,
            validation and SWA's BatchNorm pass. ``loss`` is the mean over ``n_items``
            items; ``n_items`` weights accumulation and the mean train/val losses (an int,
            or a 0-d tensor kept on the device). Default: :func:`supervised_step`.
        metrics: ``{name: fn(outputs, targets) -> float}`` for every validation pass (live,
            EMA, SWA), e.g. ``{"mse": mse, "mae": mae, "r2": r2}``; None keeps the default
            (accuracy for 2-D scores with integer targets).
        scheduler_interval: ``"epoch"`` (step the scheduler once per epoch) or ``"step"``
            (after every optimizer step, including one a transform skipped, never at epoch
            end; OneCycleLR needs this, with ``total_steps = epochs * optimizer steps per
            epoch``).
        scheduler_monitor: the history-row key a ``ReduceLROnPlateau`` watches
            (``"epoch"`` interval only).

    Raises:
        ValueError: bad ``epochs`` or ``scheduler_interval``; a plateau scheduler with
            ``"step"`` interval or whose ``scheduler_monitor`` is not in the row; a
            OneCycleLR whose ``total_steps`` cannot be met by the interval.
        TypeError: a ``step`` that is not callable, bad ``metrics``; from the default step,
            a batch that is not ``(*inputs, targets)``.

    Example:
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> data = DataLoader(TensorDataset(torch.randn(32, 3), torch.randn(32, 1)), batch_size=8)
        >>> net = nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=2 * 4)
        >>> result = fit(net, data, data, opt, F.mse_loss, epochs=2, scheduler=sched,
        ...              scheduler_interval="step")
        >>> result.steps, sched.last_epoch  # stepped once per optimizer step
        (8, 8)
    """
    if epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs}")
    if scheduler_interval not in SCHEDULER_INTERVALS:
        raise ValueError(
            f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}"
        )
    if not callable(step):
        raise TypeError(
            f"step must be a callable step(model, batch, loss_fn) -> StepOutput, got {step!r}"
        )
    metrics = check_metrics(metrics)
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    if plateau and scheduler_interval == "step":
        raise ValueError(
            "scheduler_interval='step' cannot drive a ReduceLROnPlateau: it is stepped with "
            f"the monitored metric ({scheduler_monitor!r}) after each validation; use "
            "scheduler_interval='epoch'"
        )
    if plateau and val_loader is None and scheduler_monitor != "train_loss":
        _missing_monitor(scheduler_monitor, ["epoch", "train_loss"])
    per_step_scheduler = scheduler is not None and scheduler_interval == "step"
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
            if result.finished:  # a stop rule had ended it: train nothing past that decision
                start_epoch = epochs
    _check_one_cycle(scheduler, scheduler_interval, epochs - start_epoch, train_loader,
                     accumulator, swa)  # fmt: skip
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    bar = Progress(enabled=progress and dist_utils.is_main_process(), epochs=epochs)

    step_hooks = [c for c in callbacks if getattr(c, "on_step_end", None) is not None]

    def optimizer_step(loss: torch.Tensor) -> None:
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
        if per_step_scheduler and not getattr(swa, "n_averaged", 0):
            scheduler.step()  # SWA's own schedule takes over once it averages
        result.steps += 1
        if step_hooks:  # tensors stay on the device: a logger that reads them pays the sync
            info = {
                **stats,
                "skip": skip,
                "loss": loss.detach(),
                "lr": optimizer.param_groups[0]["lr"],
            }
            _call(step_hooks, "on_step_end", result.steps, info)

    epoch_scheduler = scheduler is not None and scheduler_interval == "epoch"

    def validate(net: nn.Module, prefix: str) -> dict[str, float]:
        return evaluate(net, val_loader, loss_fn, device, prefix, step=step, metrics=metrics)

    def bn_forward(net: nn.Module, batch: Any) -> None:
        """SWA's BatchNorm pass runs each batch through the same step."""
        with torch.no_grad():
            where = next(iter([*net.parameters(), *net.buffers()]), torch.empty(0)).device
            step(net, to_device(batch, where), loss_fn)

    started = time.perf_counter()
    _call(callbacks, "on_fit_start")
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
                    batch = to_device(batch, device)
                    # DDP decides at forward time whether backward all-reduces: the forward of
                    # every micro-step that does not end a window runs under no_sync()
                    sync = (
                        accumulator.no_sync(last=i + 1 == batches)
                        if accumulator is not None
                        else contextlib.nullcontext()
                    )
                    with sync, autocast:
                        out = as_step_output(step(model, batch, loss_fn))
                    loss, n_items = out.loss, out.n_items
                    loss_sum += loss.detach() * n_items
                    items += n_items  # an int, or a tensor on the device (no sync)
                    # 1. backward; an accumulated window is the exact weighted mean of its items
                    if accumulator is None:
                        (scaler.scale(loss) if scaler is not None else loss).backward()
                        optimizer_step(loss)
                    elif accumulator.backward(loss, weight=n_items, last=i + 1 == batches):
                        optimizer_step(loss)
                    bar.advance(loss_sum, items)
                if accumulator is not None and accumulator.flush():
                    optimizer_step(loss)  # a loader without len(): the last window ends here
                # per epoch: schedules, SWA, validation, early stopping, checkpoint
                swa_took_over = swa is not None and swa.update(model, epoch)
                if epoch_scheduler and not plateau and not swa_took_over:
                    scheduler.step()
                if dropout_schedule is not None and dropout_schedule.unit == "epoch":
                    dropout_schedule.step()
                row = {"train_loss": float(loss_sum) / max(float(items), 1)}
                if val_loader is not None:
                    row.update(validate(model, "val_"))
                    if ema is not None:
                        row.update(validate(ema.module, "ema_val_"))
                    if swa is not None and getattr(swa, "n_averaged", 0):
                        row.update(validate(swa.module, "swa_val_"))
                row = {"epoch": epoch, **dist_utils.all_reduce_mean(row)}
                if plateau and not swa_took_over:
                    if scheduler_monitor not in row:
                        _missing_monitor(scheduler_monitor, list(row))
                    scheduler.step(row[scheduler_monitor])
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
                if stop:  # recorded in the checkpoint: a resumed run must not train past it
                    result.stop_reason = getattr(early_stopping, "reason", None) or "early_stop"
                result.finished = stop
                if checkpoints is not None:
                    snapshot.save(checkpoints, epoch, result, best_state, best_loss, row)
                bar.end_epoch(row)
                _call(callbacks, "on_epoch_end", row)
                if stop:
                    break
    except KeyboardInterrupt:
        result.stop_reason = "interrupted"
    finally:
        if restore_best and best_state is not None:
            dist_utils.unwrap(model).load_state_dict(best_state)
    if swa is not None and getattr(swa, "n_averaged", 0):
        swa.finalize(train_loader, bn_forward)
    if monitor is not None:
        result.grad_history = list(monitor.history)
    result.seconds = time.perf_counter() - started
    _call(callbacks, "on_fit_end", result)
    return result


def _missing_monitor(monitor: str, available: Sequence[str]) -> None:
    raise ValueError(
        f"scheduler_monitor={monitor!r} is not a metric of the history row (available: "
        f"{', '.join(available)}); the ReduceLROnPlateau scheduler needs it: pass "
        "scheduler_monitor one of those (or a val_loader for the val_* metrics)"
    )


def _check_one_cycle(
    scheduler: Any, interval: str, epochs: int, loader: Any, accumulator: Any, swa: Any
) -> None:
    """Fail fast where a OneCycleLR cannot follow its cycle (Smith & Topin 2018).

    It is designed to step once per optimizer step: ``"epoch"`` interval with more
    ``total_steps`` than epochs never finishes the cycle (silently wrong); ``"step"``
    interval with fewer ``total_steps`` than the run's optimizer steps would raise
    mid-run in torch. Without SWA (which stops the base schedule) and with a sized loader.
    """
    if not isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR) or swa is not None:
        return
    total, done = scheduler.total_steps, scheduler.last_epoch
    if interval == "epoch" and total > done + epochs:
        raise ValueError(
            f"OneCycleLR has total_steps={total} but scheduler_interval='epoch' steps it only "
            f"{done + epochs} times; it is designed to step per optimizer step: pass "
            "scheduler_interval='step' with total_steps = epochs * optimizer steps per epoch"
        )
    if interval == "step" and hasattr(loader, "__len__"):
        window = getattr(accumulator, "steps", 1) if accumulator is not None else 1
        planned = epochs * -(-len(loader) // window)
        if done + planned > total:
            raise ValueError(
                f"OneCycleLR has total_steps={total} but this run makes {done + planned} "
                f"optimizer steps ({epochs} epochs of {-(-len(loader) // window)}); pass "
                "total_steps = epochs * optimizer steps per epoch"
            )


def _max_norm_(model: nn.Module, max_norm: float) -> None:
    from trainwell.regularization.penalties import max_norm_

    max_norm_(dist_utils.unwrap(model), max_norm)
