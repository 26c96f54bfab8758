"""One run from a config: data, model, optimizer, techniques, ``fit()``, test metrics, files.

This is the application-layer glue between :mod:`trainwell.app.config` and the techniques.
``build_*`` functions turn config sections into technique objects; ``train`` runs
``fit()`` and measures the test split; ``write_run_dir`` writes what a user keeps.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainwell.app.config import RunConfig, to_toml
from trainwell.app.data import Splits, load_splits
from trainwell.app.models import build_model
from trainwell.app.techniques import build_techniques
from trainwell.training.evaluation import predict
from trainwell.training.loop import FitResult, fit


@dataclass
class RunResult:
    """The outcome of one run: history, test metrics and cost."""

    history: list[dict[str, float]]
    test: dict[str, float]
    best_epoch: int | None
    stop_reason: str
    epochs_run: int
    steps: int
    skipped_steps: int
    seconds: float
    n_params: int
    grad_history: list[dict[str, float]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("history")
        data.pop("grad_history")
        return data


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(config: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The configured optimizer; weight decay is decoupled and skips biases/norms by default."""
    opt = config.optimizer
    if opt.weight_decay > 0 and opt.decoupled:
        from trainwell.regularization.penalties import param_groups

        groups: Any = param_groups(model, opt.weight_decay)
        decay = 0.0
    else:
        groups, decay = model.parameters(), opt.weight_decay
    if opt.name == "sgd":
        return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, weight_decay=decay)
    if opt.name == "adam":
        return torch.optim.Adam(groups, lr=opt.lr, weight_decay=decay)
    return torch.optim.AdamW(groups, lr=opt.lr, weight_decay=decay)


def build_scheduler(config: RunConfig, optimizer: torch.optim.Optimizer) -> Any:
    if config.optimizer.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return None


def model_for(config: RunConfig, splits: Splits) -> nn.Module:
    """The configured built-in model, sized for the data (fresh initialization)."""
    m = config.model
    return build_model(
        m.kind,
        splits.n_features,
        splits.n_classes,
        hidden=m.hidden,
        activation=m.activation,
        norm=m.norm,
        dropout=m.dropout,
        channels=m.channels,
    )


def load_data(config: RunConfig) -> Splits:
    d = config.data
    return load_splits(
        d.source,
        target=d.target,
        val_fraction=d.val_fraction,
        test_fraction=d.test_fraction,
        train_fraction=d.train_fraction,
        train_size=d.train_size,
        seed=config.seed,
    )


def test_metrics(model: nn.Module, splits: Splits, device: str) -> dict[str, float]:
    """Accuracy, NLL, ECE and Brier score of a model on the test split."""
    from trainwell import metrics

    logits, labels = predict(model, splits.loader("test", 512), device)
    return {
        "test_acc": metrics.accuracy(logits, labels),
        "test_nll": metrics.nll(logits, labels),
        "test_ece": metrics.ece(logits, labels),
        "test_brier": metrics.brier(logits, labels),
    }


def train(
    config: RunConfig,
    *,
    splits: Splits | None = None,
    out_dir: Path | None = None,
    progress: bool = False,
    resume: bool = False,
    callbacks: tuple = (),
) -> tuple[RunResult, nn.Module]:
    """Train one configured run; returns its result and the trained model.

    Under ``torchrun`` (``WORLD_SIZE > 1``) or an initialized process group, the run
    is data-parallel: ``config.batch_size`` is the global batch, split evenly over
    the processes by a per-epoch reseeded sharded sampler, and the model is wrapped
    in ``DistributedDataParallel``; the returned model is the unwrapped module.
    """
    from trainwell import distributed as dist_utils
    from trainwell.app.launch import init_from_env

    device = init_from_env(config.device)
    if device != config.device:
        config = config.model_copy(update={"device": device})
    nproc, rank = dist_utils.world_size(), dist_utils.rank()
    if config.batch_size % nproc:
        raise ValueError(
            f"batch_size {config.batch_size} is the global batch and must be divisible by "
            f"the number of processes ({nproc})"
        )
    seed_everything(config.seed)
    splits = splits or load_data(config)
    model = model_for(config, splits).to(config.device)
    if nproc > 1:
        cuda = config.device.startswith("cuda")
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.device(config.device).index] if cuda else None
        )
    optimizer = build_optimizer(config, model)
    train_loader = splits.loader(
        "train",
        config.batch_size // nproc,
        shuffle=True,
        seed=config.seed,
        rank=rank,
        world_size=nproc,
    )
    techniques = build_techniques(config, model, optimizer, len(train_loader), out_dir)
    started = time.perf_counter()
    fitted: FitResult = fit(
        model,
        train_loader,
        splits.loader("val", 512),
        optimizer,
        epochs=config.epochs,
        device=config.device,
        scheduler=build_scheduler(config, optimizer),
        progress=progress,
        resume=resume,
        callbacks=callbacks,
        **techniques,
    )
    seconds = time.perf_counter() - started
    model = dist_utils.unwrap(model)
    test = test_metrics(model, splits, config.device)
    extra: dict[str, Any] = {
        "processes": nproc,
        "global_batch_size": config.batch_size,
        "batch_size_per_process": config.batch_size // nproc,
        "lr": config.optimizer.lr,
    }
    for name in ("ema", "swa"):
        averaged = techniques.get(name)
        if averaged is not None and (name == "ema" or getattr(averaged, "n_averaged", 0)):
            scores = test_metrics(averaged.module, splits, config.device)
            extra.update({f"{name}_{k}": v for k, v in scores.items()})
    result = RunResult(
        history=fitted.history,
        test=test,
        best_epoch=fitted.best_epoch,
        stop_reason=fitted.stop_reason,
        epochs_run=fitted.epochs_run,
        steps=fitted.steps,
        skipped_steps=fitted.skipped_steps,
        seconds=seconds,
        n_params=sum(p.numel() for p in model.parameters()),
        grad_history=fitted.grad_history,
        extra=extra,
    )
    return result, model


def write_run_dir(out_dir: Path, config: RunConfig, result: RunResult, model: nn.Module) -> None:
    """config.toml, metrics.csv, model.safetensors, summary.json and curves.png.

    Only the main process (rank 0) writes; other ranks return at once.
    """
    from safetensors.torch import save_file

    from trainwell.app.figures import learning_curves
    from trainwell.distributed import is_main_process

    if not is_main_process():
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.toml").write_text(to_toml(config), encoding="utf-8")
    write_csv(out_dir / "metrics.csv", result.history)
    if result.grad_history:
        write_csv(out_dir / "grad_norms.csv", result.grad_history)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"))
    summary = {"config": config.model_dump(mode="json"), **result.summary()}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    learning_curves(result.history, out_dir / "curves.png")


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows of dicts as CSV; columns are the union of keys in first-seen order."""
    import csv

    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
