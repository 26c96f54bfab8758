"""Figures of the ablation report (matplotlib, headless Agg backend).

``draw_all`` writes summary.png (effect sizes with intervals and cost), the
learning curves overlaid per data size with early-stopping points, the strength
effects (the paired test effect vs base against each grid key's strength, one line per
data size, the strength chosen on validation ringed) and the gradient-norm traces of
runs that monitored them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

from trainwell.app.tasks import METRIC_NAMES, higher_is_better
from trainwell.study.recommend import best_on_validation, short_key, strength, strength_groups

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = plt.get_cmap("tab10").colors
LINES = ("-", "--", ":", "-.")


def _style(i: int, variant: str) -> dict[str, Any]:
    """Distinct colour and dash per variant; the base is a thick black line."""
    if variant == "base":
        return {"color": "black", "lw": 2.6, "ls": "-", "zorder": 5}
    return {"color": COLORS[i % 10], "lw": 1.4, "ls": LINES[(i // 10) % len(LINES)]}


def _mean_curve(curves: list[list[float]]) -> list[float]:
    length = max((len(c) for c in curves), default=0)
    out = []
    for i in range(length):
        vals = [c[i] for c in curves if i < len(c) and math.isfinite(c[i])]
        out.append(sum(vals) / len(vals) if vals else float("nan"))
    return out


def _panel(metric: str) -> tuple[str, str, float]:
    """``(row key, title, scale)`` of a summary panel of a metric's paired difference."""
    if metric.endswith("_acc"):
        return f"d_{metric}", "Δ test accuracy vs base (points)", 100.0
    better = "higher" if higher_is_better(metric) else "lower"
    name = METRIC_NAMES.get(metric, metric)
    return f"d_{metric}", f"Δ test {name} vs base ({better} is better)", 1.0


def summary_figure(rows: list[dict[str, Any]], path: Path) -> None:
    """Paired differences from base (the two main metrics) with 95% intervals, and time cost."""
    primary, secondary = rows[0]["metrics"][:2] if rows else ("test_nll", "test_acc")
    rows = [r for r in rows if r["variant"] != "base"]
    variants = list(dict.fromkeys(r["variant"] for r in rows)) or ["(no variants)"]
    datas = list(dict.fromkeys(r["data"] for r in rows)) or [""]
    height = 1.2 + 0.32 * len(variants) * max(1, len(datas)) ** 0.5
    fig, axes = plt.subplots(1, 3, figsize=(13, height), sharey=True, constrained_layout=True)
    panels = (_panel(primary), _panel(secondary), ("cost", "training time relative to base", 1.0))
    step = 0.7 / max(1, len(datas))
    for ax, (key, title, scale) in zip(axes, panels, strict=False):
        for j, data in enumerate(datas):
            ys, xs, errs = [], [], []
            for i, variant in enumerate(variants):
                row = next((r for r in rows if r["variant"] == variant and r["data"] == data), None)
                if row is None:
                    continue
                value = row[key] if key == "cost" else row[key][0]
                err = 0.0 if key == "cost" else row[key][1]
                ys.append(i + (j - (len(datas) - 1) / 2) * step)
                xs.append(value * scale)
                errs.append(err * scale if math.isfinite(err) else 0.0)
            color = COLORS[j % len(COLORS)]
            if key == "cost":
                ax.barh(ys, xs, height=step * 0.9, color=color, alpha=0.8, label=data)
            else:
                ax.errorbar(xs, ys, xerr=errs, fmt="o", color=color, capsize=3, label=data)
        ax.axvline(1.0 if key == "cost" else 0.0, color="#555", lw=1, ls="--")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(variants)), variants)
    axes[0].invert_yaxis()
    if len(datas) > 1:
        axes[2].legend(frameon=False, fontsize=8, loc="lower right")
    fig.suptitle("Effect of each variant (mean and 95% CI of the paired difference over seeds)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def learning_curves(runs: list[dict[str, Any]], path: Path) -> None:
    """Validation loss per epoch (mean over seeds) per variant; x marks early stops."""
    done = [r for r in runs if r["status"] == "done"]
    datas = list(dict.fromkeys(r["data"] for r in done))
    fig, axes = plt.subplots(1, max(1, len(datas)), figsize=(5.5 * max(1, len(datas)), 4),
                             squeeze=False, constrained_layout=True)  # fmt: skip
    variants = list(dict.fromkeys(r["variant"] for r in done))
    for ax, data in zip(axes[0], datas, strict=False):
        for i, variant in enumerate(variants):
            group = [r for r in done if r["data"] == data and r["variant"] == variant]
            curves = [r["history"].get("val_loss", []) for r in group]
            mean = _mean_curve(curves)
            if not mean:
                continue
            style = _style(i, variant)
            ax.plot(range(1, len(mean) + 1), mean, label=variant, **style)
            for r, curve in zip(group, curves, strict=False):
                if r["stop_reason"] not in (None, "max_epochs") and curve:
                    ax.plot(len(curve), curve[-1], "x", color=style["color"], ms=8, mew=2)
        ax.set(title=f"validation loss ({data})", xlabel="epoch", ylabel="val loss")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(frameon=False, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log_axis(values: list[float]) -> bool:
    """A log x-axis for strengths that are all positive and span more than 10x.

    Example:
        >>> log_axis([1e-4, 1e-2]), log_axis([0.2, 0.5]), log_axis([0.0, 1e-2])
        (True, False, False)
    """
    return bool(values) and min(values) > 0 and max(values) / min(values) > 10


def strength_effects(rows: list[dict[str, Any]], path: Path) -> bool:
    """The primary test effect vs base against strength, one line per data size.

    One panel per grid key with two or more strengths (:func:`recommend.strength_groups`):
    the mean paired difference from the base with its 95% t-interval at each strength; the
    dashed line at zero is the base, a ring marks the strength chosen on validation. The
    x-axis is logarithmic when every strength is positive and they span more than 10x.
    False when no key has two strengths.
    """
    groups = strength_groups(rows)
    if not groups:
        return False
    fig, axes = plt.subplots(1, len(groups), figsize=(4.8 * len(groups), 3.8), squeeze=False,
                             constrained_layout=True)  # fmt: skip
    key_d, ylabel, scale = _panel(rows[0]["metrics"][0])
    for ax, (key, by_data) in zip(axes[0], groups.items(), strict=False):
        values = []
        for j, (data, group) in enumerate(by_data.items()):
            color = COLORS[j % len(COLORS)]
            xs = [strength(r)[1] for r in group]  # type: ignore[index]
            ms = [r[key_d][0] * scale for r in group]
            hs = [r[key_d][1] * scale if math.isfinite(r[key_d][1]) else 0.0 for r in group]
            ax.errorbar(xs, ms, yerr=hs, marker="o", capsize=3, label=data, color=color)
            best = best_on_validation(group)
            if best is not None:
                x = strength(best)[1]  # type: ignore[index]
                ax.plot(x, best[key_d][0] * scale, "o", ms=14, mfc="none", mec=color, mew=1.8)
            values += xs
        ax.axhline(0.0, color="#555", lw=1, ls="--")
        if log_axis(values):
            ax.set_xscale("log")
        name = short_key(key)
        ax.set(title=name, xlabel=f"{name} (ring: chosen on validation)", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(frameon=False, fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def grad_traces(runs: list[dict[str, Any]], path: Path) -> bool:
    """Global gradient norm per step (mean over seeds) per variant; False if none monitored."""
    done = [r for r in runs if r["status"] == "done" and r["grad_trace"]]
    if not done:
        return False
    datas = list(dict.fromkeys(r["data"] for r in done))
    fig, axes = plt.subplots(1, len(datas), figsize=(5.5 * len(datas), 3.6), squeeze=False,
                             constrained_layout=True)  # fmt: skip
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    for ax, data in zip(axes[0], datas, strict=False):
        for i, variant in enumerate(variants):
            group = [r for r in done if r["data"] == data and r["variant"] == variant]
            if not group:
                continue
            steps = [row["step"] for row in max((r["grad_trace"] for r in group), key=len)]
            mean = _mean_curve(
                [[row.get("grad_norm", math.nan) for row in r["grad_trace"]] for r in group]
            )
            ax.plot(steps[: len(mean)], mean, label=variant, **_style(i, variant))
        ax.set(title=f"gradient norm ({data})", xlabel="optimizer step", ylabel="global L2 norm")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(frameon=False, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def draw_all(
    runs: list[dict[str, Any]], rows: list[dict[str, Any]], out_dir: Path
) -> list[tuple[str, Path]]:
    """Write every figure; ``(title, path)`` pairs, summary.png first."""
    figures = [("summary", out_dir / "summary.png")]
    summary_figure(rows, figures[0][1])
    figures.append(("Learning curves (x: early stopping stopped)", out_dir / "curves.png"))
    learning_curves(runs, figures[-1][1])
    if strength_effects(rows, out_dir / "strength.png"):
        figures.append(("Effect of each strength by data size", out_dir / "strength.png"))
    if grad_traces(runs, out_dir / "grad_norms.png"):
        figures.append(("Gradient-norm traces", out_dir / "grad_norms.png"))
    return figures
