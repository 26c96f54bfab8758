"""Multiplicity corrections against hand computations, the textbook definitions, scipy and
statsmodels (when installed), and the ``[ablation] correction`` key."""

from __future__ import annotations

import math
import random

import pytest
from scipy import stats

from trainwell.app.config import ConfigError
from trainwell.study.comparisons import adjust, benjamini_hochberg, correct, effect, holm
from trainwell.study.plan import plan_study

P = [0.01, 0.04, 0.03, 0.005]


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max
    assert holm(P) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1
    assert holm([0.02, 0.02, 0.02]) == pytest.approx([0.06, 0.06, 0.06])
    assert holm([]) == [] and holm([0.3]) == [0.3]


def test_benjamini_hochberg_by_hand():
    # 4 p / rank: 0.02, 0.02, 0.04, 0.04 -> running min from the largest
    assert benjamini_hochberg(P) == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert benjamini_hochberg([0.5, 0.6]) == pytest.approx([0.6, 0.6])
    assert benjamini_hochberg([0.01, 0.9]) == pytest.approx([0.02, 0.9])


def _holm_definition(p):
    """max_{j <= i} min(1, (m - j + 1) p_(j)), straight from Holm (1979)."""
    m, order = len(p), sorted(range(len(p)), key=lambda i: p[i])
    out = [0.0] * m
    for i, k in enumerate(order):
        out[k] = max(min(1.0, (m - j) * p[order[j]]) for j in range(i + 1))
    return out


def _bh_definition(p):
    """min_{j >= i} min(1, m p_(j) / j), straight from Benjamini & Hochberg (1995)."""
    m, order = len(p), sorted(range(len(p)), key=lambda i: p[i])
    out = [0.0] * m
    for i, k in enumerate(order):
        out[k] = min(min(1.0, m * p[order[j]] / (j + 1)) for j in range(i, m))
    return out


def _random_pvalues(rng: random.Random) -> list[float]:
    m = rng.randint(1, 40)
    p = [rng.random() ** rng.choice([1, 3, 6]) for _ in range(m)]
    if m > 3:
        p[1] = p[2]  # a tie
    return p


def test_random_vectors_against_the_definitions_and_scipy():
    rng = random.Random(0)
    for _ in range(200):
        p = _random_pvalues(rng)
        assert holm(p) == pytest.approx(_holm_definition(p), abs=1e-12)
        assert benjamini_hochberg(p) == pytest.approx(_bh_definition(p), abs=1e-12)
        assert benjamini_hochberg(p) == pytest.approx(
            list(stats.false_discovery_control(p, method="bh")), abs=1e-12
        )


def test_random_vectors_against_statsmodels():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    rng = random.Random(1)
    for _ in range(200):
        p = _random_pvalues(rng)
        for ours, method in ((holm, "holm"), (benjamini_hochberg, "fdr_bh")):
            expected = multitest.multipletests(p, method=method)[1]
            assert ours(p) == pytest.approx(list(expected), abs=1e-12)


def test_adjust_leaves_nan_out_of_the_family():
    out = adjust([0.01, math.nan, 0.02, 0.04], "holm")
    assert out[0] == pytest.approx(0.03) and math.isnan(out[1])  # m = 3, not 4
    assert out[2:] == pytest.approx([0.04, 0.04])
    assert adjust([0.01, 0.02], "none") == [0.01, 0.02]
    with pytest.raises(ValueError, match="correction must be one of 'holm', 'bh', 'none'"):
        adjust([0.1], "bonferroni")


def _row(d: float, p: float, higher: bool = False) -> dict:
    return {"metrics": ("test_nll",), "d_test_nll": (d, 0.01), "p": p, "higher": higher}


def test_effect_needs_an_adjusted_p_below_005_and_reads_the_direction():
    rows = correct([_row(-0.2, 0.001), _row(0.3, 0.002), _row(-0.1, 0.03)], "holm")
    assert [r["p_adj"] for r in rows] == pytest.approx([0.003, 0.004, 0.03])
    assert [r["effect"] for r in rows] == ["helps", "hurts", "helps"]
    rows = correct([_row(-0.2, 0.02), _row(0.3, 0.03), _row(-0.1, 0.04)], "holm")
    assert [r["effect"] for r in rows] == ["none", "none", "none"]  # 0.06, 0.06, 0.06
    assert [r["effect"] for r in correct([_row(-0.2, 0.02), _row(0.3, 0.03)], "none")] == [
        "helps",
        "hurts",
    ]
    accuracy = correct([_row(0.05, 0.001, higher=True)], "holm")[0]
    assert effect(accuracy) == "helps"


@pytest.mark.parametrize(
    ("correction", "ok"), [("holm", True), ("bh", True), ("none", True), ("bonferroni", False)]
)
def test_the_correction_key_of_the_ablation_section(correction, ok):
    raw = {"ablation": {"seeds": 1, "correction": correction, "grid": {"l2": [1e-3]}}}
    if ok:
        assert len(plan_study(raw)) == 2
    else:
        with pytest.raises(ConfigError, match="ablation.correction must be 'holm', 'bh' or 'none'"):
            plan_study(raw)
