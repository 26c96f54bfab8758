"""Ensembles of a study's seeds: hand-computed scores, a real tiny study, an old store."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sqlalchemy import create_engine, text

from trainwell.study.execute import run_study
from trainwell.study.report import write_report
from trainwell.study.seed_ensembles import (
    beats_every_single,
    decode_predictions,
    encode_predictions,
    seed_ensembles,
)
from trainwell.study.store import Store


def _ece(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    conf, pred = probs.max(1), probs.argmax(1)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.mean() * abs((pred[inside] == y[inside]).mean() - conf[inside].mean())
    return total


def test_ensemble_scores_equal_a_hand_computation():
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2, 1, 0, 2, 2, 1])
    members = [rng.dirichlet(np.ones(3), size=len(y)).astype("float32") for _ in range(3)]
    index = np.arange(100, 108)
    runs, preds = [], {}
    for seed, probs in enumerate(members):
        runs.append({"id": seed + 1, "status": "done", "data": "all", "variant": "base",
                     "seed": seed})  # fmt: skip
        logits = torch.log(torch.from_numpy(probs))
        preds[seed + 1] = encode_predictions(logits, torch.from_numpy(y), "classification", index)
    # one more seed of another variant whose test split misses item 107
    runs.append({"id": 9, "status": "done", "data": "other", "variant": "base", "seed": 0})
    preds[9] = encode_predictions(torch.zeros(2, 3), torch.tensor([0, 1]), "classification", None)
    (row,) = [r for r in seed_ensembles(runs, preds) if r["data"] == "all"]
    mean = np.mean(np.stack(members).astype(np.float64), axis=0)
    assert row["members"] == 3 and row["items"] == len(y)
    nll = -np.mean(np.log(mean[np.arange(len(y)), y]))
    assert row["ensemble"]["test_nll"] == pytest.approx(nll, rel=1e-5)
    assert row["ensemble"]["test_acc"] == pytest.approx(np.mean(mean.argmax(1) == y))
    assert row["ensemble"]["test_ece"] == pytest.approx(_ece(mean, y), abs=1e-5)
    singles = [-np.mean(np.log(m.astype(np.float64)[np.arange(len(y)), y])) for m in members]
    assert row["member_mean"]["test_nll"] == pytest.approx(np.mean(singles), rel=1e-5)


def test_ensemble_uses_the_test_items_common_to_every_seed():
    y = np.array([0, 1, 0, 1])
    a = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]], dtype="float32")
    b = np.array([[0.7, 0.3], [0.4, 0.6], [0.1, 0.9], [0.5, 0.5]], dtype="float32")
    preds = {
        1: encode_predictions(torch.log(torch.from_numpy(a)), torch.from_numpy(y),
                              "classification", np.array([5, 6, 7, 8])),
        2: encode_predictions(torch.log(torch.from_numpy(b[[3, 2, 1, 0]])),  # another order
                              torch.from_numpy(y[[3, 2, 1, 0]]), "classification",
                              np.array([9, 7, 6, 5])),
    }  # fmt: skip
    runs = [{"id": i, "status": "done", "data": "d", "variant": "v", "seed": i} for i in (1, 2)]
    (row,) = seed_ensembles(runs, preds)
    assert row["items"] == 3  # items 5, 6, 7
    mean = (a[:3] + b[:3]) / 2
    assert row["ensemble"]["test_nll"] == pytest.approx(-np.mean(np.log(mean[[0, 1, 2], y[:3]])))


def test_predictions_round_trip():
    logits = torch.randn(5, 4)
    stored = encode_predictions(logits, torch.arange(5) % 4, "classification", np.arange(5))
    values, targets, index = decode_predictions(json.loads(json.dumps(stored)))
    assert np.allclose(values, torch.softmax(logits, 1).numpy(), atol=1e-6)
    assert targets.tolist() == [0, 1, 2, 3, 0] and index.tolist() == list(range(5))


@pytest.mark.parametrize("shape", [(6,), (6, 1)])
def test_one_logit_per_item_is_stored_as_sigmoid_probabilities(shape):
    """A bce_with_logits model's single logit z is P(1) = sigmoid(z), not a softmax over
    one column (which is 1 for every item and makes every ensemble NLL 0 or inf)."""
    z = torch.randn(shape)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    values, _, _ = decode_predictions(encode_predictions(z, y.float(), "classification", None))
    p1 = torch.sigmoid(z.reshape(-1))
    assert np.allclose(values, torch.stack([1 - p1, p1], 1).numpy(), atol=1e-6)
    nll = -np.log(values[np.arange(6), y.numpy()]).mean()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(z.reshape(-1), y.float())
    assert math.isclose(nll, float(bce), rel_tol=1e-5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("ens")
    raw = {"epochs": 2, "data": {"train_size": 120}, "model": {"hidden": [16]},
           "ablation": {"seeds": 2, "grid": {"l2": [1e-2]}}}  # fmt: skip
    store = Store(f"sqlite:///{out / 'results.sqlite'}")
    run_study(raw, store, jobs=1)
    return store, out


def test_a_tiny_study_keeps_predictions_and_reports_the_ensemble(tiny):
    store, out = tiny
    study_id = store.study_id()
    runs = store.runs(study_id)
    preds = store.predictions(study_id)
    assert {r["id"] for r in runs if r["status"] == "done"} == set(preds) and len(preds) == 4
    for run in runs:  # the stored probabilities reproduce the run's own test NLL
        values, targets, index = decode_predictions(preds[run["id"]])
        assert len(values) == len(targets) == len(index) == 360
        nll = -np.mean(np.log(values[np.arange(len(targets)), targets]))
        assert nll == pytest.approx(run["final"]["test_nll"], rel=1e-4)
    rows = seed_ensembles(runs, preds)
    assert {r["variant"] for r in rows} == {"base", "l2=0.01"}
    assert all(r["members"] == 2 and r["items"] > 0 for r in rows)
    page = write_report(store, out / "report").read_text()
    assert "Ensembles of seeds" in page and "members' mean" in page
    assert "share an initialization" in page
    base = next(r for r in rows if r["variant"] == "base")
    assert f"nll {base['ensemble']['test_nll']:.4g}" in page
    assert f"nll {base['member_mean']['test_nll']:.4g}" in page


def test_an_old_store_without_predictions_still_reports(tiny, tmp_path):
    store, _ = tiny
    path = tmp_path / "old.sqlite"
    source = store.engine.raw_connection()
    try:
        import sqlite3

        target = sqlite3.connect(path)
        source.driver_connection.backup(target)
        target.close()
    finally:
        source.close()
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE predictions"))
    engine.dispose()
    old = Store(f"sqlite:///{path}", create=False)
    assert old.predictions(old.study_id()) == {}
    page = write_report(old, tmp_path / "report").read_text()
    assert "Ensembles of seeds" not in page and "Recommendation" in page
    assert math.isfinite(len(page))


def test_the_ensemble_claimed_is_the_variant_chosen_on_validation_never_the_best_on_test():
    """Choosing the best ensemble on test and reporting it on test flatters it: only the
    validation winner's ensemble may be claimed, against the best single run on test."""

    def row(variant, single, ensemble):
        return {"data": "d", "variant": variant, "kind": "classification", "members": 4,
                "items": 50, "member_mean": {"test_nll": single},
                "ensemble": {"test_nll": ensemble}}  # fmt: skip

    rows = [row("a", 0.50, 0.49), row("b", 0.60, 0.40)]  # b's ensemble is best on test
    (line,) = beats_every_single(rows, {"d": "a"})
    assert "seeds of a (the variant chosen on validation)" in line and "0.49 vs 0.5" in line
    assert beats_every_single([row("a", 0.50, 0.55), row("b", 0.60, 0.40)], {"d": "a"}) == []
    assert beats_every_single(rows, {}) == []  # nothing chosen: nothing claimed
