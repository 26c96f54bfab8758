"""Config sections -> technique objects, as keyword arguments for ``fit()``.

Each ``_build_*`` reads one section and returns None when the technique is off, so
``fit()`` gets exactly the techniques the config switched on.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainwell.app.config import RunConfig


def _regularizer(config: RunConfig) -> Any:
    reg = config.regularization
    if reg.l1 == 0 and reg.l2 == 0 and not reg.per_layer:
        return None
    from trainwell.regularization.penalties import DEFAULT_EXCLUDE, Regularizer

    exclude = [*DEFAULT_EXCLUDE, *reg.exclude] + (["embedding"] if reg.exclude_embeddings else [])
    kwargs: dict[str, Any] = {"l1": reg.l1, "l2": reg.l2, "exclude": exclude}
    if reg.per_layer:
        kwargs["per_layer"] = {k: tuple(v) for k, v in reg.per_layer.items()}
    return Regularizer(**kwargs)


def _dropout(config: RunConfig, model: nn.Module, steps_per_epoch: int) -> Any:
    drop = config.dropout
    if drop.p is None and not drop.per_layer and drop.schedule == "none":
        return None
    from trainwell.regularization.dropout import DropoutSchedule, set_dropout

    if drop.p is not None:
        set_dropout(model, drop.p)
    if drop.per_layer:
        set_dropout(model, drop.per_layer)
    if drop.schedule == "none":
        return None
    total = config.epochs * (steps_per_epoch if drop.schedule_unit == "step" else 1)
    p = drop.p if drop.p is not None else _max_rate(config)
    return DropoutSchedule(
        model, drop.schedule, p=p, total=total, at=drop.schedule_fraction, unit=drop.schedule_unit
    )


def _max_rate(config: RunConfig) -> float:
    rates = config.model.dropout
    return max(rates) if isinstance(rates, list) else float(rates)


def _transforms(config: RunConfig) -> Any:
    grads = config.gradients
    clip = grads.clip
    from trainwell import gradients

    parts: list[Any] = []
    if grads.skip_nonfinite:
        parts.append(gradients.skip_nonfinite())
    if clip.mode == "value":
        parts.append(gradients.clip_by_value(clip.value))
    elif clip.mode == "norm" and math.isfinite(clip.max_norm):
        parts.append(gradients.clip_by_norm(clip.max_norm, clip.norm_type))
    elif clip.mode == "adaptive":
        parts.append(gradients.adaptive_clip(clip.clipping))
    elif clip.mode == "auto":
        parts.append(gradients.auto_clip(clip.percentile))
    elif clip.mode == "zscore":
        parts.append(gradients.zscore_clip(clip.z))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else gradients.chain(*parts)


def _averaging(config: RunConfig, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    out: dict[str, Any] = {}
    if config.ema.enabled:
        from trainwell.averaging import EMA

        e = config.ema
        out["ema"] = EMA(
            model, e.decay, warmup=e.warmup, update_every=e.update_every, buffers=e.buffers
        )
    if config.swa.enabled:
        from trainwell.averaging import SWA
        from trainwell.averaging.running import swa_start_epoch

        start = swa_start_epoch(config.swa.start, config.epochs)
        swa_lr = config.swa.lr if config.swa.lr is not None else config.optimizer.lr
        out["swa"] = SWA(
            model,
            start,
            optimizer,
            swa_lr,
            anneal_epochs=max(1, min(config.swa.anneal_epochs, config.epochs - start)),
        )
    return out


def _stopping(config: RunConfig, out_dir: Path | None) -> dict:
    out: dict[str, Any] = {}
    es = config.early_stopping
    checkpoints = config.checkpoint.enabled and out_dir is not None
    if not (es.enabled or checkpoints):
        return out
    from trainwell.stopping import resolve_mode

    # the config stores the mode it inferred from the name; resolve again for a config that
    # skipped validation (model_construct), so early stopping and best-k share one direction
    mode = resolve_mode(es.monitor, es.mode)
    if es.enabled:
        from trainwell.stopping import EarlyStopping

        out["early_stopping"] = EarlyStopping(
            monitor=es.monitor,
            mode=mode,
            patience=es.patience,
            min_delta=es.min_delta,
            delta_mode=es.delta_mode,
            baseline=es.baseline,
            warmup=es.warmup,
            stopping_threshold=es.stopping_threshold,
            divergence_threshold=es.divergence_threshold,
            smoothing=None if es.smoothing == "none" else es.smoothing,
            window=es.window,
            nan_policy=es.nan_policy,
        )
        out["restore_best"] = es.restore_best
    if checkpoints and out_dir is not None:
        from trainwell.checkpoints import CheckpointManager

        out["checkpoints"] = CheckpointManager(
            out_dir / "checkpoints",
            keep_last=config.checkpoint.keep_last,
            keep_best=config.checkpoint.keep_best,
            monitor=es.monitor,
            mode=mode,
        )
    return out


def build_techniques(
    config: RunConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps_per_epoch: int,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``fit()`` for every technique the config switches on."""
    kwargs: dict[str, Any] = {
        "regularizer": _regularizer(config),
        "max_norm": config.regularization.max_norm,
        "dropout_schedule": _dropout(config, model, steps_per_epoch),
        "transforms": _transforms(config),
    }
    if config.gradients.accumulate > 1:
        from trainwell.gradients.accumulation import Accumulator

        kwargs["accumulator"] = Accumulator(model, config.gradients.accumulate)
    if config.gradients.monitor:
        from trainwell.gradients.monitor import GradMonitor

        kwargs["monitor"] = GradMonitor(model, every=config.gradients.monitor_every)
    kwargs.update(_averaging(config, model, optimizer))
    kwargs.update(_stopping(config, out_dir))
    return kwargs
