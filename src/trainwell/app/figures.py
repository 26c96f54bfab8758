"""Figures of a run (matplotlib, headless Agg backend).

* :func:`learning_curves` -- train/val loss and val accuracy per epoch of one run.
* :func:`reliability_diagram` -- accuracy against confidence of an ensemble and its members.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def learning_curves(history: list[dict[str, float]], path: Path | BinaryIO) -> None:
    """Train/val loss and the main validation metric per epoch, side by side, as a PNG.

    The metric is accuracy for classification, R^2 (or MSE) for regression: the first of
    ``val_acc``, ``val_r2``, ``val_mse`` the history holds.
    """
    epochs = [row["epoch"] + 1 for row in history]
    first = history[0] if history else {}
    metric = next((m for m in ("acc", "r2", "mse") if f"val_{m}" in first), None)
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
    for key, label in (("train_loss", "train"), ("val_loss", "val"), ("ema_val_loss", "EMA val")):
        if key in first:
            ax_loss.plot(epochs, [row[key] for row in history], label=label)
    names = {"acc": "accuracy", "r2": "R²", "mse": "MSE"}
    if metric is not None:
        for key, label in ((f"val_{metric}", "val"), (f"ema_val_{metric}", "EMA val")):
            if key in first:
                ax_metric.plot(epochs, [row[key] for row in history], label=label)
        ax_metric.set(ylabel=names[metric], title=f"Validation {names[metric]}")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_metric.set(xlabel="epoch")
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _curve(data: dict[str, Any]) -> tuple[list[float], list[float]]:
    pairs = [
        (c, a)
        for c, a in zip(data["confidence"], data["accuracy"], strict=True)
        if c is not None and a is not None
    ]
    return [c for c, _ in pairs], [a for _, a in pairs]


def reliability_diagram(reliability: dict[str, dict[str, Any]], path: str | Path) -> None:
    """Accuracy against confidence per bin, as a PNG, plus a histogram of confidences.

    ``reliability`` maps names to ``metrics.reliability_diagram_data`` dicts: the members
    (``"member_<i>"``) are drawn thin and grey, ``"ensemble"`` and ``"ensemble_scaled"``
    (after temperature scaling) in colour; the diagonal is perfect calibration.
    """
    fig, (ax, ax_hist) = plt.subplots(
        2, 1, figsize=(5.2, 6.2), height_ratios=(3, 1), sharex=True, constrained_layout=True
    )
    ax.plot([0, 1], [0, 1], ls="--", color="black", lw=0.8, label="perfect calibration")
    first = True
    for name, data in reliability.items():
        if name.startswith("member_"):
            xs, ys = _curve(data)
            label = f"members (mean ECE {_mean_ece(reliability):.3f})" if first else None
            ax.plot(xs, ys, color="grey", lw=0.8, alpha=0.6, marker=".", label=label)
            first = False
    styles = {"ensemble": ("tab:blue", "ensemble"), "ensemble_scaled": ("tab:orange", "+ T")}
    for name, (color, label) in styles.items():
        if name in reliability:
            data = reliability[name]
            xs, ys = _curve(data)
            ax.plot(xs, ys, color=color, lw=2, marker="o", ms=3.5)
            ax.lines[-1].set_label(f"{label} (ECE {data['ece']:.3f})")
            centers = [
                (lo + hi) / 2 for lo, hi in zip(data["edges"][:-1], data["edges"][1:], strict=True)
            ]
            width = (data["edges"][1] - data["edges"][0]) * 0.45
            offset = -width / 2 if name == "ensemble" else width / 2
            ax_hist.bar([c + offset for c in centers], data["count"], width, color=color)
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title="Reliability (test split)")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8, loc="upper left")
    ax_hist.set(xlabel="confidence (max probability)", ylabel="samples")
    ax_hist.set_yscale("symlog")
    ax_hist.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean_ece(reliability: dict[str, dict[str, Any]]) -> float:
    values = [d["ece"] for k, d in reliability.items() if k.startswith("member_")]
    return sum(values) / max(len(values), 1)
