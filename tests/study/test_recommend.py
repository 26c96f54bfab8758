"""The recommendation rebuilt from a store of synthetic runs, checked number by number
against hand computations from the stored runs (the best strength differs by data size)."""

from __future__ import annotations

import html
import json
import math
import re

import pytest
from rich.console import Console

from trainwell.study.figures import log_axis, strength_effects
from trainwell.study.recommend import recommendation, strength_sentences, winners
from trainwell.study.report import print_table, study_rows, write_report
from trainwell.study.store import Store

SEEDS = (0, 1, 2)
DATA = {"train_fraction=0.1": 0.1, "train_fraction=1": 1.0}
BASE_NLL = {"train_fraction=0.1": [1.00, 1.10, 0.90], "train_fraction=1": [0.50, 0.55, 0.45]}
BASE_SECONDS = [9.0, 10.0, 11.0]
VARIANTS = {  # label: overrides
    "l2=0.0001": {"regularization.l2": 1e-4},
    "l2=0.01": {"regularization.l2": 1e-2},
    "dropout=0.2": {"dropout.p": 0.2},
    "dropout=0.5": {"dropout.p": 0.5},
    "ema": {"ema.enabled": True},
}
# paired test-NLL differences from the base, per seed
DIFFS = {
    ("train_fraction=0.1", "l2=0.0001"): [-0.02, 0.03, -0.01],
    ("train_fraction=0.1", "l2=0.01"): [-0.20, -0.19, -0.21],  # real: mean -0.2, sd 0.01
    ("train_fraction=0.1", "dropout=0.2"): [0.01, -0.02, 0.02],
    ("train_fraction=0.1", "dropout=0.5"): [0.05, -0.03, 0.01],
    ("train_fraction=0.1", "ema"): [-0.05, 0.04, -0.02],
    ("train_fraction=1", "l2=0.0001"): [-0.10, -0.11, -0.09],  # real: mean -0.1, sd 0.01
    ("train_fraction=1", "l2=0.01"): [0.02, -0.01, 0.00],
    ("train_fraction=1", "dropout=0.2"): [-0.01, 0.03, -0.01],
    ("train_fraction=1", "dropout=0.5"): [0.02, 0.01, -0.04],
    ("train_fraction=1", "ema"): [0.03, -0.02, -0.02],
}
# validation NLL at the best epoch (early stopping restores it) and the last epoch's offset:
# judged on the last epoch, the winners would be dropout=0.5 at 10% and l2=0.01 at 100%
VAL = {
    ("train_fraction=0.1", "base"): (1.00, 0.01),
    ("train_fraction=0.1", "l2=0.0001"): (0.98, 0.01),
    ("train_fraction=0.1", "l2=0.01"): (0.80, 0.50),
    ("train_fraction=0.1", "dropout=0.2"): (0.95, 0.01),
    ("train_fraction=0.1", "dropout=0.5"): (0.90, 0.01),
    ("train_fraction=0.1", "ema"): (0.99, 0.01),
    ("train_fraction=1", "base"): (0.50, 0.01),
    ("train_fraction=1", "l2=0.0001"): (0.40, 0.50),
    ("train_fraction=1", "l2=0.01"): (0.45, 0.01),
    ("train_fraction=1", "dropout=0.2"): (0.48, 0.01),
    ("train_fraction=1", "dropout=0.5"): (0.49, 0.01),
    ("train_fraction=1", "ema"): (0.47, 0.01),
}
SECONDS = {"l2=0.0001": [9.5, 10.0, 10.5], "l2=0.01": [10.5, 11.0, 11.5], "ema": [14, 15, 16]}


def _payload(data: str, variant: str, seed: int) -> dict:
    base = BASE_NLL[data][seed]
    nll = base + (DIFFS[(data, variant)][seed] if variant != "base" else 0.0)
    best, offset = VAL[(data, variant)]
    best += (0.0, 0.01, -0.01)[seed]
    history = [{"epoch": e, "val_loss": v, "val_acc": 0.5}
               for e, v in enumerate([best + 0.4, best, best + offset])]  # fmt: skip
    seconds = BASE_SECONDS if variant == "base" else SECONDS.get(variant, BASE_SECONDS)
    return {"history": history, "test": {"test_nll": nll, "test_acc": 0.7, "test_ece": 0.05},
            "train_seconds": seconds[seed], "wall_seconds": seconds[seed], "epochs_run": 3,
            "best_epoch": 1, "stop_reason": None}  # fmt: skip


def make_store(path, ablation: dict | None = None) -> Store:
    """A store holding the synthetic study, every run planned and finished."""
    store = Store(f"sqlite:///{path}")
    study = store.study("synthetic", {"ablation": ablation or {}, "seeds": None, "runs": 36})
    position = 0
    for seed in SEEDS:
        for data, fraction in DATA.items():
            for variant, overrides in {"base": {}, **VARIANTS}.items():
                config = {"seed": seed, "data": {"train_fraction": fraction},
                          "early_stopping": {"enabled": True}}  # fmt: skip
                for key, value in overrides.items():
                    section, _, name = key.partition(".")
                    config.setdefault(section, {})[name] = value
                run_id = store.plan(study, variant, data, seed, position, overrides,
                                    json.dumps(config))  # fmt: skip
                assert store.finish(run_id, _payload(data, variant, seed))
                position += 1
    return store


T_975_2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # Student t quantile, 2 degrees of freedom


def _by_hand(diffs: list[float]) -> tuple[float, float, float]:
    """Mean, 95% half-width and two-sided p of three paired differences (2 d.o.f.)."""
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    t = mean / (sd / math.sqrt(n))
    return mean, T_975_2 * sd / math.sqrt(n), 1 - abs(t) / math.sqrt(2 + t * t)


def _holm_by_hand() -> dict[tuple[str, str], float]:
    """Holm over the 10 comparisons, from the stored runs' differences."""
    p = {key: _by_hand(diffs)[2] for key, diffs in DIFFS.items()}
    ranked, m, running, out = sorted(p, key=p.get), len(p), 0.0, {}
    for rank, key in enumerate(ranked):
        running = max(running, min(1.0, (m - rank) * p[key]))
        out[key] = running
    return out


def _stored_diffs(store: Store, data: str, variant: str) -> list[float]:
    runs = store.runs(store.study_id())
    nll = {(r["data"], r["variant"], r["seed"]): r["final"]["test_nll"] for r in runs}
    return [nll[(data, variant, s)] - nll[(data, "base", s)] for s in SEEDS]


def _expected_lines(store: Store) -> list[str]:
    holm = _holm_by_hand()
    lines = []
    for data, variant, what, seconds, where in (
        ("train_fraction=0.1", "l2=0.01", "l2 = 0.01", 11.0, "At 10% of the data"),
        ("train_fraction=1", "l2=0.0001", "l2 = 0.0001", 10.0, "At 100% of the data"),
    ):
        mean, half, _ = _by_hand(_stored_diffs(store, data, variant))
        cost = seconds / (sum(BASE_SECONDS) / 3)
        lines.append(
            f"{where}: turn on {what}: test NLL {mean:+.3g} [{mean - half:.3g}, "
            f"{mean + half:.3g}] vs base, Holm-adjusted p = {holm[(data, variant)]:.2g}; "
            f"{cost:.2f}x the base's training time (chosen on validation NLL)."
        )
    return lines


@pytest.fixture
def store(tmp_path):
    return make_store(tmp_path / "results.sqlite")


def test_the_hand_computed_numbers(store):
    holm = _holm_by_hand()
    # the two real effects survive Holm over 10 comparisons; the noise does not
    assert holm[("train_fraction=0.1", "l2=0.01")] == pytest.approx(10 * 0.000832, rel=1e-2)
    assert holm[("train_fraction=1", "l2=0.0001")] == pytest.approx(9 * 0.003322, rel=1e-2)
    assert sorted(holm.values())[2] > 0.05
    rows = study_rows(store)
    for (data, variant), expected in holm.items():
        row = next(r for r in rows if r["data"] == data and r["variant"] == variant)
        mean, half, p = _by_hand(_stored_diffs(store, data, variant))
        assert row["d_test_nll"] == pytest.approx((mean, half))
        assert row["p"] == pytest.approx(p) and row["p_adj"] == pytest.approx(expected)
        assert row["effect"] == ("helps" if expected < 0.05 else "none")
    cost = next(r for r in rows if r["variant"] == "ema")["cost"]
    assert cost == pytest.approx(15.0 / 10.0)


def test_winners_are_chosen_on_the_tested_epochs_validation(store):
    chosen = {w["data"]: (w["row"]["variant"], w["adopt"]) for w in winners(study_rows(store))}
    # the last epoch would choose dropout=0.5 and l2=0.01: early stopping restored epoch 1
    assert chosen == {"train_fraction=0.1": ("l2=0.01", True),
                      "train_fraction=1": ("l2=0.0001", True)}  # fmt: skip


def test_the_recommendation_of_the_report_and_console_is_computed_from_the_store(store, tmp_path):
    expected = _expected_lines(store)
    assert recommendation(study_rows(store)) == expected
    text = write_report(store, tmp_path / "report").read_text(encoding="utf-8")
    block = re.search(r"<div class='verdict' id='recommendation'><ul>(.*?)</ul>", text).group(1)
    assert re.findall(r"<li>(.*?)</li>", block) == [html.escape(line) for line in expected]
    # the page opens with it: recommendation, then the table, then the figures
    assert text.index("id='recommendation'") < text.index("id='results'") < text.index("<img")
    console = Console(record=True, width=400)
    print_table(study_rows(store), console)
    printed = console.export_text().splitlines()
    assert printed[0] == "Recommendation" and [p.strip() for p in printed[1:3]] == expected


def _effect(store: Store, data: str, variant: str) -> str:
    """The effect as the recommendation writes it, from the stored runs by hand."""
    mean, half, _ = _by_hand(_stored_diffs(store, data, variant))
    p = _holm_by_hand()[(data, variant)]
    return (
        f"test NLL {mean:+.3g} [{mean - half:.3g}, {mean + half:.3g}] vs base, "
        f"Holm-adjusted p = {p:.2g}"
    )


def test_the_best_strength_differs_by_data_size(store):
    low, high = "train_fraction=0.1", "train_fraction=1"
    assert strength_sentences(study_rows(store)) == [
        f"At 10% of the data use l2 = 0.01 ({_effect(store, low, 'l2=0.01')}).",
        f"At 100% of the data use l2 = 0.0001 ({_effect(store, high, 'l2=0.0001')}).",
        "At 10% of the data no dropout strength beats the base after Holm correction (best on "
        f"validation NLL: dropout = 0.5, {_effect(store, low, 'dropout=0.5')}).",
        "At 100% of the data no dropout strength beats the base after Holm correction (best on "
        f"validation NLL: dropout = 0.2, {_effect(store, high, 'dropout=0.2')}).",
    ]


def test_benjamini_hochberg_and_no_correction_from_the_ablation_section(tmp_path):
    p = {key: _by_hand(diffs)[2] for key, diffs in DIFFS.items()}
    ranked = sorted(p, key=p.get)
    bh = {}
    for i, key in enumerate(ranked):  # min over j >= i of m p_(j) / j
        bh[key] = min(min(1.0, 10 * p[k] / (j + 1)) for j, k in enumerate(ranked) if j >= i)
    for correction, expected in (("bh", bh), ("none", p)):
        store = make_store(tmp_path / f"{correction}.sqlite", {"correction": correction})
        rows = study_rows(store)
        for (data, variant), value in expected.items():
            row = next(r for r in rows if r["data"] == data and r["variant"] == variant)
            assert row["p_adj"] == pytest.approx(value) and row["correction"] == correction
        page = write_report(store, tmp_path / correction).read_text(encoding="utf-8")
        assert ("BH-adjusted p" if correction == "bh" else "p (uncorrected)") in page


def test_keep_the_base_when_the_winner_does_not_survive_correction(store):
    rows = study_rows(store)
    for row in rows:  # as if the effects were noise: nothing survives the correction
        row["p_adj"], row["effect"] = 0.5, "none"
    lines = recommendation(rows)
    assert lines[0].startswith(
        "At 10% of the data: keep the base config; the best on validation NLL, l2 = 0.01, "
        "does not beat it on test after Holm correction (test NLL -0.2 ["
    )
    for row in rows:
        if row["variant"] != "base":
            row["val"] = (9.0, 0.1)  # the base is best on validation
    assert recommendation(rows)[1] == (
        "At 100% of the data: keep the base config; no variant beats it on validation NLL."
    )


def test_the_strength_figure(store, tmp_path):
    assert log_axis([1e-4, 1e-2]) and not log_axis([0.2, 0.5]) and not log_axis([0.0, 1e-2])
    assert not log_axis([1.0, 10.0])  # exactly 10x is not more than 10x
    path = tmp_path / "strength.png"
    assert strength_effects(study_rows(store), path) and path.stat().st_size > 10_000
    assert not strength_effects([], tmp_path / "none.png")
