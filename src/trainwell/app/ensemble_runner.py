"""Train the members of an ensemble from one config, evaluate them, and write the report files.

Three sources of diversity (``config.ensemble.diversity``):

* ``"seeds"``: member ``i`` is a full run with seed ``config.seed + i`` (its own
  initialization, shuffling and dropout masks); Lakshminarayanan et al. 2017 found this
  alone gives most of an ensemble's benefit.
* ``"bagging"``: the same, and member ``i`` also trains on a bootstrap resample (``n``
  draws with replacement, generator seeded by ``config.seed + i``) of the training split
  (Breiman 1996).
* ``"snapshot"``: one run with a cyclic cosine learning rate restarted every
  ``epochs // members`` epochs; the weights at the end of each cycle are a member
  (Huang et al. 2017, "train 1, get M for free").

The data split is the one of ``config.seed`` for every member, so validation and test
data are the same for all of them. Members of "seeds" and "bagging" are independent runs:
with ``jobs > 1`` they train in parallel spawned processes, one torch thread each.
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from trainwell.app.config import RunConfig
from trainwell.app.data import Splits
from trainwell.app.ensemble_scoring import evaluate_ensemble, inference_cost  # noqa: F401
from trainwell.ensembles.calibration import TemperatureScaler
from trainwell.ensembles.ensemble import Ensemble

DIVERSITY = ("seeds", "bagging", "snapshot")


@dataclass
class EnsembleResult:
    """Trained members, the fitted ensemble and its test-split report.

    Attributes:
        members: the trained member models (CPU unless ``config.device`` says otherwise).
        ensemble: an :class:`~trainwell.Ensemble` of them with ``config.ensemble.combine``.
        scaler: the temperature scaler of the combined logits, fitted on validation.
        runs: per member, how it was trained (seed, epochs, steps, seconds, ...).
        report: JSON-ready metrics: ``members`` (one dict each), ``members_mean``,
            ``ensemble``, ``diversity``, ``inference`` and ``settings``.
        reliability: reliability-diagram data (``metrics.reliability_diagram_data``) of the
            ensemble before (``"ensemble"``) and after (``"ensemble_scaled"``) temperature
            scaling, and of each member (``"member_0"``, ...), on the test split.
        history: the per-epoch history of each training run (one run for "snapshot").
        seconds: wall-clock time of training all members.
    """

    members: list[nn.Module]
    ensemble: Ensemble
    scaler: TemperatureScaler
    runs: list[dict[str, Any]]
    report: dict[str, Any]
    reliability: dict[str, dict[str, Any]]
    history: list[list[dict[str, float]]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """The JSON-ready part: report, runs and training time."""
        return {**self.report, "runs": self.runs, "train_seconds": self.seconds}


# --------------------------------------------------------------------------- training
def bootstrap(splits: Splits, seed: int) -> Splits:
    """A copy of ``splits`` whose training split is a bootstrap resample (with replacement).

    Example:
        >>> from trainwell.app.data import load_splits
        >>> s = load_splits("wine", seed=0)
        >>> b = bootstrap(s, 1)
        >>> b.x_train.shape == s.x_train.shape, len(np.unique(b.x_train, axis=0)) < len(s.x_train)
        (True, True)
    """
    n = len(splits.train)
    index = np.random.default_rng(seed).integers(0, n, size=n)
    return splits.with_train(Subset(splits.train, index.tolist()))


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _new_model(config: RunConfig, splits: Splits) -> nn.Module:
    from trainwell.app.runner import model_for

    return model_for(config, splits)


def _train_member(
    raw_config: dict[str, Any], splits: Splits, index: int, threads: int | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[dict[str, float]]]:
    """One "seeds" or "bagging" member: a ``runner.train`` run (runs in a worker process)."""
    from trainwell.app.run_logging import member_run
    from trainwell.app.runner import train

    if threads is not None:
        torch.set_num_threads(threads)
    config = RunConfig.model_validate(raw_config)
    seed = config.seed + index
    member_config = member_run(config.model_copy(update={"seed": seed}), index)
    if config.ensemble.diversity == "bagging":
        splits = bootstrap(splits, seed)
    result, model = train(member_config, splits=splits)
    run = {"member": index, "seed": seed, **result.summary()}
    run.pop("test", None)
    return _cpu_state(model), run, result.history


def _train_snapshot(
    config: RunConfig, splits: Splits
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, Any]], list[dict[str, float]]]:
    """One run with ``CosineAnnealingWarmRestarts``; a member at the end of each cycle."""
    from trainwell.app.optim import build_optimizer
    from trainwell.app.runner import seed_everything, step_of, task_of
    from trainwell.app.tasks import validation_metrics
    from trainwell.app.techniques import build_techniques
    from trainwell.training.loop import fit

    members = config.ensemble.members
    cycle = config.epochs // members
    # the live weights are the members: no early stop, no checkpoints, no EMA/SWA (its lr)
    config = config.model_copy(
        update={
            "early_stopping": config.early_stopping.model_copy(update={"enabled": False}),
            "checkpoint": config.checkpoint.model_copy(update={"enabled": False}),
            "ema": config.ema.model_copy(update={"enabled": False}),
            "swa": config.swa.model_copy(update={"enabled": False}),
        }
    )
    seed_everything(config.seed)
    model = _new_model(config, splits).to(config.device)
    optimizer = build_optimizer(config, model)
    loader = splits.loader("train", config.batch_size, shuffle=True, seed=config.seed)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=cycle)
    states: list[dict[str, torch.Tensor]] = []
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()

    class Snapshot:
        def on_epoch_end(self, row: dict[str, float]) -> None:
            if (row["epoch"] + 1) % cycle == 0:
                states.append(_cpu_state(model))
                runs.append(
                    {
                        "member": len(runs),
                        "seed": config.seed,
                        "epoch": int(row["epoch"]),
                        "val_loss": row.get("val_loss"),
                        "seconds": time.perf_counter() - started,
                    }
                )

    techniques = build_techniques(config, model, optimizer, len(loader), None)
    task = task_of(config)
    fitted = fit(
        model,
        loader,
        splits.loader("val", 512),
        optimizer,
        task.loss,
        step=step_of(config),
        metrics=validation_metrics(task),
        epochs=cycle * members,
        device=config.device,
        scheduler=scheduler,
        callbacks=(Snapshot(),),
        **techniques,
    )
    for run in runs:
        run["steps_per_member"] = fitted.steps // members
    return states, runs, fitted.history


def _check(config: RunConfig, jobs: int | None) -> int:
    if not isinstance(config, RunConfig):
        raise TypeError(f"config must be a trainwell RunConfig; got {type(config).__name__}.")
    members, diversity = config.ensemble.members, config.ensemble.diversity
    if members < 2:
        raise ValueError(
            f"config.ensemble.members must be at least 2 for an ensemble; got {members}."
        )
    if diversity not in DIVERSITY:
        raise ValueError(
            f"config.ensemble.diversity must be one of {', '.join(DIVERSITY)}; got {diversity!r}."
        )
    if diversity == "snapshot" and config.epochs < members:
        raise ValueError(
            f"diversity='snapshot' needs epochs >= members (one cycle of epochs // members "
            f"epochs per member); got epochs={config.epochs}, members={members}."
        )
    jobs = config.ensemble.jobs if jobs is None else jobs
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer; got {jobs!r}.")
    return jobs


def train_members(
    config: RunConfig, splits: Splits, jobs: int = 1
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, Any]], list[list[dict[str, float]]]]:
    """Train the members; returns their CPU state dicts, run summaries and histories.

    ``jobs > 1`` trains "seeds"/"bagging" members in that many spawned processes with one
    torch thread each (the caller's script needs an ``if __name__ == "__main__":`` guard).
    A "snapshot" ensemble is one run and ignores ``jobs``.
    """
    if config.ensemble.diversity == "snapshot":
        states, runs, history = _train_snapshot(config, splits)
        return states, runs, [history]
    raw = config.model_dump(mode="python")
    n = config.ensemble.members
    if jobs == 1:
        outs = [_train_member(raw, splits, i, None) for i in range(n)]
    else:
        context = multiprocessing.get_context("spawn")
        from trainwell.app.lifetime import worker_init

        pool_args = {"mp_context": context, "initializer": worker_init}  # workers die with us
        with ProcessPoolExecutor(max_workers=min(jobs, n), **pool_args) as pool:
            futures = [pool.submit(_train_member, raw, splits, i, 1) for i in range(n)]
            outs = [f.result() for f in futures]
    return [o[0] for o in outs], [o[1] for o in outs], [o[2] for o in outs]


# --------------------------------------------------------------------------- entry points
def train_ensemble(
    config: RunConfig, splits: Splits | None = None, jobs: int | None = None
) -> EnsembleResult:
    """Train ``config.ensemble.members`` members and evaluate them and their ensemble.

    Args:
        config: the run; ``config.ensemble`` gives members (>= 2), diversity ("seeds",
            "bagging", "snapshot") and combine; every other section applies to each member.
        splits: the data (default: ``config.data`` split with ``config.seed``).
        jobs: worker processes for "seeds"/"bagging" (default ``config.ensemble.jobs``).

    Example:
        >>> from trainwell.app.config_files import load_config
        >>> cfg = load_config(None, ["data.source='wine'", "epochs=2", "model.hidden=[8]",
        ...                          "ensemble.members=2"])
        >>> result = train_ensemble(cfg)
        >>> len(result.members), sorted(result.report["ensemble"])[:4]
        (2, ['acc', 'acc_ts', 'brier', 'brier_ts'])
    """
    from trainwell.app.runner import load_data, resolve_device

    jobs = _check(config, jobs)
    config = config.model_copy(update={"device": resolve_device(config.device)})
    if config.task.kind != "classification":
        raise ValueError(
            "ensemble.members > 1 trains and calibrates a classification ensemble; "
            f"task.kind is {config.task.kind!r} (train regression members as separate runs)"
        )
    splits = splits if splits is not None else load_data(config)
    started = time.perf_counter()
    states, runs, history = train_members(config, splits, jobs)
    seconds = time.perf_counter() - started
    members = []
    for state in states:
        model = _new_model(config, splits)
        model.load_state_dict(state)
        members.append(model.to(config.device))
    ensemble, scaler, report, reliability = evaluate_ensemble(
        members, splits, config.ensemble.combine
    )
    report["settings"].update(
        members=config.ensemble.members, diversity=config.ensemble.diversity, jobs=jobs
    )
    return EnsembleResult(members, ensemble, scaler, runs, report, reliability, history, seconds)


def write_ensemble_outputs(out_dir: str | Path, result: EnsembleResult) -> dict[str, Any]:
    """Write the ensemble's files into ``out_dir`` and return ``{"ensemble": ...}`` for
    ``summary.json``.

    Files: ``members/member_<i>.safetensors`` (weights), ``ensemble_members.csv`` (one row
    per member and one for the ensemble: test metrics before/after temperature scaling),
    ``ensemble.json`` (the summary and reliability data) and ``reliability.png``.
    """
    import json

    from safetensors.torch import save_file

    from trainwell.app.figures import reliability_diagram

    out = Path(out_dir)
    (out / "members").mkdir(parents=True, exist_ok=True)
    for i, member in enumerate(result.members):
        state = {k: v.detach().contiguous().cpu() for k, v in member.state_dict().items()}
        save_file(state, str(out / "members" / f"member_{i}.safetensors"))
    summary = result.summary()
    rows = [{"model": f"member_{i}", **m} for i, m in enumerate(summary["members"])]
    rows += [
        {"model": "members_mean", **summary["members_mean"]},
        {"model": "ensemble", **summary["ensemble"]},
    ]
    from trainwell.app.runner import write_csv

    write_csv(out / "ensemble_members.csv", rows)
    full = {**summary, "reliability": result.reliability}
    (out / "ensemble.json").write_text(json.dumps(full, indent=2), encoding="utf-8")
    reliability_diagram(result.reliability, out / "reliability.png")
    files = ["ensemble_members.csv", "ensemble.json", "reliability.png", "members/"]
    return {"ensemble": {**summary, "files": files}}
