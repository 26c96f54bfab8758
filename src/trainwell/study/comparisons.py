"""The family of comparisons of a study: multiplicity-adjusted p-values and the verdict.

A study compares every variant with the base at every data size, each with a paired
t-test over seeds. Tested one by one at 5%, a study of 26 comparisons calls about one
of them an effect by chance alone. The p-values of a study are therefore adjusted
together, and a variant *helps* or *hurts* only when its adjusted p-value is below
:data:`ALPHA`:

* ``"holm"`` (default): Holm's step-down procedure (Holm 1979), which controls the
  family-wise error rate (the chance of calling *any* null comparison an effect) at
  ``ALPHA`` under any dependence between the tests, and is uniformly more powerful
  than Bonferroni.
* ``"bh"``: Benjamini and Hochberg's step-up procedure (Benjamini & Hochberg 1995),
  which controls the false discovery rate (the expected share of null comparisons
  among those called effects) for independent or positively dependent tests.
* ``"none"``: the p-values as they are.

``[ablation] correction = "holm" | "bh" | "none"`` chooses one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

ALPHA = 0.05
CORRECTIONS = {"holm": "Holm", "bh": "Benjamini-Hochberg", "none": "no correction"}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the order given.

    With the ``m`` p-values sorted, ``p_(1) <= ... <= p_(m)``, the adjusted value of
    the ``i``-th is ``max_{j <= i} min(1, (m - j + 1) p_(j))``; rejecting where it is
    below alpha is Holm's procedure at level alpha.

    Example:
        >>> holm([0.01, 0.04, 0.03])
        [0.03, 0.06, 0.06]
    """
    m = len(pvalues)
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda k: pvalues[k])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def benjamini_hochberg(pvalues: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg step-up adjusted p-values (Benjamini & Hochberg 1995).

    With the ``m`` p-values sorted, the adjusted value of the ``i``-th is
    ``min_{j >= i} min(1, m p_(j) / j)``; rejecting where it is below q controls the
    false discovery rate at q.

    Example:
        >>> [round(p, 4) for p in benjamini_hochberg([0.01, 0.04, 0.03])]
        [0.03, 0.04, 0.04]
    """
    m = len(pvalues)
    out = [0.0] * m
    running = 1.0
    for k, i in enumerate(sorted(range(m), key=lambda k: pvalues[k], reverse=True)):
        running = min(running, m * pvalues[i] / (m - k))
        out[i] = running
    return out


def adjust(pvalues: Sequence[float], method: str = "holm") -> list[float]:
    """The p-values adjusted by ``method`` (see the module doc); NaN stays NaN.

    A NaN p-value (a comparison with fewer than two paired seeds) is not a test: it is
    left out of the family, so ``m`` counts the finite p-values only.

    Example:
        >>> adjust([0.01, float("nan"), 0.02], "holm")
        [0.02, nan, 0.02]
    """
    if method not in CORRECTIONS:
        raise ValueError(
            f"correction must be one of {', '.join(map(repr, CORRECTIONS))}, got {method!r}"
        )
    finite = [i for i, p in enumerate(pvalues) if math.isfinite(p)]
    values = [float(pvalues[i]) for i in finite]
    fn = {"holm": holm, "bh": benjamini_hochberg, "none": list}[method]
    out = [float("nan")] * len(pvalues)
    for i, p in zip(finite, fn(values), strict=True):
        out[i] = p
    return out


def effect(row: dict[str, Any]) -> str:
    """``"helps"``, ``"hurts"`` or ``"none"``: a row's verdict on the primary metric.

    A variant helps (hurts) when its adjusted p-value is below :data:`ALPHA` and its mean
    paired difference goes the better (worse) way of the metric (``row["higher"]``).
    """
    d = row[f"d_{row['metrics'][0]}"][0]
    if not (math.isfinite(row.get("p_adj", math.nan)) and row["p_adj"] < ALPHA):
        return "none"
    return "helps" if (d > 0) == bool(row["higher"]) else "hurts"


def correct(rows: list[dict[str, Any]], method: str = "holm") -> list[dict[str, Any]]:
    """Fill ``p_adj``, ``effect`` and ``correction`` of every row, the family being all rows.

    Every row with a finite ``p`` (each variant, data size and averaged-weights row
    compared with its base) is one comparison of the study's family.
    """
    for row, p in zip(rows, adjust([r["p"] for r in rows], method), strict=True):
        row["p_adj"], row["correction"] = p, method
        row["effect"] = effect(row)
    return rows
