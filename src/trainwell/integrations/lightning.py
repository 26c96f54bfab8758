"""Lightning callbacks that run trainwell's techniques inside ``lightning.Trainer``.

Each callback wraps one of trainwell's technique objects, so a Lightning user adopts it
by adding a callback, without rewriting the training step:

* :class:`GradientTransformCallback` -- a gradient transform or ``chain(...)``; a step the
  chain says to skip leaves the weights and the optimizer state untouched.
* :class:`RegularizerCallback` -- ``Regularizer.apply_`` (the penalty's gradient).
* :class:`GradMonitorCallback` -- ``GradMonitor``, its rows logged with ``pl_module.log``.
* :class:`EMACallback` -- an ``EMA`` of the weights, optionally validated in their place.
* :class:`EarlyStoppingCallback` -- trainwell's ``EarlyStopping`` on the validation metrics.
* :class:`DropoutScheduleCallback` -- a ``DropoutSchedule``, per step or per epoch.

Hook order relied on (Lightning 2.x, automatic optimization): the training step and its
backward run once per micro-batch; once per optimizer step, after the last backward of an
``accumulate_grad_batches`` window (and after DDP's gradient all-reduce), the precision
plugin unscales the gradients (``precision="16-mixed"``; ``bf16-mixed`` and 32-bit have no
scaler), then calls ``on_before_optimizer_step`` for every callback, then the module's own
hook, then Lightning's ``gradient_clip_val`` clipping, then ``optimizer.step()`` (through
the ``GradScaler`` under ``16-mixed``). Without a scaler the closure, the hook and the
clipping all run inside ``optimizer.step(closure)``, before the update reads ``.grad``.
``trainer.global_step`` counts optimizer steps (skipped ones too) and is one higher by the
following ``on_train_batch_end``. Validation ends (and ``on_validation_end`` runs) before
``on_train_epoch_end``, where ``ModelCheckpoint`` usually saves, so a checkpoint holds the
state of the epoch's early-stopping check.

The gradient callbacks act in the order of trainwell's own loop
(:func:`trainwell.training.fit`), whatever their order in ``callbacks``: regularizer,
then monitor, then transforms. The first of them in ``trainer.callbacks`` runs all of
them in that order in ``on_before_optimizer_step``; the others do nothing there.
After each optimizer step (seen in ``on_train_batch_end`` as a change of
``trainer.global_step``, so once per window under gradient accumulation), the monitor
measures the update, the EMA averages and a per-step dropout schedule advances; a step
that the transforms skipped is not averaged or recorded, as in ``fit()``.

Written for automatic optimization (one optimizer, Lightning's default); ``16-mixed`` needs
a GPU (on CPU Lightning replaces it by ``bf16-mixed``). Lightning is an optional extra:
importing this module without it raises :class:`trainwell.integrations.MissingExtra`
naming ``pip install 'trainwell[lightning]'``.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

import torch

from trainwell.averaging import EMA
from trainwell.gradients import GradMonitor
from trainwell.gradients.transforms import GradientTransform
from trainwell.integrations import require
from trainwell.regularization import DropoutSchedule, Regularizer
from trainwell.stopping import EarlyStopping

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.utilities import rank_zero_info
except ImportError:  # MissingExtra when Lightning is absent, else the original error
    require("lightning.pytorch", "lightning", "trainwell.integrations.lightning")
    raise

__all__ = [
    "DropoutScheduleCallback",
    "EMACallback",
    "EarlyStoppingCallback",
    "GradMonitorCallback",
    "GradientTransformCallback",
    "RegularizerCallback",
]


def _unscale_if_needed(trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
    """Unscale where Lightning did not: a ``16-mixed`` fused optimizer unscales in ``step``.

    ``GradScaler.step`` then sees the optimizer as unscaled and does not unscale again.
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
        with contextlib.suppress(RuntimeError):  # already unscaled in this step
            scaler.unscale_(optimizer)


def _skipped(trainer: Trainer, step: int) -> bool:
    """True when a :class:`GradientTransformCallback` skipped optimizer step ``step``."""
    return any(
        isinstance(cb, GradientTransformCallback) and cb.skipped_step == step
        for cb in trainer.callbacks
    )


class _StepCallback(Callback):
    """Base of the callbacks that act around each optimizer step.

    ``_before_step`` runs in ``on_before_optimizer_step`` (gradients complete and
    unscaled), in the order of ``stage`` over all such callbacks; ``_after_step`` runs in
    the first ``on_train_batch_end`` after ``trainer.global_step`` moved.
    """

    stage: ClassVar[int] = 0  # 0: regularizer, 1: monitor, 2: transforms
    _seen_step: int = 0  # trainer.global_step at the last on_train_batch_end

    def _before_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Work on the complete gradients of one optimizer step."""

    def _after_step(self, trainer: Trainer, pl_module: LightningModule, skipped: bool) -> None:
        """Work after one optimizer step (``skipped``: the transforms skipped it)."""

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """The first trainwell callback runs every trainwell callback's ``_before_step``."""
        mine = [cb for cb in trainer.callbacks if isinstance(cb, _StepCallback)]
        if mine[0] is not self:
            return
        _unscale_if_needed(trainer, optimizer)
        for cb in sorted(mine, key=lambda c: c.stage):
            cb._before_step(trainer, pl_module, optimizer)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Remember the step count (restored from a checkpoint by now)."""
        self._seen_step = trainer.global_step

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Call ``_after_step`` once per optimizer step, not per micro-batch."""
        if trainer.global_step == self._seen_step:
            return
        self._seen_step = trainer.global_step
        self._after_step(trainer, pl_module, _skipped(trainer, trainer.global_step - 1))


class GradientTransformCallback(_StepCallback):
    """Apply a gradient transform (any ``chain(...)``) and skip the steps it says to skip.

    Rule: on every optimizer step, after Lightning unscaled the accumulated gradients
    (and after the regularizer and the monitor, see the module docstring),
    ``stats = transforms.apply_(named trainable parameters)``. When ``stats["skip"]``,
    every gradient of the optimizer's parameters is set to None, so ``optimizer.step()``
    leaves those parameters and their state (Adam's moments and step count, momentum)
    untouched: torch's optimizers update only parameters that have a gradient.
    Lightning's ``gradient_clip_val`` clipping, which runs after this hook, skips them
    too. Under ``16-mixed`` the ``GradScaler`` already recorded at unscale time whether
    it found Inf/NaN: with a non-finite gradient it skips the step and lowers its scale
    as usual; with finite gradients it calls the (now empty) step and keeps its scale.
    Under DDP ``skip_nonfinite`` decides over all ranks, so every rank skips together.
    The learning-rate scheduler still steps, as in ``fit()``.

    Args:
        transforms: a trainwell gradient transform, e.g.
            ``chain(skip_nonfinite(), clip_by_norm(1.0))``.
        log: log ``skipped_steps`` (the count so far) on every step.

    Attributes:
        last_stats: the stats of the latest step.
        skipped_steps: how many steps were skipped.
        skipped_step: the ``global_step`` of the latest skipped step (None: none yet).

    Example:
        >>> from trainwell.gradients import chain, clip_by_norm, skip_nonfinite
        >>> cb = GradientTransformCallback(chain(skip_nonfinite(), clip_by_norm(1.0)))
        >>> cb.skipped_steps
        0
    """

    stage = 2

    def __init__(self, transforms: GradientTransform, *, log: bool = False) -> None:
        if not callable(getattr(transforms, "apply_", None)):
            raise TypeError(
                "transforms must be a trainwell gradient transform such as "
                f"chain(skip_nonfinite(), clip_by_norm(1.0)), got {transforms!r}"
            )
        self.transforms = transforms
        # not ``self.log``: Lightning sets every callback's ``log`` to the module's ``log``
        self.log_skips = log
        self.last_stats: dict[str, Any] = {}
        self.skipped_steps = 0
        self.skipped_step: int | None = None

    def _before_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        self.last_stats = self.transforms.apply_(params)
        if self.last_stats.get("skip", False):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            self.skipped_steps += 1
            self.skipped_step = trainer.global_step
        if self.log_skips:
            pl_module.log("skipped_steps", float(self.skipped_steps), on_step=True)

    def state_dict(self) -> dict[str, Any]:
        """The transforms' state and the skip count."""
        return {"transforms": self.transforms.state_dict(), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.transforms.load_state_dict(state_dict["transforms"])
        self.skipped_steps = int(state_dict["skipped_steps"])


class RegularizerCallback(_StepCallback):
    """Add a ``Regularizer``'s gradient once per optimizer step.

    Rule: ``g += l1 * sign(w) + 2 * l2 * w`` on the included parameters, in
    ``on_before_optimizer_step``: after the whole accumulation window's backward, after
    DDP's all-reduce (the penalty is the same on every rank) and after unscaling, before
    the monitor, the transforms and Lightning's clipping. With plain SGD this equals
    adding ``regularizer.penalty(model)`` to every micro-batch's loss; with Adam-style
    optimizers prefer decoupled decay (``param_groups``, AdamW).

    Args:
        regularizer: a :class:`trainwell.Regularizer`.

    Example:
        >>> RegularizerCallback(Regularizer(l2=1e-4)).regularizer.l2
        0.0001
    """

    stage = 0

    def __init__(self, regularizer: Regularizer) -> None:
        if not callable(getattr(regularizer, "apply_", None)):
            raise TypeError(f"regularizer must be a trainwell Regularizer, got {regularizer!r}")
        self.regularizer = regularizer

    def _before_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.regularizer.apply_(pl_module)


class GradMonitorCallback(_StepCallback):
    """Run a ``GradMonitor`` around each optimizer step and log its rows.

    Rule: ``monitor.before_step(global_step)`` on the complete, unscaled gradients (after
    the regularizer, before the transforms change them), ``monitor.after_step(step)``
    after the optimizer step; each new row of ``monitor.history`` (every ``every`` steps)
    is logged with ``pl_module.log_dict`` (``on_step=True``), keys ``prefix + key``:
    ``grad_norm``, ``grad_norm/<layer>``, ``update_ratio/<layer>``. A skipped step is not
    recorded. The monitor's state (history, warnings) is in the checkpoint.

    Args:
        monitor: a :class:`trainwell.GradMonitor` built on the LightningModule.
        prefix: put in front of every logged key.

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> GradMonitorCallback(GradMonitor(net, every=10)).monitor.every
        10
    """

    stage = 1

    def __init__(self, monitor: GradMonitor, prefix: str = "") -> None:
        if not callable(getattr(monitor, "before_step", None)):
            raise TypeError(f"monitor must be a trainwell GradMonitor, got {monitor!r}")
        self.monitor = monitor
        self.prefix = prefix

    def _before_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.monitor.before_step(trainer.global_step)

    def _after_step(self, trainer: Trainer, pl_module: LightningModule, skipped: bool) -> None:
        if skipped:
            return
        rows = len(self.monitor.history)
        self.monitor.after_step(trainer.global_step - 1)
        if len(self.monitor.history) > rows:
            row = self.monitor.history[-1]
            values = {f"{self.prefix}{k}": float(v) for k, v in row.items() if k != "step"}
            pl_module.log_dict(values, on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        """The monitor's state."""
        return self.monitor.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.monitor.load_state_dict(state_dict)


class EMACallback(_StepCallback):
    """Keep an exponential moving average of the weights (trainwell's ``EMA``).

    Rule: ``theta_ema <- d * theta_ema + (1 - d) * theta`` after every optimizer step
    (the first update copies), in the ``on_train_batch_end`` after ``global_step`` moved:
    once per ``accumulate_grad_batches`` window, never per micro-batch; a step that a
    :class:`GradientTransformCallback` skipped is not averaged. The ``EMA`` is built in
    ``on_fit_start`` (the model is on its device by then) from the LightningModule; its
    state is the callback's ``state_dict`` in Lightning checkpoints and is loaded on
    resume (``trainer.fit(..., ckpt_path=...)``).

    With ``validate=True`` the EMA weights are copied into the model in
    ``on_validation_start`` and the live weights back in ``on_validation_end`` (which
    runs before ``ModelCheckpoint`` saves), so validation metrics, early stopping and
    best-checkpoint selection judge the average.

    Args:
        decay: the decay per update, in [0, 1].
        validate: validate on the EMA weights instead of the live ones.
        **options: passed to :class:`trainwell.EMA` (``warmup``, ``update_every``,
            ``start_step``, ``buffers``, ``device``, ``dtype``).

    Attributes:
        ema: the :class:`trainwell.EMA` (None until fit starts); ``ema.module`` is the
            averaged model.

    Example:
        >>> EMACallback(decay=0.99).ema is None
        True
    """

    def __init__(self, decay: float = 0.999, *, validate: bool = False, **options: Any) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay <= 1:
            raise ValueError(f"decay must be a number in [0, 1], got {decay!r}")
        self.decay = float(decay)
        self.validate = validate
        self.options = options
        self.ema: EMA | None = None
        self._pending: dict[str, Any] | None = None
        self._swap: contextlib.AbstractContextManager[Any] | None = None

    @property
    def state_key(self) -> str:
        """Distinct for EMAs of different decays."""
        return self._generate_state_key(decay=self.decay)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Build the EMA from the model and load a checkpoint's state into it."""
        if self.ema is None:
            self.ema = EMA(pl_module, self.decay, **self.options)
        if self._pending is not None:
            self.ema.load_state_dict(self._pending)
            self._pending = None

    def _after_step(self, trainer: Trainer, pl_module: LightningModule, skipped: bool) -> None:
        if self.ema is not None and not skipped:
            self.ema.update(pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """With ``validate``: put the EMA weights into the model."""
        if self.validate and self.ema is not None and self._swap is None:
            self._swap = self.ema.swapped(pl_module)
            self._swap.__enter__()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Put the live weights back."""
        self._swap_back()

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        """Never leave the EMA weights in the model."""
        self._swap_back()

    def _swap_back(self) -> None:
        swap, self._swap = self._swap, None
        if swap is not None:
            swap.__exit__(None, None, None)

    def state_dict(self) -> dict[str, Any]:
        """The EMA's counters and averaged tensors (``{}`` before fit starts)."""
        if self.ema is None:
            return dict(self._pending or {})
        return self.ema.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the EMA, or keep it until ``on_fit_start`` builds one."""
        if self.ema is None:
            self._pending = dict(state_dict)
        else:
            self.ema.load_state_dict(state_dict)


class EarlyStoppingCallback(Callback):
    """Stop a Lightning run by trainwell's ``EarlyStopping`` rules.

    Rule: in ``on_validation_end`` (not during the sanity check, only while fitting) the
    stopper judges ``trainer.callback_metrics`` (its ``monitor``, ``mode``, ``patience``,
    ``min_delta``, ``nan_policy`` ...; ``best_step`` is the epoch); a True decision sets
    ``trainer.should_stop`` (Lightning still honours ``min_epochs``). Under DDP the
    stopper averages the monitored metrics over ranks and reduces its decision, and the
    decision is reduced again with ``trainer.strategy.reduce_boolean_decision`` (so even
    ``sync=False`` stops every rank together). The stopper's state is in the checkpoint,
    so a resumed run stops at the same epoch as an uninterrupted one; a run resumed from
    a checkpoint whose stopper had already stopped trains no further.

    Args:
        stopper: a :class:`trainwell.EarlyStopping`.

    Example:
        >>> EarlyStoppingCallback(EarlyStopping("val_loss", patience=3)).stopper.patience
        3
    """

    def __init__(self, stopper: EarlyStopping) -> None:
        if not isinstance(stopper, EarlyStopping):
            raise TypeError(f"stopper must be a trainwell EarlyStopping, got {stopper!r}")
        self.stopper = stopper

    @property
    def state_key(self) -> str:
        """Distinct per monitored metrics."""
        return self._generate_state_key(monitor=self.stopper.names)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A stopper restored in the stopped state ends the run before it trains."""
        if self.stopper.stopped:
            trainer.should_stop = True

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Judge the validation metrics and set ``trainer.should_stop``."""
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        metrics = dict(trainer.callback_metrics)
        stop = bool(self.stopper(metrics, step=trainer.current_epoch))
        stop = bool(trainer.strategy.reduce_boolean_decision(stop, all=False))
        if stop and not trainer.should_stop:
            rank_zero_info(f"trainwell early stopping: {self.stopper.reason}")
        trainer.should_stop = trainer.should_stop or stop

    def state_dict(self) -> dict[str, Any]:
        """The stopper's state."""
        return self.stopper.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.stopper.load_state_dict(state_dict)


class DropoutScheduleCallback(_StepCallback):
    """Advance a ``DropoutSchedule`` per optimizer step or per epoch, by its ``unit``.

    Rule: ``unit="step"``: ``schedule.step()`` after every optimizer step (once per
    accumulation window; a skipped step counts, as in ``fit()``), so ``total`` is
    ``trainer.estimated_stepping_batches``; ``unit="epoch"``: in ``on_train_epoch_end``.
    The schedule's counter is in the checkpoint and its rate is re-applied on resume.

    Args:
        schedule: a :class:`trainwell.DropoutSchedule` built on the LightningModule.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
        >>> DropoutScheduleCallback(DropoutSchedule(net, "early", 0.5, total=4)).schedule.unit
        'step'
    """

    def __init__(self, schedule: DropoutSchedule) -> None:
        if not isinstance(schedule, DropoutSchedule):
            raise TypeError(f"schedule must be a trainwell DropoutSchedule, got {schedule!r}")
        self.schedule = schedule

    def _after_step(self, trainer: Trainer, pl_module: LightningModule, skipped: bool) -> None:
        if self.schedule.unit == "step":
            self.schedule.step()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Advance an epoch schedule."""
        if self.schedule.unit == "epoch":
            self.schedule.step()

    def state_dict(self) -> dict[str, Any]:
        """The schedule's counter and settings."""
        return self.schedule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned and apply its rate."""
        self.schedule.load_state_dict(state_dict)
