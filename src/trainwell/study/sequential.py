"""Seeds where they matter: adding seeds only to the comparisons that are still undecided.

``[ablation] seeds = {min = 3, max = 10}`` runs ``min`` seeds of every run, then adds one
seed at a time, only to the comparisons (a variant against the base at one data size)
that are still undecided, and to the base of their data size (comparisons are paired by
seed), until every comparison is decided or has ``max`` seeds.

**The procedure** is a repeated paired t-test with a Bonferroni bound over the looks
(a group-sequential design with a constant boundary; Bonferroni 1936, as used for
interim analyses in e.g. Jennison & Turnbull 2000, ch. 2), with Holm's step-down
correction (Holm 1979) across comparisons on top:

* A comparison is looked at after each of ``n = min, min + 1, ..., max`` paired seeds,
  ``K = max - min + 1`` looks at most. Its *sequential p-value* after the looks taken so
  far is ``P = min(1, K * min_n p_n)``, ``p_n`` being the paired t-test p-value of its
  first ``n`` seeds (:func:`trainwell.study.statistics.paired_p`).
* Valid under optional stopping: the looks a comparison takes are a subset of the ``K``
  possible ones whatever rule stops it, so ``P >= min(1, K * min over all K looks)``, and
  by the union bound ``Pr(K * min_n p_n <= a) <= sum_n Pr(p_n <= a / K) = a`` under the
  null. ``P`` is thus a valid p-value however the looks were chosen.
* The family: the comparisons' sequential p-values are adjusted by the study's
  ``correction`` (Holm by default; :func:`trainwell.study.comparisons.adjust`), and a
  comparison is *decided* when its adjusted value is below
  :data:`~trainwell.study.comparisons.ALPHA`. Holm controls the family-wise error rate at
  ``ALPHA`` for valid p-values under any dependence, and its rejections only grow as
  p-values shrink, so a comparison once decided stays decided when it stops (its ``P``
  freezes) while the others go on (theirs can only shrink).

It is conservative: each look is tested at ``ALPHA / K`` before Holm, ignoring the strong
correlation between looks (a Pocock or O'Brien-Fleming boundary calibrated to it would
stop sooner). ``tests/study/test_sequential.py`` measures the family-wise false-positive
rate over simulated null studies, and shows that testing at 0.05 after every new seed
does not control it.

For a comparison still undecided at the end, :func:`undecided_sentences` gives the
smallest effect the study could have detected with 80% power and about how many seeds a
fixed study would need to settle the observed effect.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from trainwell.study.comparisons import ALPHA, adjust
from trainwell.study.statistics import primary_metric, sequential_p

POWER = 0.8
MAX_NEEDED = 1000


@dataclass
class Comparison:
    """One variant against the base at one data size: paired differences in seed order."""

    variant: str
    data: str
    diffs: list[float]
    planned: int  # seeds of the variant in the store, whatever their status
    base_planned: int = 0  # seeds of the base of its data size in the store
    p: float = float("nan")  # sequential p-value
    p_adj: float = float("nan")

    @property
    def decided(self) -> bool:
        return math.isfinite(self.p_adj) and self.p_adj < ALPHA


def comparisons(runs: list[dict[str, Any]], metric: str | None = None) -> list[Comparison]:
    """Every (variant, data size) of the stored runs against its base, in plan order."""
    if not runs:
        return []
    base_run = next((r for r in runs if r["variant"] == "base"), runs[0])
    test = primary_metric(json.loads(base_run.get("config") or "{}"), metric).test
    values: dict[tuple[str, str], dict[int, float]] = {}
    planned: dict[tuple[str, str], int] = {}
    for run in runs:
        key = (run["data"], run["variant"])
        planned[key] = planned.get(key, 0) + 1
        cell = values.setdefault(key, {})
        if run["status"] == "done":
            cell[run["seed"]] = float(run["final"].get(test, math.nan))
    out = []
    for (data, variant), cell in values.items():
        base = values.get((data, "base"))
        if variant == "base" or base is None:
            continue
        seeds = sorted(set(cell) & set(base))
        diffs = [cell[s] - base[s] for s in seeds]
        out.append(
            Comparison(variant, data, diffs, planned[(data, variant)], planned[(data, "base")])
        )
    return out


def decide(
    found: list[Comparison], n_min: int, n_max: int, correction: str = "holm"
) -> list[Comparison]:
    """Fill each comparison's sequential ``p`` and its ``p_adj`` over the family."""
    for c in found:
        c.p = sequential_p(c.diffs, n_min, n_max)
    for c, p in zip(found, adjust([c.p for c in found], correction), strict=True):
        c.p_adj = p
    return found


def next_seeds(found: list[Comparison], n_max: int) -> list[tuple[str, str, int]]:
    """``(data, variant, seed index)`` to plan next: each undecided comparison's next seed
    below ``n_max``, and every seed index the base of a data size lacks that one of its
    variants has or gets (a round cut off by a kill may have left the base behind)."""
    out: list[tuple[str, str, int]] = []
    base_has: dict[str, int] = {}
    base_wants: dict[str, int] = {}
    for c in found:
        base_has[c.data] = c.base_planned
        wants = c.planned
        if not c.decided and c.planned < n_max:
            out.append((c.data, c.variant, c.planned))
            wants += 1
        base_wants[c.data] = max(base_wants.get(c.data, 0), wants)
    for data, wants in base_wants.items():
        out += [(data, "base", i) for i in range(base_has[data], wants)]
    return out


def detectable(sd: float, n: int, alpha: float, power: float = POWER) -> float:
    """The smallest mean paired difference a paired t-test at two-sided level ``alpha``
    detects with probability ``power`` over ``n`` seeds: ``(t_{1-a/2} + t_power) sd/sqrt(n)``.

    Example:
        >>> round(detectable(1.0, 10, 0.05), 3)
        0.995
    """
    from scipy import stats

    if n < 2 or not math.isfinite(sd):
        return float("nan")
    t = stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)
    return float(t * sd / math.sqrt(n))


def seeds_needed(effect: float, sd: float, alpha: float, power: float = POWER) -> int | None:
    """The fewest seeds with which ``effect`` is :func:`detectable`; None above 1000.

    Example:
        >>> seeds_needed(1.0, 1.0, 0.05)
        10
    """
    if not (math.isfinite(effect) and math.isfinite(sd)) or effect == 0:
        return None
    if sd == 0:
        return 2
    for n in range(2, MAX_NEEDED + 1):
        if detectable(sd, n, alpha, power) <= abs(effect):
            return n
    return None


def undecided_sentences(found: list[Comparison], n_min: int, n_max: int) -> list[str]:
    """One sentence per undecided comparison: what it could detect, what would settle it.

    The detectable effect is at the level the study's last look used
    (``ALPHA / (m K)``, Holm's first step over ``m`` comparisons and Bonferroni over
    ``K`` looks); the seeds needed are for a fixed study tested at ``ALPHA / m``.
    """
    m = sum(math.isfinite(c.p) for c in found) or 1
    k = n_max - n_min + 1
    out = []
    for c in found:
        n = len(c.diffs)
        if c.decided or n < 2:
            continue
        mean = sum(c.diffs) / n
        sd = math.sqrt(sum((d - mean) ** 2 for d in c.diffs) / (n - 1))
        mde = detectable(sd, n, ALPHA / (m * k))
        need = seeds_needed(mean, sd, ALPHA / m)
        settle = f"about {need} seeds" if need is not None else f"more than {MAX_NEEDED} seeds"
        out.append(
            f"{c.variant} ({c.data}) is undecided after {n} seeds: the study could have "
            f"detected a difference of {mde:.3g} or more (80% power, SD of paired "
            f"differences {sd:.3g}); a fixed-seed study would need {settle} to settle the "
            f"observed {mean:+.3g}."
        )
    return out
