"""Soups of a study's seeds: real tiny studies, hand-built soups, validation-only choice."""

from __future__ import annotations

import base64
import copy
import json
import sqlite3

import pytest
import torch
from sqlalchemy import create_engine, text
from torch import nn

from trainwell.app.config import validate
from trainwell.app.data import array_splits
from trainwell.app.runner import load_data, model_for, step_of, task_of
from trainwell.app.runner import test_metrics as scored_on_test
from trainwell.app.tasks import build_task, validation_metrics
from trainwell.averaging import average_weights, greedy_soup, update_bn
from trainwell.study import seed_soups as soups_module
from trainwell.study.execute import execute_run, run_study
from trainwell.study.report import write_report
from trainwell.study.seed_soups import (
    decode_weights,
    encode_weights,
    make_soups,
    seed_soups,
    soups_beat_every_single,
)
from trainwell.study.store import Store
from trainwell.training.evaluation import evaluate

TARGET = "tests.study.soup_code:pretrained"
FINE_TUNE = {"epochs": 3, "batch_size": 32, "optimizer": {"lr": 0.01},
             "data": {"train_size": 120, "split_seed": 0}, "model": {"target": TARGET}}  # fmt: skip


def _soups(store: Store) -> list[dict]:
    sid = store.study_id()
    runs = store.runs(sid)
    return seed_soups(runs, store.fingerprints(sid), store.weights, store.predictions(sid))


@pytest.fixture(scope="module")
def fine_tunes(tmp_path_factory):
    """2 variants x 1 data size x 3 seeds, every seed starting from the same weights."""
    out = tmp_path_factory.mktemp("soups")
    raw = {**FINE_TUNE, "ablation": {"seeds": 3, "grid": {"l2": [1e-2]}}}
    store = Store(f"sqlite:///{out / 'results.sqlite'}")
    run_study(raw, store, jobs=1)
    return store, out


def test_runs_that_share_an_initialization_make_soups_in_the_report(fine_tunes):
    store, out = fine_tunes
    fingerprints = store.fingerprints(store.study_id())
    assert len(fingerprints) == 6 and all(f["kept"] for f in fingerprints.values())
    assert len({f["init_hash"] for f in fingerprints.values()}) == 1
    rows = _soups(store)
    assert [r["variant"] for r in rows] == ["base", "l2=0.01"]
    for row in rows:
        assert "note" not in row and row["members"] == 3 and row["common"]
        assert set(row["greedy"]) == {"test_nll", "test_ece", "test_acc"}
        assert row["chosen"] and set(row["chosen"]) <= {0, 1, 2}
        assert (
            row["chosen"][0] == row["seeds"][min(range(3), key=row["val"]["members"].__getitem__)]
        )
        assert row["val"]["greedy"] <= min(row["val"]["members"])  # never worse on val
    page = write_report(store, out / "report").read_text()
    assert "Soups of seeds" in page and "seeds in the greedy soup" in page
    for row in rows:
        assert f"nll {row['greedy']['test_nll']:.4g}" in page
        assert f"nll {row['uniform']['test_nll']:.4g}" in page


def test_the_soups_equal_soups_built_by_hand_from_the_stored_weights(fine_tunes):
    store, _ = fine_tunes
    sid = store.study_id()
    runs = [r for r in store.runs(sid) if r["variant"] == "base"]
    blobs = store.weights([r["id"] for r in runs])
    config = validate(json.loads(runs[0]["config"]))
    splits, task = load_data(config), task_of(config)
    models = []
    for run in runs:
        model = model_for(config, splits)
        model.load_state_dict(decode_weights(blobs[run["id"]]))
        # the stored weights are the ones the run was tested with
        assert scored_on_test(model, splits, "cpu", task)["test_nll"] == pytest.approx(
            run["final"]["test_nll"], rel=1e-5
        )
        models.append(model)
    val, train = splits.loader("val", 512), splits.loader("train", config.batch_size)

    def val_nll(model):
        return evaluate(model, val, task.loss, "cpu", metrics=validation_metrics(task))["val_loss"]

    greedy, chosen, _ = greedy_soup(models, val_nll, mode="min", recalibrate_bn=train)
    uniform = average_weights(models)
    recalibrated = copy.deepcopy(uniform)
    update_bn(recalibrated, train)
    if val_nll(recalibrated) < val_nll(uniform):
        uniform = recalibrated
    (row,) = [r for r in _soups(store) if r["variant"] == "base"]
    assert row["chosen"] == [runs[i]["seed"] for i in chosen]
    for which, soup in (("greedy", greedy), ("uniform", uniform)):
        expected = scored_on_test(soup, splits, "cpu", task)
        for key in ("test_nll", "test_acc", "test_ece"):
            assert row[which][key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), which
    tracked = uniform.state_dict()["1.num_batches_tracked"]
    assert tracked.dtype == torch.int64  # an integer buffer is never averaged as a float


def _linear(w0: float, w1: float) -> nn.Module:
    model = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[w0], [w1]]))
    return model


def test_the_greedy_soup_is_chosen_on_validation_never_on_test():
    """Validation says class 0, test says class 1: a choice made on test would start from
    member 1 and differ."""
    x = torch.ones(8, 1)
    arrays = {"train": (x.numpy(), torch.zeros(8, dtype=torch.long).numpy()),
              "val": (x.numpy(), torch.zeros(8, dtype=torch.long).numpy()),
              "test": (x.numpy(), torch.ones(8, dtype=torch.long).numpy())}  # fmt: skip
    splits = array_splits(arrays, "toy", "classification", 2)
    task = build_task("classification", None, [])
    members = [_linear(3.0, -3.0), _linear(-3.0, 3.0), _linear(2.0, -2.0)]
    soups = make_soups(members, splits, task, step_of(validate({})), "val_loss", False)
    assert soups.chosen[0] == 0 and 1 not in soups.chosen
    test_nll = [scored_on_test(m, splits, "cpu", task)["test_nll"] for m in members]
    assert min(range(3), key=test_nll.__getitem__) == 1  # test would have picked member 1
    greedy_test = scored_on_test(soups.greedy, splits, "cpu", task)["test_nll"]
    assert greedy_test > test_nll[1] + 1.0
    assert soups.val["greedy"] <= min(soups.val["members"])


def test_the_greedy_soup_keeps_a_seed_when_the_average_is_better_on_validation():
    """Validation wants a logit margin of log 3: one member overshoots, one undershoots,
    and their average (margin 1.1) is better than either."""
    x, y = torch.ones(8, 1), torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    arrays = {s: (x.numpy(), y.numpy()) for s in ("train", "val", "test")}
    splits = array_splits(arrays, "toy", "classification", 2)
    task = build_task("classification", None, [])
    members = [_linear(0.1, -0.1), _linear(1.0, -1.0)]
    soups = make_soups(members, splits, task, step_of(validate({})), "val_loss", False)
    assert soups.chosen == [1, 0] and soups.val["greedy"] < min(soups.val["members"])
    by_hand = average_weights(members)
    assert torch.allclose(soups.greedy.weight, by_hand.weight)
    assert torch.allclose(soups.uniform.weight, by_hand.weight)


def _study(tmp_path, raw, name):
    store = Store(f"sqlite:///{tmp_path / name}.sqlite")
    run_study(raw, store, jobs=1)
    return store


def test_seeded_initializations_or_own_splits_make_no_soup_and_the_report_says_why(tmp_path):
    raw = {"epochs": 1, "data": {"train_size": 120}, "model": {"hidden": [8]},
           "ablation": {"seeds": 2}}  # fmt: skip
    store = _study(tmp_path, raw, "seeded")
    (row,) = _soups(store)
    assert "different initializations" in row["note"] and "share an initialization" in row["note"]
    assert "greedy" not in row
    page = write_report(store, tmp_path / "seeded").read_text()
    assert "start from 2 different initializations" in page

    own_splits = {**FINE_TUNE, "epochs": 1, "data": {"train_size": 120},
                  "ablation": {"seeds": 2}}  # fmt: skip
    (row,) = _soups(_study(tmp_path, own_splits, "splits"))
    assert "own data split" in row["note"] and "data.split_seed" in row["note"]


def test_an_old_store_without_the_weights_table_still_reports(fine_tunes, tmp_path):
    store, _ = fine_tunes
    path = tmp_path / "old.sqlite"
    source = store.engine.raw_connection()
    try:
        target = sqlite3.connect(path)
        source.driver_connection.backup(target)
        target.close()
    finally:
        source.close()
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE weights"))
    engine.dispose()
    old = Store(f"sqlite:///{path}", create=False)
    assert old.fingerprints(old.study_id()) == {}
    rows = _soups(old)
    assert len(rows) == 2 and all("no starting-weights fingerprint" in r["note"] for r in rows)
    page = write_report(old, tmp_path / "report").read_text()
    assert "Recommendation" in page and "Ensembles of seeds" in page
    assert "no starting-weights fingerprint" in page


def test_a_run_keeps_its_start_fingerprint_and_weights_up_to_the_cap(monkeypatch):
    raw = {**FINE_TUNE, "epochs": 1}
    payload = execute_run(raw)
    json.dumps(payload)  # JSON- (and so Ray-) safe
    assert payload["init_hash"] and payload["weights"]["format"] == "safetensors"
    state = decode_weights(base64.b64decode(payload["weights"]["data"]))
    assert payload["weights"]["values"] == sum(t.numel() for t in state.values())
    assert state["1.num_batches_tracked"].dtype == torch.int64
    monkeypatch.setattr(soups_module, "WEIGHTS_LIMIT", payload["weights"]["values"] - 1)
    assert encode_weights(model_for(validate(raw), load_data(validate(raw))))["data"] is None


def test_a_built_in_model_keeps_its_fingerprint_but_not_its_weights():
    """Built-in models start from the run's seed: their weights would never be souped, so
    a study of them (the demo) does not store megabytes per run."""
    payload = execute_run({"epochs": 1, "data": {"train_size": 120}, "model": {"hidden": [8]}})
    assert payload["init_hash"] and payload["weights"]["values"] > 0
    assert payload["weights"]["data"] is None


def test_weights_above_the_cap_make_no_soup_and_say_so():
    runs = [{"id": i, "status": "done", "data": "d", "variant": "v", "seed": i} for i in (1, 2)]
    prints = {i: {"init_hash": "ab", "n_values": 5_000_000, "kept": False} for i in (1, 2)}
    (row,) = seed_soups(runs, prints, lambda ids: {})
    assert "weights not kept" in row["note"] and "5,000,000" in row["note"]


def test_a_soup_that_beats_every_single_technique_is_said_with_its_numbers():
    def row(variant, single, greedy, uniform):
        return {"data": "d", "variant": variant, "kind": "classification", "members": 3,
                "common": True, "items": 40, "chosen": [0, 2],
                "member_mean": {"test_nll": single}, "greedy": {"test_nll": greedy},
                "uniform": {"test_nll": uniform}}  # fmt: skip

    ensembles = [{"data": "d", "variant": "a", "member_mean": {"test_nll": 0.5}}]
    a_chosen = {"d": "a"}
    (line,) = soups_beat_every_single([row("a", 0.5, 0.45, 0.6), row("b", 0.7, 0.8, 0.9)],
                                      ensembles, a_chosen)  # fmt: skip
    assert "greedy soup of a's seeds (2 of 3 averaged)" in line and "0.45 vs 0.5" in line
    assert "1x the inference cost" in line
    assert soups_beat_every_single([row("a", 0.5, 0.55, 0.6)], ensembles, a_chosen) == []
    alone = {**row("a", 0.5, 0.45, 0.6), "chosen": [1]}  # one seed is no soup: never claimed
    assert soups_beat_every_single([alone], ensembles, a_chosen) == []
    (line,) = soups_beat_every_single([{**alone, "uniform": {"test_nll": 0.4}}], ensembles,
                                      a_chosen)  # fmt: skip
    assert "uniform soup of a's seeds (3 of 3 averaged)" in line
    # b's soup is the best on test, but b was not chosen on validation: never claimed
    best_on_test = [row("a", 0.5, 0.55, 0.6), row("b", 0.7, 0.3, 0.3)]
    assert soups_beat_every_single(best_on_test, ensembles, a_chosen) == []
    (line,) = soups_beat_every_single(best_on_test, ensembles, {"d": "b"})
    assert "soup of b's seeds" in line and "0.3 vs 0.5" in line
