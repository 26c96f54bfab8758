"""Scoring a trained ensemble: members vs ensemble, before and after temperature scaling,
diversity, inference cost and reliability-diagram data.

Used by :mod:`trainwell.app.ensemble_runner`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from trainwell import metrics
from trainwell.app.data import Splits
from trainwell.ensembles.calibration import TemperatureScaler
from trainwell.ensembles.ensemble import Ensemble, combine_logits


def _scores(logits: torch.Tensor, labels: torch.Tensor, bins: int) -> dict[str, float]:
    return {
        "acc": metrics.accuracy(logits, labels),
        "nll": metrics.nll(logits, labels, kind="logits"),
        "ece": metrics.ece(logits, labels, bins, kind="logits"),
        "brier": metrics.brier(logits, labels, kind="logits"),
    }


def _calibrated(
    val: torch.Tensor, y_val: torch.Tensor, test: torch.Tensor, y_test: torch.Tensor, bins: int
) -> tuple[dict[str, float], TemperatureScaler, torch.Tensor]:
    """Test scores before and after a temperature fitted on the validation logits."""
    scaler = TemperatureScaler()
    t = scaler.fit(val, y_val)
    scaled = scaler(test)
    after = {f"{k}_ts": v for k, v in _scores(scaled, y_test, bins).items()}
    return {**_scores(test, y_test, bins), **after, "temperature": t}, scaler, scaled


def _median_seconds(run: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def inference_cost(ensemble: Ensemble, x: torch.Tensor, reps: int = 7) -> dict[str, Any]:
    """Median seconds of ``ensemble.predict(x)`` and of one member's forward, and their ratio.

    The two are timed in alternation (load drifts cancel); ``relative`` is the ensemble's
    time over one member's: about ``members`` for the loop, less with a batched pass.
    """
    member = ensemble.members[0]

    @torch.no_grad()
    def one() -> torch.Tensor:
        from trainwell.training.evaluation import eval_mode

        with eval_mode(member):
            return member(x)

    ensemble.predict(x)  # "auto" measures and caches its choice here, outside the timing
    one()
    ens_t, one_t = [], []
    for _ in range(reps):
        ens_t.append(_median_seconds(lambda: ensemble.predict(x), 1))
        one_t.append(_median_seconds(one, 1))
    ens_s, one_s = float(np.median(ens_t)), float(np.median(one_t))
    return {
        "batch": int(x.shape[0]),
        "method": ensemble.last_method,
        "ensemble_seconds": ens_s,
        "member_seconds": one_s,
        "relative": ens_s / one_s if one_s > 0 else float("nan"),
    }


def evaluate_ensemble(
    members: list[nn.Module], splits: Splits, combine: str = "mean_prob", bins: int = 15
) -> tuple[Ensemble, TemperatureScaler, dict[str, Any], dict[str, dict[str, Any]]]:
    """Test-split report of members and ensemble, before and after temperature scaling.

    Every temperature (one per member, one for the ensemble's combined logits) is fitted on
    the validation split. For ``combine="vote"`` accuracy is the vote's; NLL, ECE and Brier
    need a distribution and use ``"mean_prob"`` (``report["ensemble"]["probs_from"]``).

    Returns ``(ensemble, scaler, report, reliability)`` (see :class:`EnsembleResult`).
    """
    device = next(members[0].parameters()).device
    ensemble = Ensemble(members, combine=combine)
    x_val, y_val = (t.to(device) for t in splits.tensors("val"))
    x_test, y_test = (t.to(device) for t in splits.tensors("test"))
    out_val = ensemble.member_outputs(x_val).float()
    out_test = ensemble.member_outputs(x_test).float()
    report: dict[str, Any] = {"members": [], "settings": {"combine": combine, "ece_bins": bins}}
    reliability: dict[str, dict[str, Any]] = {}
    for i in range(len(members)):
        scores, _, _ = _calibrated(out_val[i], y_val, out_test[i], y_test, bins)
        report["members"].append(scores)
        reliability[f"member_{i}"] = metrics.reliability_diagram_data(
            out_test[i], y_test, bins, kind="logits"
        )
    keys = report["members"][0].keys()
    report["members_mean"] = {k: float(np.mean([m[k] for m in report["members"]])) for k in keys}
    rule = "mean_prob" if combine == "vote" else combine
    z_val, z_test = combine_logits(out_val, rule), combine_logits(out_test, rule)
    scores, scaler, scaled = _calibrated(z_val, y_val, z_test, y_test, bins)
    if combine == "vote":
        scores["acc"] = scores["acc_ts"] = float(
            (ensemble.predict(x_test) == y_test).double().mean()
        )
        scores["probs_from"] = "mean_prob"
    report["ensemble"] = scores
    reliability["ensemble"] = metrics.reliability_diagram_data(z_test, y_test, bins, "logits")
    reliability["ensemble_scaled"] = metrics.reliability_diagram_data(
        scaled, y_test, bins, "logits"
    )
    report["diversity"] = {
        "disagreement": metrics.disagreement(out_test),
        "mean_pairwise_kl": metrics.mean_pairwise_kl(out_test, kind="logits"),
    }
    report["inference"] = inference_cost(ensemble, x_test)
    return ensemble, scaler, report, reliability
