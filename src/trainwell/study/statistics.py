"""Statistics of an ablation study over seeds: means, t-intervals and paired differences.

For each variant and data size: the mean and 95% confidence interval (Student t)
over seeds of the task's test metrics (NLL, accuracy and ECE; or MSE, MAE and R^2);
the paired difference from the base run of the same data size and seed, with its 95%
interval; wall time relative to the base. Averaged weights (EMA, SWA) get their own rows.
"""

from __future__ import annotations

import json
import math
from typing import Any

from trainwell.app.tasks import STUDY_METRICS


def study_metrics(runs: list[dict[str, Any]]) -> tuple[str, ...]:
    """The test metrics a study reports, primary first, from its task (``[task] kind``).

    Classification: NLL, accuracy, ECE; regression: MSE, MAE, R^2.
    """
    kinds = {json.loads(r.get("config") or "{}").get("task", {}).get("kind") for r in runs}
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


def _rows_of(run: dict[str, Any], metrics: tuple[str, ...]) -> list[tuple[str, dict[str, float]]]:
    """(variant label, metrics) of a run: its model, plus EMA/SWA weights when it had them."""
    rows = [(run["variant"], {m: run["final"].get(m, float("nan")) for m in metrics})]
    for prefix, label in (("ema_", "EMA weights"), ("swa_", "SWA weights")):
        if f"{prefix}{metrics[0]}" in run["final"]:
            values = {m: run["final"].get(prefix + m, float("nan")) for m in metrics}
            rows.append((f"{run['variant']} [{label}]", values))
    return rows


def summarize(
    runs: list[dict[str, Any]], metrics: tuple[str, ...] | None = None
) -> list[dict[str, Any]]:
    """One summary row per (data size, variant) from the stored runs; see the module doc.

    ``metrics`` (default :func:`study_metrics`) are summarized; each row names them under
    ``"metrics"``, the primary one first.
    """
    metrics = metrics or study_metrics(runs)
    order: list[tuple[str, str]] = []
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for run in runs:
        done = run["status"] == "done"
        entries = _rows_of(run, metrics) if done else [(run["variant"], None)]
        for label, values in entries:
            key = (run["data"], label)
            if key not in cells:
                order.append(key)
                cells[key] = {"data": run["data"], "variant": label, "by_seed": {}, "failed": [],
                              "seconds": {}, "stops": [], "epochs": []}  # fmt: skip
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
        row = {k: cell[k] for k in ("data", "variant", "failed", "stops", "epochs")}
        row["n"], row["metrics"] = len(cell["by_seed"]), metrics
        for m in metrics:
            row[m] = mean_ci([v[m] for v in cell["by_seed"].values()])
            row[f"d_{m}"] = (float("nan"), float("nan"))
            if base is not None and cell is not base:
                seeds = sorted(set(cell["by_seed"]) & set(base["by_seed"]))
                diffs = [cell["by_seed"][s][m] - base["by_seed"][s][m] for s in seeds]
                row[f"d_{m}"] = mean_ci(diffs)
        row["seconds"] = mean_ci(list(cell["seconds"].values()))[0]
        base_sec = mean_ci(list(base["seconds"].values()))[0] if base else float("nan")
        row["cost"] = row["seconds"] / base_sec if base_sec and base_sec > 0 else float("nan")
        rows.append(row)
    return rows
