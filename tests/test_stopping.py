"""EarlyStopping: each known hole reproduced with the naive rule, then shown closed."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import trainwell
from trainwell import EarlyStopping, load, save
from trainwell.stopping import ema, improves

NAN, INF = float("nan"), float("inf")


def run(stopper: EarlyStopping, values: list) -> int | None:
    """The index of the check at which the stopper says stop (None: never)."""
    for i, v in enumerate(values):
        if stopper(v):
            return i
    return None


def naive_stop(values: list[float], patience: int, min_delta: float = 0.0, rel: bool = False):
    """The ten-line early stopping found in many tutorials (best = first value)."""
    best, wait = values[0], 0
    for i, v in enumerate(values[1:], start=1):
        threshold = best * (1 - min_delta) if rel else best - min_delta
        if v < threshold:
            best, wait = v, 0
        else:
            wait += 1
            if wait >= patience:
                return i, best
    return None, best


def reference_stop(values: list[float], patience: int, min_delta: float, rel: bool, mode: str):
    """Independent restatement of the documented rule (finite values, no smoothing)."""
    sign = 1 if mode == "min" else -1
    best, wait, best_i = None, 0, None
    for i, v in enumerate(values):
        margin = 0.0 if best is None else (min_delta * abs(best) if rel else min_delta)
        if best is None or sign * (best - v) > margin:
            best, wait, best_i = v, 0, i
        else:
            wait += 1
            if wait >= patience:
                return i, best, best_i
    return None, best, best_i


# --------------------------------------------------------------------------- the holes
def test_nan_first_value_never_becomes_best() -> None:
    values = [NAN, 1.0, 0.8, 0.6, 0.5, 0.4]
    stop, best = naive_stop(values, patience=2)
    assert stop == 2 and math.isnan(best)  # the hole: NaN is best forever, stops at once
    stopper = EarlyStopping(patience=2, nan_policy="worst")
    assert run(stopper, values) is None
    assert stopper.best == 0.4 and stopper.best_step == 5


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_nan_policies(bad: float) -> None:
    stopper = EarlyStopping(patience=3)  # default "stop"
    assert run(stopper, [1.0, 0.9, bad, 0.1]) == 2
    assert stopper.reason == f"val_loss is {bad}" and stopper.best == 0.9
    with pytest.raises(FloatingPointError, match="'val_loss' is"):
        run(EarlyStopping(patience=3, nan_policy="raise"), [1.0, bad])
    worst = EarlyStopping(patience=2, nan_policy="worst")
    assert run(worst, [1.0, bad, 0.5, bad, bad]) == 4  # a non-improving check, never best
    assert worst.best == 0.5 and worst.best_step == 2


def test_relative_delta_on_negative_metric() -> None:
    values = [-1.0, -0.995, -0.99, -0.985]  # getting worse (mode min)
    stop, best = naive_stop(values, patience=2, min_delta=0.01, rel=True)
    assert stop is None and best == -0.985  # the hole: best*(1-d) flips sign, worse "improves"
    stopper = EarlyStopping(patience=2, min_delta=0.01, delta_mode="rel")
    assert run(stopper, values) == 2 and stopper.best == -1.0
    assert improves(-1.011, -1.0, "min", 0.01, "rel") and not improves(
        -1.009, -1.0, "min", 0.01, "rel"
    )
    assert improves(-0.989, -1.0, "max", 0.01, "rel") and not improves(
        -0.991, -1.0, "max", 0.01, "rel"
    )


@pytest.mark.parametrize("seed", range(20))
def test_matches_reference_rule(seed: int) -> None:
    rnd = random.Random(seed)
    mode, rel = rnd.choice(["min", "max"]), rnd.random() < 0.5
    values = [round(rnd.gauss(-0.5 if seed % 2 else 2.0, 1.0), 1) for _ in range(40)]  # ties
    patience, min_delta = rnd.randint(1, 5), rnd.choice([0.0, 0.05, 0.2])
    stopper = EarlyStopping(
        monitor="score",  # a name of no known direction: the mode is the one given
        mode=mode,
        patience=patience,
        min_delta=min_delta,
        delta_mode="rel" if rel else "abs",
    )
    stop, best, best_i = reference_stop(values, patience, min_delta, rel, mode)
    assert run(stopper, values) == stop
    assert (stopper.best, stopper.best_step) == (best, best_i)


def test_equal_is_not_improvement_and_improved_flag() -> None:
    stopper = EarlyStopping(monitor="acc", mode="max", patience=2)
    flags = []
    for v in [0.5, 0.7, 0.7, 0.7]:
        stop = stopper({"acc": v, "other": 0})
        flags.append((stop, stopper.improved, stopper.wait))
    assert flags == [(False, True, 0), (False, True, 0), (False, False, 1), (True, False, 2)]
    assert stopper.reason == "acc did not improve for 2 checks"
    assert stopper(0.99) and not stopper.improved  # sticky once stopped


def _configs() -> list[dict]:
    return [
        {"patience": 3},
        {"patience": 3, "smoothing": "ema", "window": 3, "nan_policy": "worst"},
        {"patience": 2, "smoothing": "median", "window": 3, "min_delta": 0.01},
        {"monitor": {"loss": "min", "acc": "max"}, "patience": 3, "policy": "any"},
        {"monitor": {"loss": "min", "acc": "max"}, "patience": 3, "policy": "all"},
        {"monitor": {"acc": "max", "loss": "min"}, "patience": 3, "policy": "lexicographic"},
        {"patience": 4, "warmup": 2, "baseline": 1.5, "divergence_threshold": 5.0},
    ]


@pytest.mark.parametrize("config", _configs())
def test_resume_mid_patience_is_exact(tmp_path: Path, config: dict) -> None:
    rnd = random.Random(7)
    multi = isinstance(config.get("monitor"), dict)
    seq = [
        {
            "loss": 2 / (i + 1) + rnd.gauss(0, 0.1),
            "acc": round(min(1, i / 20 + rnd.gauss(0, 0.05)), 2),
        }
        for i in range(40)
    ]
    values = seq if multi else [m["loss"] for m in seq]
    cfg = {"monitor": "loss", **config}
    full = EarlyStopping(**cfg)
    trace_full = []
    for i, v in enumerate(values):
        trace_full.append((full(v, step=i), full.improved, full.wait, full.best, full.reason))
        if full.stopped:
            break
    stop_at = len(trace_full) - 1
    assert stop_at > 3
    assert full.stopped
    waiting = [i for i in range(1, stop_at + 1) if trace_full[i - 1][2] > 0]
    assert waiting
    for cut in waiting:  # resume mid-patience: the last check before the cut had wait > 0
        first = EarlyStopping(**cfg)
        for i, v in enumerate(values[:cut]):
            first(v, step=i)
        path = save(tmp_path / "stopper", {"stopper": first.state_dict()})
        resumed, fresh = EarlyStopping(**cfg), EarlyStopping(**cfg)
        resumed.load_state_dict(load(path)["stopper"])  # fresh: a restart that lost the state
        trace_resumed, trace_fresh = list(trace_full[:cut]), list(trace_full[:cut])
        for i, v in enumerate(values[cut : stop_at + 1], start=cut):
            for stopper, trace in ((resumed, trace_resumed), (fresh, trace_fresh)):
                stop = stopper(v, step=i)
                trace.append((stop, stopper.improved, stopper.wait, stopper.best, stopper.reason))
        assert trace_resumed == trace_full
        assert resumed.state_dict() == full.state_dict()
    assert trace_fresh != trace_full  # the last cut: one check before the stop


def test_state_dict_is_plain_json() -> None:
    stopper = EarlyStopping(monitor={"a": "min", "b": "max"}, smoothing="median", policy="all")
    for i in range(5):
        stopper({"a": 1.0 / (i + 1), "b": float(i % 2)})
    state = stopper.state_dict()
    assert json.loads(json.dumps(state)) == state
    with pytest.raises(ValueError, match="state monitors"):
        EarlyStopping(monitor="a", mode="min").load_state_dict(state)


# ----------------------------------------------------------------------- multi-metric
MULTI = {"loss": "min", "acc": "max"}
#            loss improves 4 times, acc only twice
SEQ = [(1.0, 0.5), (0.9, 0.6), (0.8, 0.6), (0.7, 0.6), (0.6, 0.6), (0.6, 0.6), (0.6, 0.6)]


def _multi(policy: str, seq=SEQ, **kw) -> tuple[int | None, EarlyStopping]:
    stopper = EarlyStopping(monitor=MULTI, patience=2, policy=policy, **kw)
    return run(stopper, [{"loss": lo, "acc": ac} for lo, ac in seq]), stopper


def test_policy_any_stops_when_one_metric_stalls() -> None:
    stop, stopper = _multi("any")
    assert stop == 3 and stopper.reason == "acc did not improve for 2 checks"
    assert stopper.best_step == 1 and stopper.best == {"loss": 0.9, "acc": 0.6}  # both improved


def test_policy_all_stops_when_every_metric_stalls() -> None:
    stop, stopper = _multi("all")
    assert stop == 6 and stopper.reason == "loss, acc did not improve for 2 checks"
    assert stopper.best_step == 4  # the last check that improved one metric, worsened none
    # a step that trades a worse acc for a better loss is not a new best under "all"
    stop, stopper = _multi("all", [(1.0, 0.5), (0.9, 0.4), (0.9, 0.4), (0.9, 0.4)])
    assert stop == 3 and stopper.best_step == 0


def test_policy_lexicographic_breaks_ties_with_next_metric() -> None:
    stopper = EarlyStopping(
        monitor={"acc": "max", "loss": "min"}, patience=2, policy="lexicographic"
    )
    seq = [(0.5, 1.0), (0.6, 1.2), (0.6, 1.1), (0.6, 1.1), (0.55, 0.1), (0.6, 1.15)]
    decisions = [stopper({"acc": a, "loss": lo}) for a, lo in seq[:5]]
    assert decisions == [False, False, False, False, True]  # tie (0.6, 1.1), then acc drops
    assert stopper.best_step == 2 and stopper.best == {"acc": 0.6, "loss": 1.1}


# ------------------------------------------------------------- smoothing and options
def test_ema_smoothing_matches_hand_computation() -> None:
    rnd = random.Random(1)
    values = [1 / (i + 1) + rnd.gauss(0, 0.05) for i in range(15)]
    stopper = EarlyStopping(patience=100, smoothing="ema", window=4)
    s, alpha = None, 2 / (4 + 1)
    for v in values:
        stopper(v)
        s = v if s is None else alpha * v + (1 - alpha) * s
        assert stopper.last["val_loss"] == pytest.approx(s, rel=1e-12)
    assert ema(None, 2.0, 0.3) == 2.0 and ema(2.0, 1.0, 0.3) == pytest.approx(1.7)


def test_median_smoothing_ignores_a_lucky_outlier() -> None:
    values = [1.0, 0.9, 0.1, 0.85, 0.84, 0.83, 0.9, 0.95, 0.99]  # 0.1: one lucky batch
    raw = EarlyStopping(patience=3)
    assert run(raw, values) == 5 and raw.best == 0.1  # the raw value gets stuck on the outlier
    smoothed = EarlyStopping(patience=3, smoothing="median", window=3)
    stop = run(smoothed, values)
    medians = [statistics.median(values[max(0, i - 2) : i + 1]) for i in range(len(values))]
    assert (stop, smoothed.best, smoothed.best_step) == reference_stop(medians, 3, 0, False, "min")
    assert stop > 5 and smoothed.best_step > 2  # kept improving past the outlier


def test_baseline_must_be_beaten() -> None:
    stopper = EarlyStopping(patience=2, baseline=0.5)
    assert run(stopper, [0.9, 0.7, 0.6]) == 1 and stopper.best is None
    stopper = EarlyStopping(monitor="acc", mode="max", patience=2, baseline=0.5)
    assert run(stopper, [0.4, 0.6, 0.55, 0.55]) == 3 and stopper.best == 0.6


def test_warmup_checks_count_for_nothing() -> None:
    stopper = EarlyStopping(patience=2, warmup=3)
    assert run(stopper, [0.1, 5.0, 5.0, 1.0, 0.9, 0.95, 0.95]) == 6
    assert stopper.best == 0.9 and stopper.best_step == 4  # 0.1 during warmup never counted
    assert run(EarlyStopping(patience=2, warmup=3), [0.5, NAN]) == 1  # NaN still stops


def test_thresholds() -> None:
    stopper = EarlyStopping(monitor="acc", mode="max", patience=10, stopping_threshold=0.9)
    assert run(stopper, [0.5, 0.8, 0.9, 0.95]) == 2 and stopper.improved
    assert stopper.reason == "reached stopping_threshold (acc 0.9)"
    stopper = EarlyStopping(patience=10, min_delta=0.1, stopping_threshold=0.5)
    assert run(stopper, [0.7, 0.55, 0.5]) == 2  # thresholds use no margin
    stopper = EarlyStopping(patience=10, min_delta=0.1, divergence_threshold=3.0)
    assert run(stopper, [2.0, 3.05, 3.0]) == 1
    stopper = EarlyStopping(patience=10, divergence_threshold=3.0)
    assert run(stopper, [2.0, 3.0, 2.5, 3.5]) == 3
    assert stopper.reason == "val_loss crossed divergence_threshold 3.0 (value 3.5)"
    stopper = EarlyStopping(patience=10, divergence_threshold=3.0, nan_policy="worst")
    assert run(stopper, [2.0, NAN]) == 1  # a NaN counted as worst is past any threshold
    multi = EarlyStopping(monitor=MULTI, patience=10, stopping_threshold={"loss": 0.5, "acc": 0.9})
    seq = [{"loss": 0.4, "acc": 0.5}, {"loss": 0.6, "acc": 0.95}, {"loss": 0.5, "acc": 0.9}]
    assert run(multi, seq) == 2  # stops only once every listed metric is good enough


def test_step_defaults_to_call_count() -> None:
    stopper = EarlyStopping(patience=5)
    for v in [3.0, 2.0, 2.5, 1.0, 1.5]:
        stopper(v)
    assert stopper.best_step == 3
    stopper.reset()
    stopper(1.0, step=100)
    assert stopper.best_step == 100 and stopper.checks == 1


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode must be 'min', 'max' or None"):
        EarlyStopping(mode="auto")
    with pytest.raises(ValueError, match="patience must be an integer >= 1"):
        EarlyStopping(patience=0)
    with pytest.raises(ValueError, match="min_delta must be >= 0"):
        EarlyStopping(min_delta=-0.1)
    with pytest.raises(ValueError, match=r"delta_mode must be one of \('abs', 'rel'\)"):
        EarlyStopping(delta_mode="pct")
    with pytest.raises(ValueError, match="nan_policy must be one of"):
        EarlyStopping(nan_policy="ignore")
    with pytest.raises(ValueError, match="policy must be one of"):
        EarlyStopping(monitor=MULTI, policy="first")
    with pytest.raises(ValueError, match="smoothing must be one of"):
        EarlyStopping(smoothing="mean")
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        EarlyStopping(window=0)
    with pytest.raises(ValueError, match="mode of 'acc' must be"):
        EarlyStopping(monitor={"acc": "maximize"})
    with pytest.raises(ValueError, match="baseline must be a dict"):
        EarlyStopping(monitor=MULTI, baseline=0.5)
    with pytest.raises(ValueError, match="names unmonitored metrics"):
        EarlyStopping(baseline={"val_acc": 0.5})
    with pytest.raises(ValueError, match="metrics has no 'val_loss'"):
        EarlyStopping()({"loss": 1.0})
    with pytest.raises(TypeError, match="pass a metrics dict"):
        EarlyStopping(monitor=MULTI)(1.0)
    with pytest.raises(TypeError, match="metric 'val_loss' must be a number"):
        EarlyStopping()({"val_loss": "low"})


def test_public_name() -> None:
    assert trainwell.EarlyStopping is EarlyStopping


# ------------------------------------------------------------ direction from the name
ISSUE_VAL_ACC = [0.352, 0.693, 0.789]  # issue 14: an improving run that mode="min" stopped


def test_val_acc_keeps_improving_with_the_default_mode() -> None:
    # the hole: judged with "min" (the old default), rising accuracy never improves
    blind = EarlyStopping(monitor="score", mode="min", patience=2)
    assert run(blind, ISSUE_VAL_ACC) == 2 and blind.best == 0.352 and blind.best_step == 0
    stopper = EarlyStopping(monitor="val_acc", patience=2)  # mode from the name
    assert stopper.modes == {"val_acc": "max"}
    assert run(stopper, [{"val_acc": v, "val_loss": 1.0} for v in ISSUE_VAL_ACC]) is None
    assert stopper.best == 0.789 and stopper.best_step == 2 and stopper.wait == 0


def test_fit_restore_best_keeps_the_last_weights_of_an_improving_val_acc() -> None:
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,))), batch_size=8)
    model = nn.Linear(4, 2)
    scripted = iter(ISSUE_VAL_ACC)
    weights: list[dict] = []

    class Keep:
        def on_epoch_end(self, row: dict) -> None:
            weights.append({k: v.clone() for k, v in model.state_dict().items()})

    result = trainwell.fit(
        model, data, data, torch.optim.SGD(model.parameters(), lr=0.5), epochs=3,
        metrics={"acc": lambda outputs, targets: next(scripted)},
        early_stopping=EarlyStopping(monitor="val_acc", patience=1), restore_best=True,
        callbacks=[Keep()],
    )  # fmt: skip
    assert [row["val_acc"] for row in result.history] == ISSUE_VAL_ACC
    assert result.stop_reason == "max_epochs" and result.best_epoch == 2  # never stopped
    assert not torch.equal(weights[0]["weight"], weights[2]["weight"])  # training moved them
    for name, value in model.state_dict().items():  # the best weights are the last ones
        assert torch.equal(value, weights[2][name]), name


KNOWN = {"loss": "min", "nll": "min", "ece": "min", "brier": "min", "mse": "min",
         "mae": "min", "acc": "max", "r2": "max"}  # fmt: skip
PREFIXES = ["", "val_", "test_", "train_", "ema_", "swa_", "ema_val_", "swa_val_", "ema_test_"]


@pytest.mark.parametrize("prefix", PREFIXES)
def test_every_known_metric_and_prefix_has_its_direction(prefix: str) -> None:
    from trainwell.stopping import METRIC_DIRECTIONS, metric_base_name, metric_mode

    assert METRIC_DIRECTIONS == KNOWN
    for base, mode in KNOWN.items():
        name = prefix + base
        assert metric_base_name(name) == base and metric_mode(name) == mode, name
        assert EarlyStopping(monitor=name).modes == {name: mode}
        assert EarlyStopping(monitor=name, mode=mode).modes == {name: mode}  # agreeing: fine
    assert metric_mode(prefix + "f1") is None and metric_mode(prefix + "accuracy") is None


def test_unknown_metric_needs_a_mode() -> None:
    with pytest.raises(ValueError, match=r"monitor 'my_metric' is not a metric.*mode='min'"):
        EarlyStopping(monitor="my_metric")
    with pytest.raises(ValueError, match="monitor 'val_f1' is not a metric"):
        EarlyStopping(monitor=["val_loss", "val_f1"])  # per metric
    with pytest.raises(ValueError, match="monitor 'f1' is not a metric"):
        EarlyStopping(monitor={"val_loss": "min", "f1": None})
    assert EarlyStopping(monitor="my_metric", mode="max").modes == {"my_metric": "max"}
    assert EarlyStopping(monitor=["val_loss", "val_acc"]).modes == {
        "val_loss": "min", "val_acc": "max"
    }  # fmt: skip
    assert EarlyStopping(monitor={"val_acc": None, "f1": "max"}).modes == {
        "val_acc": "max", "f1": "max"
    }  # fmt: skip


@pytest.mark.parametrize(
    ("monitor", "mode"),
    [
        ({"monitor": "val_acc"}, "min"),
        ({"monitor": "ema_val_loss"}, "max"),
        ({"monitor": ["val_loss", "val_r2"]}, "min"),  # r2 is better high
        ({"monitor": {"val_loss": "min", "val_acc": "min"}}, None),
    ],
)
def test_a_mode_that_contradicts_the_name_raises(monitor: dict, mode: str | None) -> None:
    kwargs = {**monitor, **({"mode": mode} if mode else {})}
    with pytest.raises(ValueError, match="contradicts monitor"):
        EarlyStopping(**kwargs)


def test_state_dict_with_explicit_mode_loads_into_an_inferring_stopper() -> None:
    old = EarlyStopping(monitor="val_acc", mode="max", patience=3)
    for v in [0.5, 0.6, 0.55]:
        old({"val_acc": v})
    state = json.loads(json.dumps(old.state_dict()))
    assert state["monitor"] == {"val_acc": "max"}  # states always carried the mode
    new = EarlyStopping(monitor="val_acc", patience=3)
    new.load_state_dict(state)
    assert new.state_dict() == old.state_dict()
    assert [new({"val_acc": v}) for v in [0.58, 0.59]] == [False, True]
    with pytest.raises(ValueError, match="state monitors"):  # a state judged the other way
        EarlyStopping(monitor="val_acc").load_state_dict({**state, "monitor": {"val_acc": "min"}})
