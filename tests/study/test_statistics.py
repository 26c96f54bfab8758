"""Paired t-test p-values against scipy, the tested epoch's validation value, the primary
metric and its ``[ablation] metric`` key."""

from __future__ import annotations

import json
import math

import pytest
from scipy import stats

from trainwell.app.config import ConfigError
from trainwell.study.plan import plan_study
from trainwell.study.statistics import (
    Primary,
    evaluated_epoch,
    paired_p,
    primary_metric,
    summarize,
    validation_value,
)


@pytest.mark.parametrize(
    ("a", "b"),
    [([0.3, 0.5, 0.45, 0.2], [0.1, 0.55, 0.3, 0.25]), ([1.0, 2.0], [0.5, 2.2]),
     ([0.9, 0.8, 0.85, 0.7, 0.95], [0.91, 0.84, 0.8, 0.72, 0.9])],
)  # fmt: skip
def test_paired_p_matches_scipy_ttest_rel(a, b):
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    assert paired_p(diffs) == pytest.approx(stats.ttest_rel(a, b).pvalue)


def test_paired_p_by_hand_and_edge_cases():
    # three differences 0.1, 0.2, 0.3: t = 0.2 / (0.1 / sqrt 3) = 2 sqrt 3; with 2 degrees of
    # freedom the two-sided p is 1 - |t| / sqrt(2 + t^2)
    t = 2 * math.sqrt(3)
    assert paired_p([0.1, 0.2, 0.3]) == pytest.approx(1 - t / math.sqrt(2 + t * t))
    assert math.isnan(paired_p([0.1])) and math.isnan(paired_p([]))
    assert paired_p([0.0, 0.0, 0.0]) == 1.0 and paired_p([0.1, 0.1]) == 0.0
    assert paired_p([0.1, math.nan, 0.3]) == pytest.approx(stats.ttest_1samp([0.1, 0.3], 0).pvalue)


def _run(es: dict | None, best_epoch: int | None = 1) -> dict:
    config = {"early_stopping": es} if es is not None else {}
    history = {"val_loss": [0.9, 0.5, 0.7], "ema_val_loss": [0.8, 0.6, 0.65]}
    return {"config": json.dumps(config), "best_epoch": best_epoch, "history": history}


def test_the_validation_value_is_the_tested_epochs():
    # early stopping restores the best weights (restore_best defaults to true)
    assert evaluated_epoch(_run({"enabled": True})) == 1
    assert validation_value(_run({"enabled": True}), "val_loss") == 0.5
    assert validation_value(_run({"enabled": True, "restore_best": True}), "val_loss") == 0.5
    # no restore, no early stopping (best_epoch is still tracked), or no best epoch: the last
    for run in (_run({"enabled": True, "restore_best": False}), _run({"enabled": False}),
                _run(None), _run({"enabled": True}, best_epoch=None)):  # fmt: skip
        assert evaluated_epoch(run) == -1 and validation_value(run, "val_loss") == 0.7
    # averaged weights are the final average: the last epoch, whatever restored the model
    assert validation_value(_run({"enabled": True}), "val_loss", "ema_") == 0.65
    assert math.isnan(validation_value(_run(None), "val_acc"))


def test_primary_metric_defaults_directions_and_test_counterparts():
    assert primary_metric({}) == Primary("val_nll", "val_loss", "test_nll", False)
    assert primary_metric({}, "val_acc") == Primary("val_acc", "val_acc", "test_acc", True)
    assert primary_metric({}, "val_loss").test == "test_nll"
    regression = {"task": {"kind": "regression"}}
    assert primary_metric(regression) == Primary("val_mse", "val_mse", "test_mse", False)
    assert primary_metric(regression, "val_r2").higher is True
    assert primary_metric(regression, "val_loss").test == "test_mse"
    custom = {"task": {"loss": "losses:focal"}}  # val_loss is not the NLL any more
    assert primary_metric(custom) == Primary("val_loss", "val_loss", "test_nll", False)
    told = {"task": {"metrics": ["my.metrics:f1"]},
            "early_stopping": {"monitor": "val_f1", "mode": "max"}}  # fmt: skip
    assert primary_metric(told, "val_f1") == Primary("val_f1", "val_f1", "test_f1", True)


@pytest.mark.parametrize(
    ("config", "metric", "match"),
    [
        ({}, "val_ece", "'val_ece' is not a metric the validation of this classification task "
                        "reports; accepted: val_loss, val_nll, val_acc"),
        ({"task": {"kind": "regression"}}, "val_acc", "accepted: val_loss, val_mse, val_mae"),
        ({"task": {"loss": "m:focal"}}, "val_nll", "accepted: val_loss, val_acc$"),
        ({"task": {"metrics": ["m:f1"]}}, "val_f1", 'set early_stopping.monitor = "val_f1"'),
    ],
)  # fmt: skip
def test_primary_metric_refuses_what_it_cannot_judge(config, metric, match):
    with pytest.raises(ValueError, match=match):
        primary_metric(config, metric)


TINY = {"epochs": 2, "data": {"train_size": 120}, "model": {"hidden": [16]}}


@pytest.mark.parametrize(
    ("metric", "match"),
    [
        (3, 'ablation.metric must be a validation metric name such as "val_nll"'),
        ("test_nll", 'ablation.metric must be a validation metric name .* got "test_nll"'),
        ("val_ece", "ablation.metric: 'val_ece' is not a metric the validation"),
        ("val_f1", "ablation.metric: 'val_f1' is not a metric the validation"),
    ],
)
def test_the_metric_key_of_the_ablation_section(metric, match):
    with pytest.raises(ConfigError, match=match):
        plan_study({**TINY, "ablation": {"metric": metric, "grid": {"l2": [1e-3]}}})
    for ok in ("val_nll", "val_acc", "val_loss"):
        assert len(plan_study({**TINY, "ablation": {"seeds": 1, "metric": ok}})) == 1
    user = {**TINY, "task": {"metrics": ["m:f1"]},
            "early_stopping": {"monitor": "val_f1", "mode": "max"}}  # fmt: skip
    assert len(plan_study({**user, "ablation": {"seeds": 1, "metric": "val_f1"}})) == 1


def _stored(variant: str, seed: int, acc: float, nll: float) -> dict:
    return {"variant": variant, "data": "all data", "seed": seed, "status": "done",
            "overrides": {}, "config": "{}", "final": {"test_acc": acc, "test_nll": nll,
            "test_ece": 0.1}, "history": {"val_loss": [nll], "val_acc": [acc]},
            "train_seconds": 1.0, "epochs_run": 1, "stop_reason": None, "best_epoch": 0,
            "error": None}  # fmt: skip


def test_summarize_on_accuracy_compares_and_selects_on_it():
    runs = [_stored("base", 0, 0.80, 0.5), _stored("x", 0, 0.85, 0.6),
            _stored("base", 1, 0.70, 0.4), _stored("x", 1, 0.78, 0.45),
            _stored("base", 2, 0.75, 0.45), _stored("x", 2, 0.81, 0.5)]  # fmt: skip
    rows = summarize(runs, metric="val_acc", correction="none")
    x = rows[1]
    assert x["metrics"] == ("test_acc", "test_nll", "test_ece") and x["higher"] is True
    assert x["selection"] == "val_acc" and x["val"][0] == pytest.approx((0.85 + 0.78 + 0.81) / 3)
    a, b = [0.85, 0.78, 0.81], [0.80, 0.70, 0.75]
    assert x["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue) and x["p_adj"] == x["p"]
    assert x["effect"] == ("helps" if x["p"] < 0.05 else "none")
    assert math.isnan(rows[0]["p"]) and rows[0]["effect"] == "none"


def test_a_sequential_study_reports_the_sequential_p_not_the_plain_t_test():
    """seeds = {min, max}: the table and verdict use the p-value that accounts for the
    looks (K x the smallest p over the looks taken), never the plain t-test's."""
    accs = [(0.80, 0.85), (0.70, 0.78), (0.75, 0.81), (0.72, 0.80)]
    runs = [_stored(v, s, acc, 0.5) for s, pair in enumerate(accs)
            for v, acc in zip(("base", "x"), pair, strict=True)]  # fmt: skip
    fixed = summarize(runs, metric="val_acc", correction="none")[1]["p"]
    looked = summarize(runs, metric="val_acc", correction="none", looks=(3, 10))[1]["p"]
    diffs = [x - b for b, x in accs]
    by_hand = min(1.0, 8 * min(paired_p(diffs[:3]), paired_p(diffs)))
    assert looked == pytest.approx(by_hand) and looked > fixed
