"""trainwell's techniques inside the Hugging Face ``Trainer``, as ``TrainerCallback`` s.

* :class:`EMACallback`: an :class:`~trainwell.averaging.EMA` of the weights, updated after
  every optimizer step, evaluated in place of the live weights when asked, saved beside
  every checkpoint and restored on ``train(resume_from_checkpoint=...)``.
* :class:`StoppingCallback`: a trainwell :class:`~trainwell.stopping.EarlyStopping` judged
  on the Trainer's evaluation metrics (``val_X`` reads the Trainer's ``eval_X``); its
  patience count survives a resume.
* :class:`GradientTransformCallback`: any gradient transform (``chain(skip_nonfinite(),
  zscore_clip(), ...)``) on the complete accumulated gradient; a step the transform says to
  skip changes neither the weights nor the optimizer state.
* :class:`GradMonitorCallback`: a :class:`~trainwell.gradients.GradMonitor` whose rows are
  kept in ``history`` (and survive a resume).

The Trainer's hook order these callbacks rely on (transformers 5.x, ``Trainer._run_epoch``
and ``_maybe_log_save_evaluate``), per optimizer step::

    on_step_begin -> (forward + backward) x gradient_accumulation_steps, on_substep_end
      -> clip to max_grad_norm (if > 0) and compute the logged grad_norm (this unscales
         fp16 gradients) -> on_pre_optimizer_step -> optimizer.step() -> on_optimizer_step
      -> lr_scheduler.step() -> zero_grad -> global_step += 1 -> on_step_end
      -> log -> evaluate() -> on_evaluate(metrics) -> save checkpoint-N -> on_save

and at the end of an epoch ``on_epoch_end`` followed by the same log / evaluate / save.
``on_train_begin`` runs after a resumed run has loaded the model, the optimizer and the
``TrainerState`` of the checkpoint (so ``state.global_step`` is the checkpoint's step).

Checkpoint files: every callback writes its ``state_dict()`` with
:func:`trainwell.checkpoints.save` (atomic, never pickle) to ``<output_dir>/checkpoint-N/
<filename>`` in ``on_save``. A resumed run (``state.global_step > 0`` at
``on_train_begin``) reads it back from ``<output_dir>/checkpoint-<global_step>`` (what
``resume_from_checkpoint=True`` picks), or from the folder given to ``resume_from(path)``
for a checkpoint elsewhere, because the Trainer gives callbacks no resume path. A missing
file or one from another step raises instead of silently starting over. The Trainer's own
``ExportableState`` mechanism is not used: it rebuilds a callback from JSON arguments
(which cannot hold a stopper or a transform) and only when
``restore_callback_states_from_checkpoint=True``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainwell.averaging.running import EMA
from trainwell.checkpoints.format import load, save
from trainwell.distributed import unwrap
from trainwell.gradients.monitor import GradMonitor
from trainwell.gradients.transforms import GradientTransform
from trainwell.integrations import require
from trainwell.stopping import EarlyStopping

require("transformers", "hf", "trainwell.integrations.hf")
from transformers import (  # noqa: E402  (after the check that names the extra)
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # noqa: E402

__all__ = ["EMACallback", "GradMonitorCallback", "GradientTransformCallback", "StoppingCallback"]

logger = logging.getLogger(__name__)


def _model(kwargs: Mapping[str, Any]) -> nn.Module:
    """The (unwrapped) model the Trainer passes to every hook."""
    model = kwargs.get("model")
    if not isinstance(model, nn.Module):
        raise TypeError(f"the Trainer passed no model to the callback, got {model!r}")
    return unwrap(model)


def _named_dataset(metrics: Mapping[str, Any]) -> bool:
    """True for the metrics of one of several named eval datasets (``eval_<name>_loss``)."""
    return "eval_runtime" not in metrics and any(
        k.startswith("eval_") and k.endswith("_runtime") for k in metrics
    )


class _Checkpointed(TrainerCallback):
    """A callback whose ``state_dict()`` is saved in every ``checkpoint-N`` folder.

    ``on_save`` writes ``{"global_step": N, "state": state_dict()}`` to
    ``<output_dir>/checkpoint-N/<filename>`` (main process only); :meth:`_restore`, called
    from ``on_train_begin``, loads it back when the run was resumed.
    """

    def __init__(self, filename: str) -> None:
        if not isinstance(filename, str) or not filename or Path(filename).name != filename:
            raise ValueError(f"filename must be a plain file name (no folder), got {filename!r}")
        self.filename = filename
        self._resume_dir: Path | None = None

    def resume_from(self, checkpoint: str | os.PathLike) -> None:
        """Restore from this ``checkpoint-N`` folder at the next ``train()`` call.

        Needed only for a checkpoint outside ``args.output_dir``: without it the state is
        read from ``<output_dir>/checkpoint-<global_step>``.
        """
        self._resume_dir = Path(checkpoint)

    def state_dict(self) -> dict[str, Any]:
        """What is saved beside each checkpoint."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        raise NotImplementedError

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Write the state into the checkpoint folder the Trainer has just written."""
        if not args.should_save:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        content = {"global_step": state.global_step, "state": self.state_dict()}
        save(folder / self.filename, content, metadata={"callback": type(self).__name__})

    def _restore(self, args: TrainingArguments, state: TrainerState) -> None:
        """On a resumed run, load the state saved at the checkpoint's step."""
        folder, self._resume_dir = self._resume_dir, None
        if state.global_step == 0:
            return
        folder = folder or Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        path = folder / self.filename
        if not path.is_file():
            raise FileNotFoundError(
                f"{type(self).__name__}: resuming at step {state.global_step} but {path} does "
                "not exist; for a checkpoint outside output_dir call "
                "callback.resume_from(checkpoint_folder) before trainer.train(...)"
            )
        saved = load(path)
        if saved["global_step"] != state.global_step:
            raise ValueError(
                f"{path} was saved at step {saved['global_step']}, but the Trainer resumes at "
                f"step {state.global_step}: it belongs to another checkpoint"
            )
        self.load_state_dict(saved["state"])


class EMACallback(_Checkpointed):
    """Keep an exponential moving average of the weights during ``Trainer.train()``.

    Rule: after every optimizer step (``on_optimizer_step``, i.e. once per accumulated
    batch) ``theta_ema <- d * theta_ema + (1 - d) * theta``, the first update a copy (see
    :class:`~trainwell.averaging.EMA`, whose options this takes). The average is built in
    ``on_train_begin`` and lives in ``callback.ema`` (``callback.ema.module``). A step that
    :class:`GradientTransformCallback` skipped (no parameter has a ``.grad`` left in
    ``on_optimizer_step``) is not averaged.

    Evaluation (``eval_ema=True``): when the Trainer is about to evaluate during training
    (``control.should_evaluate`` after ``on_step_end`` / ``on_epoch_end``, or
    ``eval_on_start``) the EMA weights are copied into the live model; ``on_evaluate``
    copies the live weights back, before the Trainer saves a checkpoint. So the reported
    ``eval_*`` metrics are the EMA's and checkpoints hold the live weights. Place this
    callback after any callback that sets ``should_evaluate`` itself. A dict of eval
    datasets is refused (the Trainer calls ``on_evaluate`` once per dataset, with no hook
    before the next one); for it, and for ``trainer.evaluate()`` outside training, use
    ``with callback.swapped(trainer.model): trainer.evaluate()``.

    Checkpoints: ``checkpoint-N/<filename>`` holds the EMA state; a resumed run restores
    it (see the module docstring). ``copy_at_end=True`` copies the EMA weights into the
    model in ``on_train_end`` (after ``load_best_model_at_end``, which it overrides).

    Args:
        decay: the decay per averaging update, in [0, 1].
        warmup: False, True or ``gamma > 0`` (the EMA's decay warm-up).
        update_every: average on every n-th optimizer step only.
        start_step: optimizer steps before this copy the weights instead of averaging.
        device: keep the average on this device (e.g. ``"cpu"``).
        eval_ema: evaluate the EMA weights instead of the live ones during training.
        copy_at_end: copy the EMA weights into the model when training ends.
        filename: the file written in each checkpoint folder.

    Example:
        >>> callback = EMACallback(decay=0.99)  # Trainer(..., callbacks=[callback])
        >>> callback.ema is None, callback.filename  # the EMA is built in on_train_begin
        (True, 'trainwell_ema.safetensors')
    """

    def __init__(
        self,
        decay: float = 0.999,
        *,
        warmup: bool | float = False,
        update_every: int = 1,
        start_step: int = 0,
        device: torch.device | str | None = None,
        eval_ema: bool = True,
        copy_at_end: bool = False,
        filename: str = "trainwell_ema.safetensors",
    ) -> None:
        super().__init__(filename)
        self._options: dict[str, Any] = {
            "decay": decay,
            "warmup": warmup,
            "update_every": update_every,
            "start_step": start_step,
            "device": device,
        }
        probe = {k: v for k, v in self._options.items() if k != "device"}
        EMA(nn.Linear(1, 1), **probe)  # bad options fail here, not at step 0
        self.eval_ema, self.copy_at_end = bool(eval_ema), bool(copy_at_end)
        self.ema: EMA | None = None
        self._swap: contextlib.ExitStack | None = None

    def _average(self) -> EMA:
        if self.ema is None:
            raise RuntimeError("EMACallback has no average yet: it is built in on_train_begin")
        return self.ema

    def state_dict(self) -> dict[str, Any]:
        """The EMA's counters and averaged tensors."""
        return self._average().state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the EMA's counters and averaged tensors."""
        self._average().load_state_dict(state)

    @contextlib.contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Copy the EMA weights into ``model`` for the ``with`` block, then restore them."""
        with self._average().swapped(model) as live:
            yield live

    def _swap_in(self, model: nn.Module) -> None:
        if self.eval_ema and self._swap is None:
            stack = contextlib.ExitStack()
            stack.enter_context(self.swapped(model))
            self._swap = stack

    def _swap_out(self) -> bool:
        stack, self._swap = self._swap, None
        if stack is not None:
            stack.close()
        return stack is not None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Build the average from the (possibly resumed) model and restore its state."""
        model = _model(kwargs)
        self.ema = EMA(model, **self._options)
        self._restore(args, state)
        if args.eval_on_start:
            self._swap_in(model)

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Average the weights the optimizer has just written (unless the step was skipped)."""
        model = _model(kwargs)
        if any(p.grad is not None for p in model.parameters() if p.requires_grad):
            self._average().update(model)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Swap the EMA weights in when the Trainer will evaluate after this step."""
        if control.should_evaluate:
            self._swap_in(_model(kwargs))

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Swap the EMA weights in when the Trainer will evaluate after this epoch."""
        if control.should_evaluate:
            self._swap_in(_model(kwargs))

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Put the live weights back before the Trainer saves or trains on."""
        if self._swap_out() and _named_dataset(kwargs.get("metrics") or {}):
            raise ValueError(
                "EMACallback(eval_ema=True) cannot evaluate a dict of eval datasets (the "
                "Trainer has no hook between them); pass eval_ema=False and evaluate with "
                "`with callback.swapped(trainer.model): trainer.evaluate()`"
            )

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Never train on swapped-in EMA weights (an evaluation that did not happen)."""
        self._swap_out()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Restore the live weights, then copy the EMA into the model if asked."""
        self._swap_out()
        if self.copy_at_end and self.ema is not None:
            model = _model(kwargs)
            live = [t.detach() for t in (*model.parameters(), *model.buffers())]
            avg = [t.detach() for t in (*self.ema.module.parameters(), *self.ema.module.buffers())]
            with torch.no_grad():
                torch._foreach_copy_(live, [a.to(t.device) for a, t in zip(avg, live, strict=True)])


class StoppingCallback(_Checkpointed):
    """Judge a trainwell :class:`~trainwell.stopping.EarlyStopping` on every evaluation.

    Rule: in ``on_evaluate`` each monitored name is read from the Trainer's metrics (which
    it prefixes ``eval_``): a name in ``metric_names`` reads the key given there, a name
    ``val_X`` reads ``eval_X`` (so the default ``EarlyStopping()``, monitoring
    ``val_loss`` with its known direction, reads ``eval_loss``), any other name is read as
    is (``EarlyStopping("eval_f1", mode="max")``). When the stopper says stop,
    ``control.should_training_stop`` is set and ``callback.reason`` says why. A missing
    monitored metric raises, except in the evaluation of another named eval dataset (none
    of the keys present). The stopper's whole state is saved beside each checkpoint and
    restored on resume, so the patience count continues where it was.

    (Not called ``EarlyStoppingCallback``: the Trainer matches saved callback state to
    callbacks by class name, and that is the name of its own.)

    Args:
        stopper: the early-stopping rule (``EarlyStopping(patience=3)`` ...).
        metric_names: ``{monitored name: Trainer metric key}`` for other spellings.
        filename: the file written in each checkpoint folder.

    Example:
        >>> StoppingCallback(EarlyStopping(patience=3)).keys  # val_loss reads eval_loss
        {'val_loss': 'eval_loss'}
        >>> stopper = EarlyStopping({"val_acc": None, "eval_f1": "max"})
        >>> StoppingCallback(stopper, metric_names={"val_acc": "eval_accuracy"}).keys
        {'val_acc': 'eval_accuracy', 'eval_f1': 'eval_f1'}
    """

    def __init__(
        self,
        stopper: EarlyStopping,
        *,
        metric_names: Mapping[str, str] | None = None,
        filename: str = "trainwell_stopping.safetensors",
    ) -> None:
        super().__init__(filename)
        if not isinstance(stopper, EarlyStopping):
            raise TypeError(f"stopper must be a trainwell EarlyStopping, got {stopper!r}")
        names = dict(metric_names or {})
        unknown = set(names) - set(stopper.names)
        if unknown:
            raise ValueError(f"metric_names has {sorted(unknown)}, not monitored by the stopper")
        self.stopper = stopper
        self.keys = {
            n: names.get(n, "eval_" + n[4:] if n.startswith("val_") else n) for n in stopper.names
        }

    @property
    def reason(self) -> str | None:
        """Why training stopped (None while it goes on)."""
        return self.stopper.reason

    def state_dict(self) -> dict[str, Any]:
        """The stopper's counters, bests and smoothing state."""
        return self.stopper.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the stopper's state."""
        self.stopper.load_state_dict(state)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Restore the stopper of a resumed run."""
        self._restore(args, state)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        """One check of the stopper on this evaluation's metrics."""
        metrics = kwargs.get("metrics") or {}
        missing = [k for k in self.keys.values() if k not in metrics]
        if len(missing) == len(self.keys) and _named_dataset(metrics):
            return control  # another eval dataset's metrics
        if missing:
            raise ValueError(
                f"StoppingCallback monitors {missing}, not in the evaluation metrics "
                f"{sorted(metrics)}; map names with metric_names={{'val_x': 'eval_y'}}"
            )
        values = {n: metrics[k] for n, k in self.keys.items()}
        if self.stopper(values, step=state.global_step):
            control.should_training_stop = True
            logger.info("early stopping at step %d: %s", state.global_step, self.reason)
        return control


class GradientTransformCallback(_Checkpointed):
    """Apply a trainwell gradient transform to the accumulated gradient before each step.

    Rule: in ``on_pre_optimizer_step`` (after the last micro-batch's backward, the DDP
    all-reduce and the Trainer's own clipping and fp16 unscaling) ``transform.apply_`` runs
    on the trainable ``(name, parameter)`` pairs; ``callback.last_stats`` holds what it
    measured. When it says ``"skip"`` every ``.grad`` is set to None, so
    ``optimizer.step()`` leaves the weights and the optimizer state untouched (torch
    optimizers skip parameters without a gradient; so does an fp16 ``GradScaler`` step);
    the step still counts (``global_step``, the learning-rate schedule), is listed in
    ``callback.skipped_steps`` and is not averaged by an :class:`EMACallback`. The
    transform's state (adaptive clippers' history) is saved beside each checkpoint and
    restored on resume.

    The Trainer clips to ``max_grad_norm`` (default 1.0) *before* this hook; a warning says
    so when it is finite and > 0. Set ``max_grad_norm=0`` to let the transform do all the
    clipping. Not for DeepSpeed, whose engine steps the optimizer itself.

    Args:
        transform: ``chain(skip_nonfinite(), zscore_clip(), ...)`` or any one transform.
        filename: the file written in each checkpoint folder.
    """

    def __init__(
        self,
        transform: GradientTransform,
        *,
        filename: str = "trainwell_grad_transform.safetensors",
    ) -> None:
        super().__init__(filename)
        if not callable(getattr(transform, "apply_", None)):
            raise TypeError(
                f"transform must be a gradient transform (with apply_), got {transform!r}"
            )
        self.transform = transform
        self.last_stats: dict[str, Any] = {}
        self.skipped_steps: list[int] = []

    def state_dict(self) -> dict[str, Any]:
        """The transform's state and the steps skipped so far."""
        return {"transform": self.transform.state_dict(), "skipped_steps": list(self.skipped_steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the transform's state and the skipped steps."""
        self.transform.load_state_dict(state["transform"])
        self.skipped_steps = [int(s) for s in state["skipped_steps"]]

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Warn about the Trainer's own clipping; restore the transform of a resumed run."""
        if 0 < args.max_grad_norm < math.inf:
            warnings.warn(
                f"GradientTransformCallback: the Trainer clips gradients to max_grad_norm="
                f"{args.max_grad_norm:g} before the transform runs; set max_grad_norm=0 to "
                "let the transform do all the clipping",
                UserWarning,
                stacklevel=2,
            )
        self._restore(args, state)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Transform the gradients; on a skip, drop them so the step changes nothing."""
        params = [(n, p) for n, p in _model(kwargs).named_parameters() if p.requires_grad]
        self.last_stats = self.transform.apply_(params)
        if self.last_stats.get("skip"):
            for _, p in params:
                p.grad = None
            self.skipped_steps.append(state.global_step + 1)


class GradMonitorCallback(_Checkpointed):
    """Record a :class:`~trainwell.gradients.GradMonitor` around every optimizer step.

    Rule: ``before_step`` in ``on_pre_optimizer_step`` (the accumulated, unscaled
    gradient; placed after a :class:`GradientTransformCallback` it sees the transformed one),
    ``after_step`` in ``on_optimizer_step``. Rows are numbered like the Trainer's logs (the
    step being taken, ``state.global_step + 1``), recorded when ``step % every == 0``, and
    kept in ``callback.history`` (the monitor's, saved beside each checkpoint and restored
    on resume). They are not sent to the Trainer's reporters: a callback cannot call
    ``Trainer.log``, and the reporters run before user callbacks in ``on_log``.

    Args:
        every: record every n-th optimizer step.
        by: per-layer norms by ``"module"`` or by ``"parameter"``.
        window: recorded steps for the exploding / vanishing warnings.
        explode_factor: warn when the norm exceeds this times the running median.
        vanish_tol: warn when a layer's norm stays below this for ``window`` rows.
        filename: the file written in each checkpoint folder.
    """

    def __init__(
        self,
        every: int = 50,
        *,
        by: str = "module",
        window: int = 20,
        explode_factor: float = 10.0,
        vanish_tol: float = 1e-8,
        filename: str = "trainwell_grad_monitor.safetensors",
    ) -> None:
        super().__init__(filename)
        self._options: dict[str, Any] = {
            "every": every,
            "by": by,
            "window": window,
            "explode_factor": explode_factor,
            "vanish_tol": vanish_tol,
        }
        GradMonitor(nn.Linear(1, 1), **self._options)  # bad options fail here
        self.monitor: GradMonitor | None = None

    def _monitor(self) -> GradMonitor:
        if self.monitor is None:
            raise RuntimeError(
                "GradMonitorCallback has no monitor yet: it is built in on_train_begin"
            )
        return self.monitor

    @property
    def history(self) -> list[dict[str, float]]:
        """The rows: ``step``, ``grad_norm``, ``grad_norm/<layer>``, ``update_ratio/<layer>``."""
        return [] if self.monitor is None else self.monitor.history

    def state_dict(self) -> dict[str, Any]:
        """The monitor's recent norms, warnings and history."""
        return self._monitor().state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the monitor's state."""
        self._monitor().load_state_dict(state)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Build the monitor on the model; restore it on a resumed run."""
        self.monitor = GradMonitor(_model(kwargs), **self._options)
        self._restore(args, state)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Measure the gradients of the step being taken."""
        self._monitor().before_step(state.global_step + 1)

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Measure the update and record the row."""
        self._monitor().after_step(state.global_step + 1)
