"""The optimizer and learning-rate scheduler of a run, from ``[optimizer]`` and ``[scheduler]``.

``[optimizer] name`` is any ``torch.optim`` class by name (``"RMSprop"``; the lower-case
``sgd`` / ``adam`` / ``adamw`` of earlier configs still work) or ``"module:Class"``;
``lr``, ``weight_decay`` (decoupled through :func:`trainwell.param_groups` by default) and
``momentum`` (SGD) are passed where the class takes them, ``[optimizer.args]`` adds the
rest. ``[scheduler] name`` is any ``torch.optim.lr_scheduler`` class or ``"module:Class"``
with ``[scheduler.args]``; ``interval`` says whether it steps per optimizer step or per
epoch. What the schedule's length depends on is filled in when not given:
``total_steps`` (OneCycleLR), ``T_max`` (CosineAnnealingLR) and ``total_iters``
(LinearLR, PolynomialLR, ...) become the number of optimizer steps (``interval = "step"``)
or epochs (``"epoch"``) of the run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trainwell.app.config import OPTIMIZER_ALIASES, RunConfig
from trainwell.app.entry_points import EntryPointError, call, resolve_callable, takes

LENGTH_ARGS = ("total_steps", "T_max", "total_iters")


def optimizer_class(name: str) -> type:
    """The optimizer class a config names (``"adamw"``, ``"RMSprop"``, ``"pkg.mod:Opt"``)."""
    if ":" in name:
        return resolve_callable("optimizer.name", name)  # type: ignore[return-value]
    return getattr(torch.optim, OPTIMIZER_ALIASES.get(name.lower(), name))


def build_optimizer(config: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The configured optimizer; weight decay is decoupled and skips biases/norms by default."""
    opt = config.optimizer
    cls = optimizer_class(opt.name)
    if opt.weight_decay > 0 and opt.decoupled:
        from trainwell.regularization.penalties import param_groups

        groups: Any = param_groups(model, opt.weight_decay)
        decay = 0.0
    else:
        groups, decay = model.parameters(), opt.weight_decay
    provided: dict[str, Any] = {"lr": opt.lr, "weight_decay": decay}  # where cls names them
    if cls is torch.optim.SGD:
        provided["momentum"] = opt.momentum
    optimizer = call("optimizer.name", opt.name, cls, opt.args, provided, positional=(groups,))
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise EntryPointError(
            f"optimizer.name = {opt.name!r} built a {type(optimizer).__name__}, not a "
            "torch.optim.Optimizer"
        )
    return optimizer


def scheduler_spec(config: RunConfig) -> tuple[str, dict[str, Any], str]:
    """``(name, args, interval)``; ``optimizer.scheduler = "cosine"`` is the old spelling."""
    if config.optimizer.scheduler == "cosine":
        return "CosineAnnealingLR", {}, "epoch"
    s = config.scheduler
    return s.name, dict(s.args), s.interval


def build_scheduler(
    config: RunConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> tuple[Any, str]:
    """The configured scheduler (or None) and its interval (``"epoch"`` or ``"step"``)."""
    name, args, interval = scheduler_spec(config)
    if name == "none":
        return None, interval
    if ":" in name:
        cls: Any = resolve_callable("scheduler.name", name)
    else:
        cls = getattr(torch.optim.lr_scheduler, name)
    length = config.epochs * steps_per_epoch if interval == "step" else config.epochs
    given = {"epochs", "steps_per_epoch"} & set(args)
    for key in LENGTH_ARGS:
        if takes(cls, key) and key not in args and not given:
            args[key] = length
    if cls is torch.optim.lr_scheduler.OneCycleLR and "max_lr" not in args:
        args["max_lr"] = config.optimizer.lr
    plateau = isinstance(cls, type) and issubclass(cls, torch.optim.lr_scheduler.ReduceLROnPlateau)
    if plateau and interval == "step":
        raise EntryPointError(
            f"scheduler.name = {name!r} watches a validation metric once per epoch; "
            'set scheduler.interval = "epoch"'
        )
    if plateau and "mode" not in args:
        from trainwell.app.tasks import higher_is_better

        if higher_is_better(config.scheduler.monitor):
            args["mode"] = "max"
    scheduler = call("scheduler.name", name, cls, args, positional=(optimizer,))
    return scheduler, interval
