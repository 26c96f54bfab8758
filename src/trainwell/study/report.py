"""The report of an ablation study: a verdict, an HTML page and a terminal table.

The numbers come from :mod:`trainwell.study.statistics`. The verdict is written from
them: a difference whose paired interval excludes zero is called an improvement or a
degradation, anything else "no measurable difference".
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from trainwell.app.tasks import METRIC_NAMES, higher_is_better
from trainwell.study.statistics import summarize
from trainwell.study.store import Store


def _scale(metric: str) -> float:
    """Accuracy is shown in percent (points), everything else as is."""
    return 100.0 if metric.endswith("_acc") else 1.0


def _label(metric: str) -> str:
    return "acc pts" if metric.endswith("_acc") else METRIC_NAMES.get(metric, metric)


def _diff_text(row: dict[str, Any], metric: str) -> str:
    d = row[f"d_{metric}"][0]
    if metric.endswith("_acc"):
        return f"{d * 100:+.1f} pts accuracy"
    return f"{'+' if d >= 0 else ''}{d:.3g} {_label(metric)}"


def _metrics(rows: list[dict[str, Any]]) -> tuple[str, ...]:
    return rows[0]["metrics"] if rows else ("test_nll", "test_acc", "test_ece")


def _effect(row: dict[str, Any], metric: str) -> str:
    """'improved' / 'worsened' / 'no measurable' for a paired difference."""
    d, h = row[f"d_{metric}"]
    if not math.isfinite(d) or not math.isfinite(h) or abs(d) <= h:
        return "none"
    better = (d > 0) == bool(higher_is_better(metric))
    return "improved" if better else "worsened"


def verdict(rows: list[dict[str, Any]]) -> str:
    """A plain-language paragraph computed from the summary rows."""
    sentences = []
    primary, secondary = _metrics(rows)[:2]
    name = METRIC_NAMES.get(primary, primary)
    for data in dict.fromkeys(r["data"] for r in rows):
        group = [r for r in rows if r["data"] == data and r["variant"] != "base" and r["n"]]
        better, worse, none = [], [], []
        for row in group:
            d, h = row[f"d_{primary}"]
            text = f"{row['variant']} ({'+' if d >= 0 else ''}{d:.3g} ± {h:.3g} {name}"
            text += f", {_diff_text(row, secondary)}, {row['cost']:.2g}x time)"
            kind = _effect(row, primary)
            (better if kind == "improved" else worse if kind == "worsened" else none).append(text)
        parts = []
        if better:
            parts.append(f"improved test {name}: " + "; ".join(better))
        if worse:
            parts.append(f"made test {name} worse: " + "; ".join(worse))
        if none:
            names = ", ".join(t.split(" (")[0] for t in none)
            parts.append(f"made no measurable difference to test {name}: {names}")
        scored = [r for r in rows if r["data"] == data and r["n"] and math.isfinite(r[primary][0])]
        if scored:
            high = bool(higher_is_better(primary))
            best = (max if high else min)(scored, key=lambda r: r[primary][0])
            word = "highest" if high else "lowest"
            parts.append(f"{word} mean test {name}: {best['variant']} ({best[primary][0]:.4g})")
        failed = sorted({r["variant"] for r in rows if r["data"] == data and r["failed"]})
        if failed:
            parts.append("failed: " + ", ".join(failed))
        if parts:
            sentences.append(f"With {data}, " + "; ".join(parts) + ".")
    n = max((r["n"] for r in rows), default=0)
    tail = (
        f" Differences are paired over {n} seeds (same data split and initialisation as the "
        "base); ± is the 95% t-interval, and a difference whose interval contains zero is "
        "reported as no measurable difference."
    )
    return " ".join(sentences) + tail


def _fmt(pair: tuple[float, float], digits: int = 3, scale: float = 1.0, sign: bool = False) -> str:
    m, h = pair
    if not math.isfinite(m):
        return "–"
    text = f"{m * scale:+.{digits}f}" if sign else f"{m * scale:.{digits}f}"
    return text + (f" ± {h * scale:.{digits}f}" if math.isfinite(h) else "")


def _shown(rows: list[dict[str, Any]]) -> list[str]:
    """The table's metric columns: accuracy first (as the report always showed it)."""
    return sorted(_metrics(rows), key=lambda m: not m.endswith("_acc"))


def table_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and string cells of the results table (shared by HTML and terminal)."""
    header = ["data", "variant", "seeds"]
    for m in _shown(rows):
        header += ["test acc %" if m.endswith("_acc") else f"test {_label(m)}", f"Δ {_label(m)}"]
    header += ["time", "stopped at epoch", "status"]
    out = []
    for r in rows:
        stops = ", ".join(str(s + 1) for s in r["stops"] if s is not None) or "–"
        status = "ok" if not r["failed"] else f"{len(r['failed'])} failed: {r['failed'][0]}"
        cells = [r["data"], r["variant"], str(r["n"])]
        for m in _shown(rows):
            digits = 1 if m.endswith("_acc") else 3
            cells += [_fmt(r[m], digits, _scale(m)), _fmt(r[f"d_{m}"], digits, _scale(m), True)]
        cost = f"{r['cost']:.2f}x" if math.isfinite(r["cost"]) else "–"
        out.append([*cells, cost, stops, status])
    return header, out


def print_table(rows: list[dict[str, Any]], console: Any = None) -> None:
    """The results table and verdict in the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    header, cells = table_rows(rows)
    for data in dict.fromkeys(r["data"] for r in rows):
        title = f"{data}: mean ± 95% CI over seeds; Δ paired vs base"
        table = Table(title=title, title_justify="left")
        for h in header[1:]:
            table.add_column(h, justify="left" if h in ("variant", "status") else "right")
        for row in cells:
            if row[0] == data:
                table.add_row(*row[1:-1], row[-1][:40])
        console.print(table)
    console.print(verdict(rows))


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1200px;
color:#1d2430;padding:0 1rem;line-height:1.45}
h1{margin-bottom:.2rem} .sub{color:#5b6472;margin-top:0}
.verdict{background:#eef5ff;border-left:4px solid #2f6fdf;padding:.8rem 1rem;border-radius:4px}
table{border-collapse:collapse;width:100%;font-size:.78rem;margin:1rem 0;
display:block;overflow-x:auto}
th,td{padding:.35rem .5rem;border-bottom:1px solid #e3e6ea;text-align:right;white-space:nowrap}
th{background:#f5f6f8;white-space:normal} td:nth-child(-n+2),th:nth-child(-n+2){text-align:left}
td:last-child{text-align:left;white-space:normal;max-width:22rem}
tr.base td{font-weight:600;background:#fafbfc} tr.failed td{color:#a33}
td.good{color:#17803d;font-weight:600} td.bad{color:#b3261e;font-weight:600}
figure{margin:1rem 0} img{max-width:100%;border:1px solid #e3e6ea;border-radius:4px}
"""


def write_report(store: Store, out_dir: str | Path, study: str | None = None) -> Path:
    """Write ``report.html`` (self-contained) and ``summary.png`` into ``out_dir``."""
    from trainwell.study import figures

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_id = store.study_id(study)
    runs = store.runs(study_id)
    rows = summarize(runs)
    drawn = figures.draw_all(runs, rows, out_dir)
    header, cells = table_rows(rows)
    body = ["<table id='results'><thead><tr>"]
    body += [f"<th>{html.escape(h)}</th>" for h in header] + ["</tr></thead><tbody>"]
    for row, text in zip(rows, cells, strict=False):
        cls = "base" if row["variant"] == "base" else "failed" if not row["n"] else ""
        body.append(f"<tr class='variant {cls}'>")
        for h, cell in zip(header, text, strict=False):
            metric = {f"Δ {_label(m)}": m for m in _metrics(rows)}.get(h)
            kind = _effect(row, metric) if metric else "none"
            css = {"improved": " class='good'", "worsened": " class='bad'"}.get(kind, "")
            body.append(f"<td{css}>{html.escape(cell)}</td>")
        body.append("</tr>")
    body.append("</tbody></table>")
    n_done = sum(r["status"] == "done" for r in runs)
    n_failed = sum(r["status"] == "failed" for r in runs)
    page = [
        "<!doctype html><html><head><meta charset='utf-8'><title>trainwell ablation report</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>trainwell ablation report</h1>",
        f"<p class='sub'>{len(runs)} runs ({n_done} done, {n_failed} failed) · "
        f"{len({r['variant'] for r in runs})} variants · store: {html.escape(store.url)}</p>",
        f"<h2>Verdict</h2><p class='verdict'>{html.escape(verdict(rows))}</p>",
        "<h2>Summary</h2>",
        *(_img(path, title) for title, path in drawn[:1]),
        "<h2>Results</h2>",
        "<p>Mean ± 95% confidence interval over seeds. Δ is the paired difference from the "
        "base run with the same data size and seed (green: better, red: worse, interval "
        "excludes zero). Time is training time relative to the base. Rows marked "
        "[EMA weights] / [SWA weights] score the averaged model of the same runs.</p>",
        *body,
        *(f"<h2>{html.escape(title)}</h2>{_img(path, title)}" for title, path in drawn[1:]),
        "</body></html>",
    ]
    path = out_dir / "report.html"
    path.write_text("\n".join(page), encoding="utf-8")
    return path
