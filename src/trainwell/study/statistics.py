"""Statistics of an ablation study over seeds: means, t-intervals, paired differences, p-values.

For each variant and data size: the mean and 95% confidence interval (Student t)
over seeds of the task's test metrics (NLL, accuracy and ECE; or MSE, MAE and R^2);
the paired difference from the base run of the same data size and seed, with its 95%
interval and its paired t-test p-value on the primary test metric, adjusted for the
study's family of comparisons (:mod:`trainwell.study.comparisons`); the mean validation
value of the primary metric, on which winners are chosen; wall time relative to the
base. Averaged weights (EMA, SWA) get their own rows.

**The primary metric** is ``[ablation] metric`` (:func:`primary_metric`): a validation
metric (``val_nll`` by default for classification, ``val_mse`` for regression,
``val_acc``, ``val_loss`` or a user metric ``val_<name>``) whose direction is known.
Winners are chosen on it and reported on its test counterpart (``test_nll`` for
``val_nll``), which the comparisons use.

**The validation value of a run** (:func:`validation_value`) is the metric at the epoch
whose weights were tested: the best epoch (``run["best_epoch"]``) when early stopping
was on with ``early_stopping.restore_best`` (the default), since the loop then restores
those weights, stopped early or not; otherwise the last epoch. Averaged weights (EMA,
SWA) are the final average: the last epoch's ``ema_val_*`` / ``swa_val_*``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trainwell.app.tasks import STUDY_METRICS
from trainwell.stopping import metric_mode
from trainwell.study.comparisons import correct

#: Losses whose validation value (``val_loss``) is the negative log-likelihood.
NLL_LOSSES = (None, "cross_entropy", "bce_with_logits")
#: What each epoch's validation reports, by task kind (besides user metrics).
VALIDATED = {"classification": ("loss", "nll", "acc"), "regression": ("loss", "mse", "mae", "r2")}
AVERAGED = (("ema_", "EMA weights"), ("swa_", "SWA weights"))


@dataclass(frozen=True)
class Primary:
    """The metric a study chooses winners on (``name``) and compares variants by (``test``).

    ``key`` is the history key that holds ``name`` (the validation NLL is stored as
    ``val_loss``); ``higher`` says which way is better.
    """

    name: str
    key: str
    test: str
    higher: bool


def _config(run: dict[str, Any]) -> dict[str, Any]:
    return json.loads(run.get("config") or "{}")


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    """A table of a raw config, or ``{}`` when it is missing or not a table."""
    table = config.get(name)
    return table if isinstance(table, dict) else {}


def primary_metric(config: dict[str, Any], metric: str | None = None) -> Primary:
    """The primary metric ``metric`` (``[ablation] metric``) of a study of ``config``.

    The default is ``val_nll`` for classification (``val_loss`` when the loss is not a
    log-likelihood) and ``val_mse`` for regression. ``val_nll`` is read from
    ``val_loss``, which is the NLL under ``cross_entropy`` / ``bce_with_logits``. The
    test counterpart of ``val_<name>`` is ``test_<name>``; the test split reports no
    loss, so ``val_loss`` is compared by the task's primary test metric. The direction
    is the known one (:func:`trainwell.stopping.metric_mode`); a user metric's is told
    by ``early_stopping.mode`` with ``early_stopping.monitor`` naming it.

    Raises:
        ValueError: a metric the validation does not report, or whose direction is unknown.

    Example:
        >>> primary_metric({})
        Primary(name='val_nll', key='val_loss', test='test_nll', higher=False)
        >>> primary_metric({"task": {"kind": "regression"}}, "val_r2").test
        'test_r2'
    """
    task, es = _section(config, "task"), _section(config, "early_stopping")
    kind = "regression" if task.get("kind") == "regression" else "classification"
    nll = task.get("loss") in NLL_LOSSES
    default = "val_mse" if kind == "regression" else "val_nll" if nll else "val_loss"
    metric = metric or default
    targets = task.get("metrics") if isinstance(task.get("metrics"), list) else []
    user = [str(t).rpartition(":")[2].rpartition(".")[2] for t in targets]
    known = [*VALIDATED[kind], *user]
    name = metric[4:] if metric.startswith("val_") else ""
    if name not in known or (name == "nll" and not nll):
        names = ", ".join(f"val_{n}" for n in known if n != "nll" or nll)
        raise ValueError(
            f"ablation.metric: {metric!r} is not a metric the validation of this "
            f"{kind} task reports; accepted: {names}"
        )
    mode = metric_mode(metric) or (es.get("mode") if es.get("monitor") == metric else None)
    if mode is None:
        raise ValueError(
            f"ablation.metric: trainwell does not know whether {metric!r} is better high or "
            f'low; set early_stopping.monitor = "{metric}" and early_stopping.mode = "max" '
            'or "min" (early stopping may stay off)'
        )
    key = "val_loss" if name == "nll" else metric
    test = STUDY_METRICS[kind][0] if name == "loss" else f"test_{name}"
    return Primary(metric, key, test, mode == "max")


def study_metrics(runs: list[dict[str, Any]]) -> tuple[str, ...]:
    """The test metrics a study reports, primary first, from its task (``[task] kind``).

    Classification: NLL, accuracy, ECE; regression: MSE, MAE, R^2.
    """
    kinds = {_config(r).get("task", {}).get("kind") for r in runs}
    kinds.discard(None)
    return STUDY_METRICS[kinds.pop() if len(kinds) == 1 else "classification"]


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the Student-t confidence interval (NaN width for one value).

    Example:
        >>> m, h = mean_ci([1.0, 2.0, 3.0])
        >>> round(m, 3), round(h, 3)
        (2.0, 2.484)
    """
    from scipy import stats

    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    n = len(vals)
    mean = sum(vals) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    return mean, float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)


def paired_p(diffs: list[float]) -> float:
    """Two-sided p-value of the paired t-test that the mean difference is zero.

    ``t = mean / (sd / sqrt(n))`` with ``n - 1`` degrees of freedom (Student 1908), the
    same as ``scipy.stats.ttest_rel`` on the pairs. NaN with fewer than two finite
    differences; 1 for differences that are all zero, 0 for equal nonzero ones.

    Example:
        >>> round(paired_p([0.1, 0.2, 0.3]), 4)
        0.0742
    """
    from scipy import stats

    vals = [d for d in diffs if math.isfinite(d)]
    n = len(vals)
    if n < 2:
        return float("nan")
    mean = sum(vals) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in vals) / (n - 1))
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    return float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))


def evaluated_epoch(run: dict[str, Any]) -> int:
    """Index of the epoch whose weights were tested (-1: the last); see the module doc.

    Example:
        >>> es = '{"early_stopping": {"enabled": true}}'
        >>> evaluated_epoch({"config": es, "best_epoch": 3}), evaluated_epoch({"best_epoch": 3})
        (3, -1)
    """
    es = _section(_config(run), "early_stopping")
    best = run.get("best_epoch")
    if es.get("enabled") and es.get("restore_best", True) and best is not None:
        return int(best)
    return -1


def validation_value(run: dict[str, Any], key: str, prefix: str = "") -> float:
    """The validation metric ``key`` of the tested weights of a run (NaN when not stored).

    ``prefix`` ``"ema_"`` / ``"swa_"`` reads the averaged weights', at the last epoch.

    Example:
        >>> run = {"history": {"val_loss": [0.9, 0.5, 0.7]}, "best_epoch": 1}
        >>> validation_value(run, "val_loss")
        0.7
    """
    values = run["history"].get(prefix + key, [])
    epoch = -1 if prefix else evaluated_epoch(run)
    return float(values[epoch]) if -len(values) <= epoch < len(values) else float("nan")


def _rows_of(run: dict[str, Any], metrics: tuple[str, ...], key: str) -> list[tuple[str, dict]]:
    """(variant label, values) of a run: its model, plus EMA/SWA weights when it had them.

    The values are the test ``metrics`` and, under ``"val"``, the validation value.
    """
    values = {m: run["final"].get(m, float("nan")) for m in metrics}
    rows = [(run["variant"], {**values, "val": validation_value(run, key)})]
    for prefix, label in AVERAGED:
        if f"{prefix}{metrics[0]}" in run["final"]:
            values = {m: run["final"].get(prefix + m, float("nan")) for m in metrics}
            values["val"] = validation_value(run, key, prefix)
            rows.append((f"{run['variant']} [{label}]", values))
    return rows


def sequential_p(diffs: Sequence[float], n_min: int, n_max: int) -> float:
    """The sequential p-value of paired differences in seed order, valid however the seeds
    were added (:mod:`trainwell.study.sequential` gives the procedure and its proof).

    ``min(1, K * min_n p_n)`` over the looks ``n = max(2, n_min) ... min(len, n_max)``,
    ``K = n_max - n_min + 1``; NaN before the first look.

    Example:
        >>> round(sequential_p([0.1, 0.2, 0.3], 3, 3), 4)  # one look: the t-test
        0.0742
        >>> round(sequential_p([0.1, 0.2, 0.3, 0.2], 3, 10), 4)  # 8 looks: 8 x min p
        0.1302
    """
    vals = [float(d) for d in diffs if math.isfinite(d)]
    k = n_max - n_min + 1
    ps = [paired_p(vals[:n]) for n in range(max(2, n_min), min(len(vals), n_max) + 1)]
    ps = [p for p in ps if math.isfinite(p)]
    return min(1.0, k * min(ps)) if ps else float("nan")


def summarize(
    runs: list[dict[str, Any]],
    metrics: tuple[str, ...] | None = None,
    *,
    metric: str | None = None,
    correction: str = "holm",
    looks: tuple[int, int] | None = None,
) -> list[dict[str, Any]]:
    """One summary row per (data size, variant) from the stored runs; see the module doc.

    ``metric`` is the primary validation metric (:func:`primary_metric`); ``metrics``
    (default: its test counterpart, then the rest of :func:`study_metrics`) are
    summarized, the first one compared by paired t-tests whose p-values are adjusted
    by ``correction`` (:func:`trainwell.study.comparisons.correct`). Each row holds, per
    metric ``m``, ``row[m]`` and ``row["d_" + m]`` as (mean, 95% half-width), plus
    ``val`` (the validation metric ``selection``), ``p``, ``p_adj``, ``effect``
    (helps / hurts / none), ``higher``, ``cost``, ``overrides`` and ``averaged``.
    With ``looks = (min, max)`` (``seeds = {min, max}``: seeds added while undecided),
    ``p`` is the :func:`sequential_p` of the paired differences, not the plain t-test.
    """
    base_run = next((r for r in runs if r["variant"] == "base"), runs[0] if runs else {})
    primary = primary_metric(_config(base_run), metric)
    metrics = metrics or (primary.test, *(m for m in study_metrics(runs) if m != primary.test))
    order: list[tuple[str, str]] = []
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for run in runs:
        done = run["status"] == "done"
        entries = _rows_of(run, metrics, primary.key) if done else [(run["variant"], None)]
        for label, values in entries:
            key = (run["data"], label)
            if key not in cells:
                order.append(key)
                cells[key] = {"data": run["data"], "variant": label, "by_seed": {}, "failed": [],
                              "seconds": {}, "stops": [], "epochs": [],
                              "overrides": run["overrides"]}  # fmt: skip
            cell = cells[key]
            if values is None:
                if run["status"] == "failed":
                    cell["failed"].append(run["error"] or "failed")
                continue
            cell["by_seed"][run["seed"]] = values
            cell["seconds"][run["seed"]] = run["train_seconds"] or 0.0
            if "[" not in label:
                cell["epochs"].append(run["epochs_run"])
                if run["stop_reason"] not in (None, "max_epochs"):
                    cell["stops"].append(run["best_epoch"])
    rows = []
    for key in order:
        cell = cells[key]
        base = cells.get((cell["data"], "base"))
        row = {k: cell[k] for k in ("data", "variant", "failed", "stops", "epochs", "overrides")}
        row["n"], row["metrics"], row["selection"] = len(cell["by_seed"]), metrics, primary.name
        row["higher"] = primary.higher
        row["averaged"] = next((p[:-1] for p, label in AVERAGED if f"[{label}]" in key[1]), None)
        row["val"] = mean_ci([v["val"] for v in cell["by_seed"].values()])
        row["p"] = float("nan")
        for m in metrics:
            row[m] = mean_ci([v[m] for v in cell["by_seed"].values()])
            row[f"d_{m}"] = (float("nan"), float("nan"))
            if base is not None and cell is not base:
                seeds = sorted(set(cell["by_seed"]) & set(base["by_seed"]))
                diffs = [cell["by_seed"][s][m] - base["by_seed"][s][m] for s in seeds]
                row[f"d_{m}"] = mean_ci(diffs)
                if m == metrics[0]:
                    row["p"] = paired_p(diffs) if looks is None else sequential_p(diffs, *looks)
        row["seconds"] = mean_ci(list(cell["seconds"].values()))[0]
        base_sec = mean_ci(list(base["seconds"].values()))[0] if base else float("nan")
        row["cost"] = row["seconds"] / base_sec if base_sec and base_sec > 0 else float("nan")
        rows.append(row)
    return correct(rows, correction)
