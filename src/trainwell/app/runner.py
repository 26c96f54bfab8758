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

from trainwell.app.config import RunConfig
from trainwell.app.config_files import to_toml
from trainwell.app.data import Splits, load_splits
from trainwell.app.models import build_model
from trainwell.app.optim import build_optimizer, build_scheduler
from trainwell.app.run_logging import (
    build_loggers,
    check_logging,
    close_loggers,
    log_test,
    upload_run_files,
)
from trainwell.app.tasks import Task, build_task, validation_metrics
from trainwell.app.techniques import build_techniques
from trainwell.gradients import NonFiniteGradError
from trainwell.training.evaluation import predict
from trainwell.training.loop import fit
from trainwell.training.result import FitResult
from trainwell.training.steps import supervised_step


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


class RunFailed(RuntimeError):
    """Training started and then could not go on (NaN/Inf gradients past the guard's limit,
    ``nan_policy = "raise"``); ``history`` holds the epochs finished before it."""

    def __init__(self, message: str, history: list[dict[str, float]]) -> None:
        super().__init__(message)
        self.history = history


class _Epochs:
    """A ``fit()`` callback that keeps every finished epoch's row (what a failed run has)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_epoch_end(self, row: dict[str, float]) -> None:
        self.rows.append(dict(row))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; a device this torch
    cannot use is a one-line ``ValueError``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device = {device!r}, but this torch build sees no CUDA GPU "
                f"(torch {torch.__version__}); use device = 'auto' or 'cpu'"
            )
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device = {device!r}, but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device = 'mps', but MPS is not available here; use 'auto' or 'cpu'")
    return device


def model_for(config: RunConfig, splits: Splits) -> nn.Module:
    """The configured model, sized for the data (fresh initialization).

    A ``model.target`` is called with ``[model.args]``, plus ``n_features``, ``n_classes``,
    ``n_outputs`` and ``input_shape`` from the data where its signature names them.
    """
    m = config.model
    if m.target:
        from trainwell.app.entry_points import EntryPointError, call, resolve_callable

        provided = {
            "n_features": splits.n_features,
            "n_classes": splits.n_classes,
            "n_outputs": splits.n_outputs,
            "input_shape": splits.input_shape,
        }
        fn = resolve_callable("model.target", m.target)
        model = call("model.target", m.target, fn, m.args, provided)
        if not isinstance(model, nn.Module):
            raise EntryPointError(
                f"model.target = {m.target!r} returned a {type(model).__name__}, not a "
                "torch.nn.Module"
            )
        return model
    if splits.n_features is None or splits.n_outputs is None or len(splits.input_shape or ()) != 1:
        raise ValueError(
            f"model.kind {m.kind!r} needs items of 1-D features and known outputs; the data "
            f"gives input_shape {splits.input_shape}: set model.target to your own model"
        )
    return build_model(
        m.kind,
        splits.n_features,
        splits.n_outputs,
        hidden=m.hidden,
        activation=m.activation,
        norm=m.norm,
        dropout=m.dropout,
        channels=m.channels,
    )


def load_data(config: RunConfig) -> Splits:
    """The run's splits: a ``data.target`` entry point, or a built-in / CSV / NPZ source."""
    d = config.data
    if d.target and ":" in d.target:
        from trainwell.app.user_data import load_user_splits

        return load_user_splits(config)
    splits = load_splits(
        d.source,
        target=d.target,
        task=config.task.kind,
        val_fraction=d.val_fraction,
        test_fraction=d.test_fraction,
        train_fraction=d.train_fraction,
        train_size=d.train_size,
        seed=d.data_seed(config.seed),
    )
    if d.collate:
        from trainwell.app.entry_points import resolve_callable

        splits.collate = resolve_callable("data.collate", d.collate)
    splits.num_workers, splits.pin_memory = d.num_workers, d.pin_memory
    return splits


def task_of(config: RunConfig) -> Task:
    return build_task(config.task.kind, config.task.loss, config.task.metrics)


def step_of(config: RunConfig) -> Any:
    """The batch hook: ``[task] step`` or trainwell's default ``(inputs..., target)`` step."""
    if config.task.step:
        from trainwell.app.entry_points import resolve_callable

        return resolve_callable("task.step", config.task.step)
    return supervised_step


def test_metrics(
    model: nn.Module,
    splits: Splits,
    device: str,
    task: Task | None = None,
    step: Any = supervised_step,
) -> dict[str, float]:
    """The task's test metrics (``test_acc``, ``test_nll``, ... or ``test_mse``, ...)."""
    task = task or build_task(splits.task, None, [])
    outputs, targets = predict(
        model, splits.loader("test", 512), device, step=step, loss_fn=task.loss
    )
    return task.evaluate(outputs, targets, "test_")


def precision_args(config: RunConfig, device: str) -> dict[str, Any]:
    """``fit()`` keyword arguments for ``precision``: autocast dtype and GradScaler."""
    if config.precision == "bf16":
        return {"autocast_dtype": torch.bfloat16}
    if config.precision == "16-mixed":
        kind = torch.device(device).type
        return {"autocast_dtype": torch.float16, "scaler": torch.amp.GradScaler(kind)}
    return {}


def weights_fingerprint(model: nn.Module) -> str:
    """XXH3-64 (hex) of the model's state in key order, names, dtypes and shapes included:
    equal for runs that start from the same weights (fine-tunes of one checkpoint), which
    is what a weight soup needs."""
    import xxhash

    digest = xxhash.xxh3_64()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy())  # its buffer: no copy
    return digest.hexdigest()


def train(
    config: RunConfig,
    *,
    splits: Splits | None = None,
    out_dir: Path | None = None,
    progress: bool = False,
    resume: bool | Path = False,
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

    configured = config  # as written in config.toml (device "auto" stays "auto")
    device = init_from_env(resolve_device(config.device), config.distributed.timeout_s)
    if device != config.device:
        config = config.model_copy(update={"device": device})
    nproc, rank = dist_utils.world_size(), dist_utils.rank()
    if config.batch_size % nproc:
        raise ValueError(
            f"batch_size {config.batch_size} is the global batch and must be divisible by "
            f"the number of processes ({nproc})"
        )
    if dist_utils.is_main_process():
        check_logging(configured)  # a missing extra or store fails before the data loads
    seed_everything(config.seed)
    splits = splits or load_data(config)
    task, step = task_of(config), step_of(config)
    model = model_for(config, splits).to(config.device)
    init_hash = weights_fingerprint(model)
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
    steps_per_epoch = -(-len(train_loader) // config.gradients.accumulate)
    scheduler, interval = build_scheduler(config, optimizer, steps_per_epoch)
    techniques = build_techniques(config, model, optimizer, len(train_loader), out_dir)
    if techniques.get("checkpoints") is not None:  # each checkpoint knows its run's config
        from trainwell.app.run_dir import checkpoint_header

        techniques["checkpoints"].header.update(checkpoint_header(configured))
    trained = torch.compile(model) if config.compile else model
    loggers = build_loggers(configured, out_dir, resume, techniques.get("monitor"))
    started, epochs = time.perf_counter(), _Epochs()
    try:
        fitted: FitResult = fit(
            trained,
            train_loader,
            splits.loader("val", 512),
            optimizer,
            task.loss,
            epochs=config.epochs,
            device=config.device,
            scheduler=scheduler,
            scheduler_interval=interval,
            scheduler_monitor=config.scheduler.monitor,
            step=step,
            metrics=validation_metrics(task),
            progress=progress,
            resume=resume,
            callbacks=(*callbacks, *loggers, epochs),
            **precision_args(config, config.device),
            **techniques,
        )
    except NonFiniteGradError as err:
        close_loggers(loggers, "FAILED")
        raise RunFailed(
            f"training stopped after {len(epochs.rows)} epoch(s): {err}", epochs.rows
        ) from err
    except FloatingPointError as err:  # early_stopping.nan_policy = "raise"
        close_loggers(loggers, "FAILED")
        raise RunFailed(
            f"training stopped after {len(epochs.rows)} epoch(s): {err} "
            '(early_stopping.nan_policy = "raise"; "stop" or "worst" keep the run going)',
            epochs.rows,
        ) from err
    except BaseException:
        close_loggers(loggers, "FAILED")
        raise
    seconds = time.perf_counter() - started
    model = dist_utils.unwrap(model)
    test = test_metrics(model, splits, config.device, task, step)
    extra: dict[str, Any] = {
        "processes": nproc,
        "global_batch_size": config.batch_size,
        "batch_size_per_process": config.batch_size // nproc,
        "lr": config.optimizer.lr,
        "init_hash": init_hash,
    }
    for name in ("ema", "swa"):
        averaged = techniques.get(name)
        if averaged is not None and (name == "ema" or getattr(averaged, "n_averaged", 0)):
            scores = test_metrics(averaged.module, splits, config.device, task, step)
            extra.update({f"{name}_{k}": v for k, v in scores.items()})
    tested = {k: v for k, v in extra.items() if isinstance(v, float) and "test" in k}
    log_test(loggers, {**test, **tested}, None if out_dir else to_toml(configured))
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
    """config.toml, metrics.csv, model.safetensors, summary.json and curves.png, each atomic.

    Only the main process (rank 0) writes; other ranks return at once.
    """
    import io

    from safetensors.torch import save

    from trainwell.app.figures import learning_curves
    from trainwell.app.run_dir import write_bytes, write_text
    from trainwell.distributed import is_main_process

    if not is_main_process():
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "config.toml", to_toml(config))
    write_csv(out_dir / "metrics.csv", result.history)
    if result.grad_history:
        write_csv(out_dir / "grad_norms.csv", result.grad_history)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    weights = save(state)
    write_bytes(out_dir / "model.safetensors", lambda f: f.write(weights))
    summary = {"config": config.model_dump(mode="json"), **result.summary()}
    write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    figure = io.BytesIO()
    learning_curves(result.history, figure)
    write_bytes(out_dir / "curves.png", lambda f: f.write(figure.getvalue()))
    upload_run_files(out_dir, config)


def write_failed_run(out_dir: Path, config: RunConfig, failure: RunFailed) -> None:
    """What a run that failed during training has: metrics.csv so far and a summary.json
    naming the failure (its checkpoints, if any, are already on disk)."""
    from trainwell.app.run_dir import write_text

    if failure.history:
        write_csv(out_dir / "metrics.csv", failure.history)
    summary = {
        "config": config.model_dump(mode="json"),
        "failed": str(failure),
        "epochs_run": len(failure.history),
    }
    write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    upload_run_files(out_dir, config)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows of dicts as CSV (written atomically); columns are the union of keys in order."""
    import csv
    import io

    from trainwell.app.run_dir import write_text

    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue())
