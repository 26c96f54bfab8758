"""The results store: round trip, resume bookkeeping, failures, NaN handling."""

from __future__ import annotations

import math

import pytest

from trainwell.study.store import Store, default_url


def _payload(acc: float) -> dict:
    return {
        "history": [
            {"epoch": 0, "val_loss": 1.0, "train_loss": 2.0},
            {"epoch": 1, "val_loss": 0.5},
        ],
        "test": {"test_acc": acc, "test_nll": float("nan")},
        "extra": {"ema_test_acc": acc + 0.01},
        "wall_seconds": 1.5,
        "train_seconds": 1.0,
        "peak_memory_mb": 300.0,
        "epochs_run": 2,
        "best_epoch": 1,
        "stop_reason": "max_epochs",
        "steps": 10,
        "skipped_steps": 0,
        "n_params": 123,
        "grad_trace": [{"step": 0, "grad_norm": 0.5}],
    }


def test_round_trip_and_pending(tmp_path):
    store = Store(default_url(tmp_path))
    sid = store.study("s", {"seeds": 2})
    assert store.study("s", {"seeds": 2}) == sid  # same name: same study
    a = store.plan(sid, "base", "all data", 0, 0, {}, "{}")
    b = store.plan(sid, "l2=0.1", "all data", 0, 1, {"regularization.l2": 0.1}, "{}")
    assert store.plan(sid, "base", "all data", 0, 0, {}, "{}") == a  # planned once
    assert store.pending(sid) == [a, b]
    store.start(a)
    store.finish(a, _payload(0.9))
    store.fail(b, "ValueError: bad", 0.1)
    assert store.pending(sid) == []
    assert store.pending(sid, retry_failed=True) == [b]
    runs = Store(default_url(tmp_path)).runs(sid)  # a fresh connection reads the same
    assert [r["status"] for r in runs] == ["done", "failed"]
    assert runs[0]["final"]["test_acc"] == pytest.approx(0.9)
    assert math.isnan(runs[0]["final"]["test_nll"])  # NaN stored as NULL, read back as NaN
    assert runs[0]["history"]["val_loss"] == [1.0, 0.5]
    assert runs[0]["grad_trace"] == [{"step": 0, "grad_norm": 0.5}]
    assert runs[1]["error"] == "ValueError: bad"
    assert runs[1]["overrides"] == {"regularization.l2": 0.1}
    assert (tmp_path / "results.sqlite").is_file()


def test_start_drops_a_killed_attempt():
    store = Store("sqlite://")
    sid = store.study("s", {})
    rid = store.plan(sid, "base", "d", 0, 0, {}, "{}")
    store.finish(rid, _payload(0.5))
    store.start(rid)  # a new attempt: the old metrics must not mix with the new ones
    run = store.runs(sid)[0]
    assert run["status"] == "running" and run["final"] == {} and run["history"] == {}
    assert store.pending(sid) == [rid]


def test_study_lookup_and_bad_url():
    store = Store("sqlite://")
    first = store.study("one", {})
    second = store.study("two", {})
    assert store.study_id() == second and store.study_id("one") == first
    assert store.study_names() == ["one", "two"]
    with pytest.raises(ValueError, match="no study"):
        store.study_id("three")
    with pytest.raises(ValueError, match="SQLAlchemy URL"):
        Store("results.sqlite")


def test_weights_round_trip_and_a_new_claim_drops_them():
    import base64

    from torch import nn

    from trainwell.study.owners import new_owner
    from trainwell.study.seed_soups import decode_weights, encode_weights

    store = Store("sqlite://")
    sid = store.study("s", {"seeds": 2})
    a = store.plan(sid, "base", "all data", 0, 0, {}, "{}")
    b = store.plan(sid, "base", "all data", 1, 1, {}, "{}")
    net = nn.Linear(3, 2)
    weights = encode_weights(net)
    assert store.finish(a, {**_payload(0.9), "init_hash": "ab12", "weights": weights})
    assert store.finish(b, _payload(0.8))  # a payload from before soups: no row
    assert store.fingerprints(sid) == {a: {"run_id": a, "init_hash": "ab12", "n_values": 8,
                                           "kept": True}}  # fmt: skip
    (blob,) = store.weights([a, b]).values()
    assert blob == base64.b64decode(weights["data"])
    assert decode_weights(blob)["weight"].equal(net.weight.detach())
    store.fail(a, "killed")  # a retried run starts again without its old weights
    assert store.claim(sid, new_owner(), retry_failed_before=store.now() + 1) == a
    assert store.fingerprints(sid) == {} and store.weights([a]) == {}
