"""The report of an ablation study: the recommendation, an HTML page and a terminal table.

The numbers come from :mod:`trainwell.study.statistics` (means, intervals, paired
t-tests), :mod:`trainwell.study.comparisons` (p-values adjusted for the study's family of
comparisons) and :mod:`trainwell.study.recommend` (winners chosen on validation, reported
on test). Both the page and the terminal output open with the recommendation per data
size, then the results table, then every comparison in words and the figures. A variant
helps or hurts only when its adjusted p-value is below 0.05; anything else is "no
difference after correction".
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from sqlalchemy import select

from trainwell.app.tasks import METRIC_NAMES
from trainwell.study.comparisons import CORRECTIONS
from trainwell.study.recommend import (
    metric_words,
    p_text,
    recommendation,
    strength_sentences,
    winners,
)
from trainwell.study.seed_ensembles import beats_every_single, seed_ensembles
from trainwell.study.seed_soups import seed_soups, soups_beat_every_single
from trainwell.study.statistics import summarize
from trainwell.study.store import Store, study_table

REFERENCES = {
    "holm": "Holm's step-down correction (Holm 1979)",
    "bh": "the Benjamini-Hochberg correction (Benjamini & Hochberg 1995)",
    "none": "no correction",
}


def study_settings(store: Store, study_id: int) -> dict[str, Any]:
    """``{"metric", "correction", "looks"}`` from the study's ``[ablation]`` section."""
    with store.engine.connect() as conn:
        spec = conn.execute(select(study_table.c.spec).where(study_table.c.id == study_id)).scalar()
    section = json.loads(spec or "{}").get("ablation") or {}
    seeds = section.get("seeds")
    looks = (int(seeds["min"]), int(seeds["max"])) if isinstance(seeds, dict) else None
    return {"metric": section.get("metric"), "correction": section.get("correction", "holm"),
            "looks": looks}  # fmt: skip


def undecided_lines(store: Store, study_id: int, runs: list[dict[str, Any]]) -> list[str]:
    """With ``seeds = {min, max}``: one sentence per comparison still undecided, saying the
    smallest effect the study could have detected and about how many seeds would settle it
    (:func:`trainwell.study.sequential.undecided_sentences`); ``[]`` for fixed seeds."""
    from trainwell.study.sequential import comparisons, decide, undecided_sentences

    with store.engine.connect() as conn:
        spec = conn.execute(select(study_table.c.spec).where(study_table.c.id == study_id)).scalar()
    section = json.loads(spec or "{}").get("ablation") or {}
    seeds = section.get("seeds")
    if not isinstance(seeds, dict) or not runs:
        return []
    n_min, n_max = int(seeds["min"]), int(seeds["max"])
    found = comparisons(runs, section.get("metric"))
    decide(found, n_min, n_max, section.get("correction", "holm"))
    return undecided_sentences(found, n_min, n_max)


def study_rows(store: Store, study: str | None = None) -> list[dict[str, Any]]:
    """The summary rows of a study, with its ``[ablation] metric`` and ``correction``."""
    study_id = store.study_id(study)
    return summarize(store.runs(study_id), **study_settings(store, study_id))


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


def _correction(rows: list[dict[str, Any]]) -> str:
    return rows[0]["correction"] if rows else "holm"


def _selection(rows: list[dict[str, Any]]) -> str:
    """``val_nll`` -> ``validation NLL``."""
    return metric_words(rows[0]["selection"] if rows else "val_nll")


def _family(rows: list[dict[str, Any]]) -> int:
    return sum(math.isfinite(r["p"]) for r in rows)


def _adjusted(rows: list[dict[str, Any]]) -> str:
    """``, adjusted with Holm's ... over the 26 comparisons of this study``."""
    method, family = _correction(rows), _family(rows)
    if method == "none":
        return f", not adjusted for the {family} comparisons of this study"
    return f", adjusted with {REFERENCES[method]} over the {family} comparisons of this study"


def rule(rows: list[dict[str, Any]]) -> str:
    """How the recommendation was reached, in one sentence."""
    return (
        f"Winners are chosen on {_selection(rows)} (at the epoch whose weights were tested) "
        "and reported on test; [low, high] is the 95% t-interval of the paired difference "
        f"from the base over seeds, p its paired t-test p-value{_adjusted(rows)}."
    )


def verdict(rows: list[dict[str, Any]]) -> str:
    """Every comparison in plain language, computed from the summary rows."""
    sentences = []
    metrics = _metrics(rows)
    primary, secondary = metrics[0], metrics[1] if len(metrics) > 1 else None
    name = METRIC_NAMES.get(primary, primary)
    method = _correction(rows)
    after = "" if method == "none" else f" after {CORRECTIONS[method]} correction"
    for data in dict.fromkeys(r["data"] for r in rows):
        group = [r for r in rows if r["data"] == data and r["variant"] != "base" and r["n"]]
        found: dict[str, list[str]] = {"helps": [], "hurts": [], "none": []}
        for row in group:
            d, h = row[f"d_{primary}"]
            text = f"{row['variant']} ({'+' if d >= 0 else ''}{d:.3g} ± {h:.3g} {name}, "
            text += f"adjusted p {p_text(row['p_adj'])}"
            text += f", {_diff_text(row, secondary)}" if secondary else ""
            found[row["effect"]].append(text + f", {row['cost']:.2g}x time)")
        parts = []
        if found["helps"]:
            parts.append(f"improved test {name}: " + "; ".join(found["helps"]))
        if found["hurts"]:
            parts.append(f"made test {name} worse: " + "; ".join(found["hurts"]))
        if found["none"]:
            names = ", ".join(t.split(" (")[0] for t in found["none"])
            parts.append(f"made no difference to test {name}{after}: {names}")
        scored = [r for r in rows if r["data"] == data and r["n"] and math.isfinite(r["val"][0])]
        if scored:
            best = (max if scored[0]["higher"] else min)(scored, key=lambda r: r["val"][0])
            parts.append(
                f"best on {_selection(rows)}: {best['variant']} "
                f"(test {name} {best[primary][0]:.4g})"
            )
        failed = sorted({r["variant"] for r in rows if r["data"] == data and r["failed"]})
        if failed:
            parts.append("failed: " + ", ".join(failed))
        if parts:
            sentences.append(f"With {data}, " + "; ".join(parts) + ".")
    n = max((r["n"] for r in rows), default=0)
    tail = (
        f" Differences are paired over {n} seeds (same data split and initialisation as the "
        "base); ± is the 95% t-interval of each comparison. A variant improves or worsens "
        f"the test metric only when its paired t-test p-value{_adjusted(rows)}, is below 0.05."
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


def _p_header(rows: list[dict[str, Any]]) -> str:
    return {"holm": "p (Holm)", "bh": "p (BH)", "none": "p"}[_correction(rows)]


def table_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and string cells of the results table (shared by HTML and terminal).

    The validation column is what winners are chosen on; the adjusted p-value column
    follows the primary metric's paired difference.
    """
    primary = _metrics(rows)[0]
    val_scale = _scale(primary)
    header = ["data", "variant", "seeds", _selection(rows).replace("validation", "val")]
    for m in _shown(rows):
        header += ["test acc %" if m.endswith("_acc") else f"test {_label(m)}", f"Δ {_label(m)}"]
        header += [_p_header(rows)] if m == primary else []
    header += ["time", "stopped at epoch", "status"]
    out = []
    for r in rows:
        stops = ", ".join(str(s + 1) for s in r["stops"] if s is not None) or "–"
        status = "ok" if not r["failed"] else f"{len(r['failed'])} failed: {r['failed'][0]}"
        digits = 1 if primary.endswith("_acc") else 3
        cells = [r["data"], r["variant"], str(r["n"]), _fmt(r["val"], digits, val_scale)]
        for m in _shown(rows):
            digits = 1 if m.endswith("_acc") else 3
            cells += [_fmt(r[m], digits, _scale(m)), _fmt(r[f"d_{m}"], digits, _scale(m), True)]
            cells += [p_text(r["p_adj"])] if m == primary else []
        cost = f"{r['cost']:.2f}x" if math.isfinite(r["cost"]) else "–"
        out.append([*cells, cost, stops, status])
    return header, out


def print_table(rows: list[dict[str, Any]], console: Any = None) -> None:
    """The recommendation, the results table and every comparison in the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    console.print("[bold]Recommendation[/bold]")
    for line in [*recommendation(rows), *strength_sentences(rows)]:
        console.print(f"  {line}", highlight=False, markup=False)
    console.print(rule(rows), highlight=False, markup=False)
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
    console.print(verdict(rows), markup=False)


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


def _table_html(rows: list[dict[str, Any]]) -> list[str]:
    """The results table; the primary difference and its p-value coloured by the verdict."""
    header, cells = table_rows(rows)
    primary = _metrics(rows)[0]
    judged = (f"Δ {_label(primary)}", _p_header(rows))
    body = ["<table id='results'><thead><tr>"]
    body += [f"<th>{html.escape(h)}</th>" for h in header] + ["</tr></thead><tbody>"]
    for row, text in zip(rows, cells, strict=False):
        cls = "base" if row["variant"] == "base" else "failed" if not row["n"] else ""
        body.append(f"<tr class='variant {cls}'>")
        for h, cell in zip(header, text, strict=False):
            kind = row["effect"] if h in judged else "none"
            css = {"helps": " class='good'", "hurts": " class='bad'"}.get(kind, "")
            body.append(f"<td{css}>{html.escape(cell)}</td>")
        body.append("</tr>")
    body.append("</tbody></table>")
    return body


def _recommendation_html(rows: list[dict[str, Any]], extra: tuple[str, ...] = ()) -> list[str]:
    items = "".join(f"<li>{html.escape(line)}</li>" for line in [*recommendation(rows), *extra])
    strengths = "".join(f"<li>{html.escape(s)}</li>" for s in strength_sentences(rows))
    out = ["<h2>Recommendation</h2>", f"<div class='verdict' id='recommendation'><ul>{items}</ul>"]
    if strengths:
        out.append(f"<p><b>Strength by data size</b></p><ul id='strengths'>{strengths}</ul>")
    out.append(f"<p class='sub'>{html.escape(rule(rows))}</p></div>")
    return out


def _scores_text(scores: dict[str, float]) -> str:
    """``nll 0.3127, ece 0.04512, acc 91.2%`` (the ensembles' and soups' test metrics)."""
    shown = [k for k in ("test_nll", "test_ece", "test_acc", "test_mse") if k in scores]
    return ", ".join(
        f"{k.removeprefix('test_')} {scores[k] * _scale(k):.4g}"
        + ("%" if k.endswith("_acc") else "")
        for k in shown
    )


def _chosen_text(chosen: list[int]) -> str:
    """The greedy soup's seeds, in the order added; one seed is that run alone."""
    if len(chosen) == 1:
        return f"{chosen[0]} alone (adding any other seed made validation worse)"
    return ", ".join(str(s) for s in chosen)


def _soup_cells(row: dict[str, Any]) -> list[str]:
    """One row of the soups table: scores, or the reason there is no soup."""
    head = [row["data"], row["variant"], str(row["members"])]
    if "note" in row:
        return [*head, "–", row["note"], "–", "–", "–", "–"]
    recal = row["recalibrated"]
    marks = {w: " (BatchNorm recalibrated)" if recal[w] else "" for w in ("greedy", "uniform")}
    return [
        *head, str(row["items"]), _scores_text(row["member_mean"]),
        _scores_text(row["greedy"]) + marks["greedy"], _chosen_text(row["chosen"]),
        _scores_text(row["uniform"]) + marks["uniform"], "1x",
    ]  # fmt: skip


def _soups_html(soups: list[dict[str, Any]]) -> list[str]:
    """The soups of seeds: the mean single member beside the greedy and uniform soups."""
    if not soups:
        return []
    selection = next((r["selection"] for r in soups if "selection" in r), "val_nll")
    out = [
        "<h2>Soups of seeds</h2>",
        "<p>Where a variant's seed runs share an initialization (one starting-weights "
        "fingerprint, e.g. fine-tunes of one checkpoint) and one data split, their weights "
        "are averaged into one model (Wortsman et al. 2022). The greedy soup adds seeds best "
        f"first and keeps one only when {html.escape(metric_words(selection))} does not get "
        "worse, chosen on the validation split, never on test; the uniform soup averages "
        "every seed. Each soup counts as averaged or BatchNorm-recalibrated on the training "
        "split, whichever is better on validation. A soup is one model: 1x the inference "
        "cost. Members and soups are scored on the ensembles' test items where those are "
        "known. Where no soup is made, the row says why.</p>",
        "<table id='soups'><thead><tr>",
    ]
    head = ["data", "variant", "members", "items", "members' mean", "greedy soup",
            "seeds in the greedy soup", "uniform soup", "inference cost"]  # fmt: skip
    out += [f"<th>{h}</th>" for h in head] + ["</tr></thead><tbody>"]
    for row in soups:
        cells = _soup_cells(row)
        out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return out


def _ensembles_html(ensembles: list[dict[str, Any]]) -> list[str]:
    """The ensembles of seeds: the mean single member beside the ensemble, per variant."""
    if not ensembles:
        return []
    out = [
        "<h2>Ensembles of seeds</h2>",
        "<p>Each variant's seed runs are independently trained members; the ensemble "
        "averages their test probabilities (regression: their outputs) and costs "
        "<i>members</i> times one run's inference. Members and ensemble are scored on the "
        "test items common to every run of the data size (<i>items</i>): all of the test "
        "split when <code>data.split_seed</code> gives every seed the same split, few "
        "when each seed draws its own. Whether the same seeds also make a weight soup is said per "
        "variant under <i>Soups of seeds</i>.</p>",
        "<table id='ensembles'><thead><tr>",
    ]
    head = ["data", "variant", "members", "items", "members' mean", "ensemble", "inference cost"]
    out += [f"<th>{h}</th>" for h in head] + ["</tr></thead><tbody>"]
    for row in ensembles:
        if "ensemble" not in row:
            cells = [row["data"], row["variant"], str(row["members"]), "0", row["note"], "–", "–"]
        else:
            cells = [
                row["data"], row["variant"], str(row["members"]), str(row["items"]),
                _scores_text(row["member_mean"]), _scores_text(row["ensemble"]),
                f"{row['members']}x",
            ]  # fmt: skip
        out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return out


def write_report(store: Store, out_dir: str | Path, study: str | None = None) -> Path:
    """Write ``report.html`` (self-contained) and ``summary.png`` into ``out_dir``.

    The page opens with the recommendation per data size, then the results table, then
    every comparison in words and the figures; the study's ``[ablation] metric`` and
    ``correction`` are read from the store.
    """
    from trainwell.study import figures

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_id = store.study_id(study)
    runs = store.runs(study_id)
    settings = study_settings(store, study_id)
    rows = summarize(runs, **settings)
    predictions = store.predictions(study_id)
    ensembles = seed_ensembles(runs, predictions)
    soups = seed_soups(
        runs, store.fingerprints(study_id), store.weights, predictions, settings["metric"]
    )
    chosen = {w["data"]: w["row"]["variant"] for w in winners(rows) if w["row"] is not None}
    beats = (
        *beats_every_single(ensembles, chosen),
        *soups_beat_every_single(soups, ensembles, chosen),
    )
    drawn = figures.draw_all(runs, rows, out_dir)
    n_done = sum(r["status"] == "done" for r in runs)
    n_failed = sum(r["status"] == "failed" for r in runs)
    page = [
        "<!doctype html><html><head><meta charset='utf-8'><title>trainwell ablation report</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>trainwell ablation report</h1>",
        f"<p class='sub'>{len(runs)} runs ({n_done} done, {n_failed} failed) · "
        f"{len({r['variant'] for r in runs})} variants · store: {html.escape(store.url)}</p>",
        *_recommendation_html(rows, beats),
        "<h2>Results</h2>",
        f"<p>Mean ± 95% confidence interval over seeds. Δ is the paired difference from the "
        f"base run with the same data size and seed; {_p_header(rows)} is its paired t-test "
        f"p-value on the primary metric{_adjusted(rows)} (green: better, red: worse, "
        f"p < 0.05). {html.escape(_selection(rows)).replace('validation', 'Validation', 1)} "
        "is at the epoch whose weights were tested. Time is training time relative to the "
        "base. Rows marked [EMA weights] / [SWA weights] score the averaged model of the same "
        "runs.</p>",
        *_table_html(rows),
        *_ensembles_html(ensembles),
        *_soups_html(soups),
        f"<h2>Every comparison</h2><p class='verdict'>{html.escape(verdict(rows))}</p>",
        *(
            f"<p class='sub' id='undecided'>{html.escape(' '.join(lines))}</p>"
            for lines in [undecided_lines(store, study_id, runs)]
            if lines
        ),
        *(f"<h2>{html.escape(title)}</h2>{_img(path, title)}" for title, path in drawn),
        "</body></html>",
    ]
    path = out_dir / "report.html"
    path.write_text("\n".join(page), encoding="utf-8")
    return path
