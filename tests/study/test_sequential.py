"""Seeds where they matter: the sequential test's error rate, and a study that adds seeds."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from trainwell.study.comparisons import ALPHA, holm
from trainwell.study.execute import run_study
from trainwell.study.sequential import (
    Comparison,
    comparisons,
    decide,
    next_seeds,
    seeds_needed,
    sequential_p,
    undecided_sentences,
)
from trainwell.study.store import Store

TINY = {"epochs": 2, "batch_size": 32, "data": {"train_size": 120}, "model": {"hidden": [16]}}
N_MIN, N_MAX, M, STUDIES = 3, 10, 4, 2000
# 3 binomial standard errors of a rate of 0.05 over STUDIES simulated studies
MARGIN = 3 * math.sqrt(ALPHA * (1 - ALPHA) / STUDIES)


def _look_p(diffs: np.ndarray) -> np.ndarray:
    """Paired t-test p-values of every study and comparison at every look (last axis)."""
    out = []
    for n in range(N_MIN, N_MAX + 1):
        x = diffs[..., :n]
        t = x.mean(-1) / (x.std(-1, ddof=1) / math.sqrt(n))
        out.append(2 * stats.t.sf(np.abs(t), n - 1))
    return np.stack(out, -1)


def _sequential(diffs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Our procedure on (studies, M, N_MAX) differences: rejections and seeds spent."""
    k = N_MAX - N_MIN + 1
    p = _look_p(diffs)
    running = np.minimum(1.0, k * np.minimum.accumulate(p, -1))  # sequential p per look
    rejected = np.zeros(diffs.shape[:2], bool)
    frozen = np.ones(diffs.shape[:2])
    seeds = np.zeros(diffs.shape[:2], int)
    for look in range(k):
        live = ~rejected
        frozen = np.where(live, running[..., look], frozen)
        seeds = np.where(live, N_MIN + look, seeds)
        adj = np.array([holm(row) for row in frozen])
        rejected = adj < ALPHA
    return rejected, seeds


def test_sequential_p_matches_the_vectorized_simulation():
    rng = np.random.default_rng(1)
    diffs = rng.normal(0.8, 1.0, (40, M, N_MAX))
    rejected, seeds = _sequential(diffs)
    for s in range(len(diffs)):
        found = [Comparison(f"v{i}", "all data", [], 0) for i in range(M)]
        for n in range(N_MIN, N_MAX + 1):
            for i, c in enumerate(found):
                if not c.decided:
                    c.diffs, c.planned = list(diffs[s, i, :n]), n
            decide(found, N_MIN, N_MAX)
        assert [c.decided for c in found] == list(rejected[s])
        assert [len(c.diffs) for c in found] == list(seeds[s])


def test_family_wise_error_under_the_null_and_the_naive_procedure_exceeds_it():
    rng = np.random.default_rng(0)
    diffs = rng.normal(0.0, 1.0, (STUDIES, M, N_MAX))
    rejected, _ = _sequential(diffs)
    fwer = rejected.any(1).mean()
    # naive: a paired t-test at 0.05 after every new seed, stopping at the first p < 0.05
    naive = (_look_p(diffs) < ALPHA).any(-1).any(1).mean()
    # naive with Holm across comparisons at every look, but nothing for the looks
    p = _look_p(diffs)
    holm_looks = np.array([[min(holm(p[s, :, j])) < ALPHA for j in range(p.shape[-1])]
                           for s in range(STUDIES)]).any(1).mean()  # fmt: skip
    print(f"FWER sequential {fwer:.4f}, naive {naive:.4f}, Holm per look {holm_looks:.4f}")
    assert fwer <= ALPHA + MARGIN
    assert naive > ALPHA + MARGIN and holm_looks > ALPHA + MARGIN


def test_power_and_seeds_under_a_real_effect():
    rng = np.random.default_rng(2)
    diffs = rng.normal(0.0, 1.0, (STUDIES, M, N_MAX))
    diffs[:, 0] += 2.0  # one comparison with an effect of 2 SD
    rejected, seeds = _sequential(diffs)
    assert rejected[:, 0].mean() > 0.8 and seeds[:, 0].mean() < N_MAX
    assert rejected[:, 1:].any(1).mean() <= ALPHA + MARGIN


def test_sequential_p_and_planning():
    assert math.isnan(sequential_p([0.1, 0.2], 3, 10))
    assert sequential_p([1.0, 1.0, 1.0], 3, 10) == 0.0
    found = [
        Comparison("a", "d", [1.0, 1.0, 1.0], 3, 3),  # decided (sd 0)
        Comparison("b", "d", [0.1, -0.2, 0.3], 3, 3),
        Comparison("c", "e", [0.1, -0.2, 0.3, 0.1], 4, 4),
        Comparison("x", "e", [0.1, -0.2, 0.3, 0.1], 10, 4),  # at the maximum, base behind
    ]
    decide(found, 3, 10)
    assert [c.decided for c in found] == [True, False, False, False]
    assert next_seeds(found, 10) == [("d", "b", 3), ("e", "c", 4), ("d", "base", 3),
                                     *(("e", "base", i) for i in range(4, 10))]  # fmt: skip
    lines = undecided_sentences(found, 3, 10)
    assert len(lines) == 3 and lines[0].startswith("b (d) is undecided after 3 seeds")
    assert "could have detected a difference of" in lines[0]
    assert "seeds to settle the observed" in lines[0]
    assert seeds_needed(1e-6, 1.0, 0.05) is None and seeds_needed(1.0, 1.0, 0.05) == 10


def _looked_right(runs: list[dict], n_min: int, n_max: int) -> None:
    """Every comparison has the seeds the rule gives it; each base has its variants' most."""
    by = {}
    for r in runs:
        by.setdefault((r["data"], r["variant"]), []).append(r["seed"])
    for seeds in by.values():
        assert sorted(seeds) == list(range(len(seeds)))
    found = comparisons(runs)
    for n in range(n_min, n_max + 1):  # replay the looks from the stored differences
        at = [Comparison(c.variant, c.data, c.diffs[:n], min(n, len(c.diffs))) for c in found]
        decide(at, n_min, n_max)
        for c, full in zip(at, found, strict=True):
            if len(full.diffs) > n:
                assert not c.decided  # it got another seed only while undecided
            elif n < n_max and len(full.diffs) == n:
                assert c.decided  # it stopped below the maximum only once decided
    for data in {c.data for c in found}:
        most = max(len(c.diffs) for c in found if c.data == data)
        assert len(by[(data, "base")]) == most


def test_a_study_adds_seeds_only_where_undecided_and_a_rerun_trains_nothing(tmp_path):
    variants = {"frozen": {"optimizer.lr": 1e-9}}  # far worse than the base: decided early
    raw = {**TINY, "ablation": {"seeds": {"min": 2, "max": 4}, "grid": {"l2": [1e-6]},
                                "variants": variants}}  # fmt: skip
    store = Store(f"sqlite:///{tmp_path / 'study.db'}")
    sid = run_study(raw, store)
    runs = store.runs(sid)
    assert all(r["status"] == "done" for r in runs)
    counts = {v: sum(r["variant"] == v for r in runs) for v in ("base", "l2=1e-06", "frozen")}
    print(counts)
    assert counts["l2=1e-06"] == 4 and 2 <= counts["frozen"] <= 4
    _looked_right(runs, 2, 4)
    finished = {r["id"]: (r["finished"], r["attempts"]) for r in runs}
    run_study(raw, store)
    again = store.runs(sid)
    assert {r["id"]: (r["finished"], r["attempts"]) for r in again} == finished  # none again


def test_a_study_cut_off_after_its_first_seeds_continues_without_retraining(tmp_path):
    ablation = {"grid": {"l2": [1e-6]}}
    store = Store(f"sqlite:///{tmp_path / 'study.db'}")
    sid = run_study({**TINY, "ablation": {**ablation, "seeds": 2}}, store)  # the min phase
    before = {r["id"]: r["finished"] for r in store.runs(sid)}
    raw = {**TINY, "ablation": {**ablation, "seeds": {"min": 2, "max": 3}}}
    # a round the kill cut off: the next seed of the variant planned, never run
    store.plan(sid, "l2=1e-06", "all data", 2, 3, {"regularization.l2": 1e-6}, "{}")
    assert run_study(raw, store) == sid
    runs = store.runs(sid)
    assert all(r["status"] == "done" for r in runs) and len(runs) == 6
    assert all(r["finished"] == before[r["id"]] for r in runs if r["id"] in before)
    _looked_right(runs, 2, 3)


def test_the_report_says_what_an_undecided_comparison_could_detect(tmp_path):
    from trainwell.study.report import undecided_lines, write_report

    raw = {**TINY, "ablation": {"seeds": {"min": 2, "max": 3}, "grid": {"l2": [1e-6]}}}
    store = Store(f"sqlite:///{tmp_path / 'study.db'}")
    sid = run_study(raw, store)
    lines = undecided_lines(store, sid, store.runs(sid))
    assert len(lines) == 1 and lines[0].startswith("l2=1e-06 (all data) is undecided after 3")
    page = write_report(store, tmp_path / "report").read_text(encoding="utf-8")
    assert "could have detected a difference of" in page
