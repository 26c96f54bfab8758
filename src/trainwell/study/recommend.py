"""What a study recommends per data size: winners chosen on validation, reported on test.

The rule (Cawley & Talbot 2010: selecting and evaluating on one split overstates the
gain): at each data size the winner is the row with the best mean *validation* value of
the primary metric (:func:`trainwell.study.statistics.validation_value`: the epoch whose
weights were tested), and what is reported is that winner's *test* effect against the
base: the mean paired difference over seeds with its 95% t-interval and its
multiplicity-adjusted p-value (:mod:`trainwell.study.comparisons`), and its training
time as a multiple of the base's. The winner is recommended only when that adjusted
p-value is below 0.05 and the effect goes the better way; otherwise the base config is.

For every grid key with two or more strengths (one numeric config key, e.g. ``l2``) the
strength is chosen the same way among that key's variants at each data size, and said
in one sentence per data size.
"""

from __future__ import annotations

import math
from typing import Any

from trainwell.app.tasks import METRIC_NAMES
from trainwell.study.plan import ALIASES

#: Config keys a variant sets only because another one needs them (a clip threshold
#: switches ``gradients.clip.mode`` on): not a strength of their own.
IMPLIED = ("gradients.clip.mode",)
ADJUSTED = {"holm": "Holm-adjusted p", "bh": "BH-adjusted p", "none": "p (uncorrected)"}
AFTER = {"holm": " after Holm correction", "bh": " after Benjamini-Hochberg correction", "none": ""}


def short_key(key: str) -> str:
    """The shortest short name of a config key (``regularization.l2`` -> ``l2``).

    Example:
        >>> short_key("regularization.l2"), short_key("model.dropout")
        ('l2', 'model.dropout')
    """
    return min((a for a, k in ALIASES.items() if k == key), key=len, default=key)


def data_phrase(label: str) -> str:
    """A data-size label in words, with its preposition.

    Example:
        >>> data_phrase("train_fraction=0.1"), data_phrase("train_size=120")
        ('at 10% of the data', 'with 120 training examples')
        >>> data_phrase("all data")
        'with all data'
    """
    key, _, value = label.partition("=")
    try:
        number = float(value)
    except ValueError:
        return f"with {label}"
    if key == "train_fraction":
        return f"at {number * 100:g}% of the data"
    if key == "train_size":
        return f"with {number:g} training examples"
    return f"with {label}"


def strength(row: dict[str, Any]) -> tuple[str, float] | None:
    """``(config key, value)`` of a row that sets one numeric config key, else None.

    Example:
        >>> strength({"overrides": {"regularization.l2": 0.01}, "averaged": None})
        ('regularization.l2', 0.01)
        >>> strength({"overrides": {"ema.enabled": True}, "averaged": None}) is None
        True
    """
    if row.get("averaged"):
        return None
    numeric = {k: v for k, v in row.get("overrides", {}).items() if k not in IMPLIED}
    if len(numeric) != 1:
        return None
    ((key, value),) = numeric.items()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return key, float(value)


def _what(row: dict[str, Any]) -> str:
    """What to turn on: ``l2 = 0.01``, a named variant, or a variant's averaged weights."""
    found = strength(row)
    if found is not None:
        return f"{short_key(found[0])} = {found[1]:g}"
    if row.get("averaged"):
        name, _, label = row["variant"].partition(" [")
        return f"{name} and use its {label.rstrip(']')}"
    return row["variant"]


def best_on_validation(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The row with the best mean validation value (None when no row has one)."""
    scored = [r for r in rows if r["n"] and math.isfinite(r["val"][0])]
    if not scored:
        return None
    pick = max if scored[0]["higher"] else min
    return pick(scored, key=lambda r: r["val"][0])


def metric_words(metric: str) -> str:
    """A metric's name in words.

    Example:
        >>> metric_words("test_nll"), metric_words("val_acc"), metric_words("val_f1")
        ('test NLL', 'validation accuracy', 'validation f1')
    """
    split, _, base = metric.partition("_")
    word = {"test": "test", "val": "validation"}.get(split, split)
    return f"{word} {METRIC_NAMES.get(f'test_{base}', base)}"


def p_text(p: float) -> str:
    """A p-value with two significant digits (``0.0033``, ``1.2e-05``, ``–`` for NaN).

    Example:
        >>> p_text(0.00334), p_text(0.41), p_text(1.23e-5)
        ('0.0033', '0.41', '1.2e-05')
    """
    if not math.isfinite(p):
        return "–"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def effect_text(row: dict[str, Any]) -> str:
    """``test NLL -0.081 [-0.12, -0.04] vs base, Holm-adjusted p = 0.0033``.

    The interval is the 95% t-interval of the mean paired difference; accuracy is in
    percentage points.
    """
    metric = row["metrics"][0]
    d, h = row[f"d_{metric}"]
    scale, unit = (100.0, " pts") if metric.endswith("_acc") else (1.0, "")
    low, high = (d - h) * scale, (d + h) * scale
    fmt = ".1f" if scale == 100 else ".3g"
    text = f"{metric_words(metric)} {d * scale:+{fmt}}{unit} [{low:{fmt}}, {high:{fmt}}] vs base"
    return f"{text}, {ADJUSTED[row['correction']]} = {p_text(row['p_adj'])}"


def _cost(row: dict[str, Any]) -> str:
    return f"{row['cost']:.2f}x the base's training time" if math.isfinite(row["cost"]) else ""


def winners(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per data size: ``{"data", "row" (best on validation or None), "adopt"}``."""
    out = []
    for data in dict.fromkeys(r["data"] for r in rows):
        row = best_on_validation([r for r in rows if r["data"] == data])
        adopt = row is not None and row["variant"] != "base" and row["effect"] == "helps"
        out.append({"data": data, "row": row, "adopt": adopt})
    return out


def recommendation(rows: list[dict[str, Any]]) -> list[str]:
    """One line per data size: what to turn on, its test gain, adjusted p and time cost."""
    lines = []
    for choice in winners(rows):
        row, where = choice["row"], data_phrase(choice["data"])
        where = where[0].upper() + where[1:]
        if row is None:
            lines.append(
                f"{where}: no run stores {metric_words(rows[0]['selection'])}; nothing chosen."
            )
            continue
        selection = metric_words(row["selection"])
        if choice["adopt"]:
            text = f"{where}: turn on {_what(row)}: {effect_text(row)}"
            lines.append(f"{text}; {_cost(row)} (chosen on {selection}).")
        elif row["variant"] == "base":
            lines.append(f"{where}: keep the base config; no variant beats it on {selection}.")
        else:
            lines.append(
                f"{where}: keep the base config; the best on {selection}, {_what(row)}, does "
                f"not beat it on test{AFTER[row['correction']]} ({effect_text(row)}; "
                f"{_cost(row)})."
            )
    return lines


def strength_groups(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``{config key: {data size: rows by increasing strength}}`` of keys with >= 2 strengths."""
    pairs: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    for row in rows:
        found = strength(row)
        if found is not None and row["n"]:
            pairs.setdefault(found[0], []).append((found[1], row))
    out = {}
    for key, found in pairs.items():
        if len({value for value, _ in found}) < 2:
            continue
        by_data: dict[str, list[dict[str, Any]]] = {r["data"]: [] for _, r in found}
        for _, row in sorted(found, key=lambda pair: pair[0]):
            by_data[row["data"]].append(row)
        out[key] = by_data
    return out


def strength_choices(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per grid key and data size: ``{"key", "data", "row" (best on validation), "adopt"}``."""
    out = []
    for key, by_data in strength_groups(rows).items():
        for data, group in by_data.items():
            row = best_on_validation(group)
            adopt = row is not None and row["effect"] == "helps"
            out.append({"key": key, "data": data, "row": row, "adopt": adopt})
    return out


def strength_sentences(rows: list[dict[str, Any]]) -> list[str]:
    """One sentence per grid key and data size naming the strength chosen on validation."""
    sentences = []
    for choice in strength_choices(rows):
        row, name = choice["row"], short_key(choice["key"])
        where = data_phrase(choice["data"])
        where = where[0].upper() + where[1:]
        if row is None:
            continue
        if choice["adopt"]:
            sentences.append(f"{where} use {_what(row)} ({effect_text(row)}).")
        else:
            sentences.append(
                f"{where} no {name} strength beats the base{AFTER[row['correction']]} (best on "
                f"{metric_words(row['selection'])}: {_what(row)}, {effect_text(row)})."
            )
    return sentences
