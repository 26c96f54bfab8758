"""Metrics against hand computations and straightforward per-sample reference loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainwell.metrics import (
    accuracy,
    brier,
    disagreement,
    ece,
    mae,
    mean_pairwise_kl,
    mse,
    nll,
    r2,
    reliability_diagram_data,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def random_data(n: int = 500, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(n, classes) * 3
    labels = torch.randint(classes, (n,))
    return logits, labels


def ece_reference(probs: torch.Tensor, labels: torch.Tensor, bins: int) -> tuple[float, list]:
    """Guo et al.'s definition, bin by bin: bins (lo, hi], confidence 0 in the first."""
    conf, pred = probs.max(1)
    edges = torch.linspace(0, 1, bins + 1, dtype=probs.dtype).tolist()
    total, table = 0.0, []
    for b in range(bins):
        lo, hi = edges[b], edges[b + 1]
        members = [
            i for i in range(len(labels)) if (lo < conf[i] <= hi) or (b == 0 and conf[i] == 0)
        ]
        if not members:
            table.append((0, None, None))
            continue
        acc = sum(float(pred[i] == labels[i]) for i in members) / len(members)
        avg = sum(float(conf[i]) for i in members) / len(members)
        total += len(members) / len(labels) * abs(acc - avg)
        table.append((len(members), avg, acc))
    return total, table


# ------------------------------------------------------------------ accuracy and nll
def test_accuracy_on_logits_probabilities_and_class_indices() -> None:
    logits, labels = random_data()
    expected = sum(int(logits[i].argmax() == labels[i]) for i in range(len(labels))) / 500
    assert accuracy(logits, labels) == pytest.approx(expected)
    assert accuracy(logits.softmax(1), labels) == pytest.approx(expected)
    assert accuracy(logits.argmax(1), labels) == pytest.approx(expected)
    with pytest.raises(ValueError, match="class indices shaped like labels"):
        accuracy(logits, labels[:10])


def test_nll_matches_cross_entropy_for_logits_and_minus_log_for_probs() -> None:
    logits, labels = random_data()
    expected = F.cross_entropy(logits, labels).item()
    assert nll(logits, labels) == pytest.approx(expected, rel=1e-6)
    assert nll(logits, labels, kind="logits") == pytest.approx(expected, rel=1e-6)
    probs = logits.softmax(1)
    by_hand = -sum(math.log(probs[i, labels[i]]) for i in range(500)) / 500
    assert nll(probs, labels) == pytest.approx(by_hand, rel=1e-5)  # auto: probabilities
    assert nll(probs, labels, kind="probs") == pytest.approx(by_hand, rel=1e-5)
    # a zero probability on the true class costs -log(tiny), finite
    assert nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1])) == pytest.approx(87.3365, rel=1e-4)


def test_multidimensional_outputs_equal_flattened() -> None:
    logits = torch.randn(4, 3, 7)  # (batch, classes, positions), like cross_entropy
    labels = torch.randint(3, (4, 7))
    flat, flat_labels = logits.permute(0, 2, 1).reshape(-1, 3), labels.reshape(-1)
    for fn in (nll, ece, brier):
        assert fn(logits, labels) == pytest.approx(fn(flat, flat_labels), rel=1e-6)
    assert accuracy(logits, labels) == pytest.approx(accuracy(flat, flat_labels))


# ------------------------------------------------------------------ ece and reliability
def test_ece_zero_when_perfectly_calibrated() -> None:
    # 80% confident and right 4 times in 5; 60% confident and right 3 times in 5
    probs = torch.tensor([[0.8, 0.2]] * 5 + [[0.4, 0.6]] * 5)
    labels = torch.tensor([0, 0, 0, 0, 1] + [1, 1, 1, 0, 0])
    assert ece(probs, labels) == pytest.approx(0.0, abs=1e-7)


def test_ece_hand_computed() -> None:
    # bins of width 0.5 (bins=2): confidences 0.9 and 0.7 -> bin 1, 0.5 -> bin 0 (right-closed)
    probs = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.5, 0.5]])
    labels = torch.tensor([0, 0, 0])
    # bin 0: 1 sample, conf 0.5, acc 1; bin 1: 2 samples, conf 0.8, acc 0.5
    expected = (1 / 3) * abs(1 - 0.5) + (2 / 3) * abs(0.5 - 0.8)
    assert ece(probs, labels, bins=2) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("bins", [1, 5, 10, 15])
def test_ece_and_reliability_data_match_the_reference_loop(bins: int) -> None:
    logits, labels = random_data(300)
    probs = logits.softmax(1)
    # put some confidences exactly on bin edges (0.2, 0.4, ..., 1.0 as float32)
    probs[:5] = torch.tensor([[0.2] * 5, [0.4, 0.15, 0.15, 0.15, 0.15], [1.0, 0, 0, 0, 0]] * 2)[:5]
    expected, table = ece_reference(probs, labels, bins)
    assert ece(probs, labels, bins=bins) == pytest.approx(expected, abs=1e-6)
    assert ece(logits, labels, bins=bins) == pytest.approx(
        ece_reference(logits.softmax(1), labels, bins)[0], abs=1e-6
    )
    data = reliability_diagram_data(probs, labels, bins=bins)
    assert data["count"] == [row[0] for row in table]
    assert data["edges"] == pytest.approx([b / bins for b in range(bins + 1)])
    for got, ref in (
        (data["confidence"], [r[1] for r in table]),
        (data["accuracy"], [r[2] for r in table]),
    ):
        assert [g is None for g in got] == [r is None for r in ref]
        assert [g for g in got if g is not None] == pytest.approx([r for r in ref if r is not None])
    assert data["ece"] == pytest.approx(expected, abs=1e-6)


def test_reliability_data_is_json_ready() -> None:
    import json

    logits, labels = random_data(50)
    data = reliability_diagram_data(logits, labels, bins=20)  # some bins empty
    assert None in data["confidence"]
    assert json.loads(json.dumps(data)) == data


# ------------------------------------------------------------------ brier
def test_brier_matches_one_hot_formula() -> None:
    logits, labels = random_data()
    probs = logits.softmax(1)
    by_hand = ((probs - F.one_hot(labels, 5).float()) ** 2).sum(1).mean().item()
    assert brier(probs, labels) == pytest.approx(by_hand, rel=1e-5)
    assert brier(logits, labels) == pytest.approx(by_hand, rel=1e-5)
    assert brier(torch.tensor([[0.0, 1.0]]), torch.tensor([0])) == pytest.approx(2.0)
    assert brier(torch.tensor([[1.0, 0.0]]), torch.tensor([0])) == pytest.approx(0.0)


# ------------------------------------------------------------------ kind detection and errors
def test_auto_kind_treats_logits_as_logits() -> None:
    # non-negative logits whose rows do not sum to 1 are logits, not probabilities
    logits = torch.tensor([[0.9, 0.5], [0.2, 0.6]])
    labels = torch.tensor([0, 1])
    assert nll(logits, labels) == pytest.approx(F.cross_entropy(logits, labels).item())


def test_metric_errors_name_the_argument() -> None:
    logits, labels = random_data(10)
    with pytest.raises(ValueError, match="kind must be one of"):
        nll(logits, labels, kind="log_probs")
    with pytest.raises(ValueError, match="given as kind='probs' but are not probabilities"):
        ece(logits, labels, kind="probs")
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 5\)"):
        nll(logits, labels + 5)
    with pytest.raises(ValueError, match="labels must be integer class indices"):
        brier(logits, labels.float())
    with pytest.raises(ValueError, match="labels must be integer class indices of shape"):
        ece(logits, labels[:3])
    with pytest.raises(ValueError, match="bins must be a positive int"):
        ece(logits, labels, bins=0)
    with pytest.raises(ValueError, match="outputs must be float logits or probabilities"):
        nll(logits[:, 0], labels)
    with pytest.raises(TypeError, match="must be Tensors"):
        brier(logits.tolist(), labels)
    with pytest.raises(ValueError, match="at least one sample"):
        nll(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


# ------------------------------------------------------------------ diversity
def test_disagreement_matches_pairwise_loop() -> None:
    members = torch.randn(5, 200, 4)
    preds = members.argmax(2)
    pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)]
    expected = sum((preds[i] != preds[j]).float().mean().item() for i, j in pairs) / len(pairs)
    assert disagreement(members) == pytest.approx(expected, rel=1e-6)
    assert disagreement(list(members.softmax(2))) == pytest.approx(expected, rel=1e-6)
    assert disagreement(members[[0, 0, 0]]) == 0.0


def test_mean_pairwise_kl_matches_pairwise_loop() -> None:
    logits = torch.randn(4, 50, 6)
    log_p = logits.log_softmax(2).double()
    kls = [
        F.kl_div(log_p[j], log_p[i], log_target=True, reduction="sum").item() / 50
        for i in range(4)
        for j in range(4)
        if i != j
    ]
    expected = sum(kls) / len(kls)
    assert mean_pairwise_kl(logits) == pytest.approx(expected, rel=1e-6)
    assert mean_pairwise_kl(logits.softmax(2)) == pytest.approx(expected, rel=1e-4)
    assert mean_pairwise_kl(logits[[1, 1]]) == pytest.approx(0.0, abs=1e-12)


def test_diversity_errors() -> None:
    with pytest.raises(ValueError, match="at least 2 members"):
        disagreement(torch.randn(1, 5, 3))
    with pytest.raises(ValueError, match="at least 2 members"):
        mean_pairwise_kl(torch.randn(5, 3))
    with pytest.raises(TypeError, match="member_outputs must be a Tensor"):
        disagreement([torch.randn(5, 3), torch.randn(4, 3)])
    with pytest.raises(ValueError, match="given as kind='probs'"):
        mean_pairwise_kl(torch.randn(2, 5, 3), kind="probs")


# ------------------------------------------------------------------ regression
def regression_data(n: int = 200, columns: int | None = None):
    shape = (n,) if columns is None else (n, columns)
    targets = torch.randn(shape) * 2 + 1
    outputs = targets + torch.randn(shape) * 0.7 + 0.1
    return outputs, targets


@pytest.mark.parametrize("columns", [None, 1, 3])
def test_regression_metrics_match_sklearn(columns) -> None:
    sk = pytest.importorskip("sklearn.metrics")
    outputs, targets = regression_data(columns=columns)
    o, t = outputs.double().numpy(), targets.double().numpy()
    assert mse(outputs, targets) == pytest.approx(sk.mean_squared_error(t, o), rel=1e-12)
    assert mae(outputs, targets) == pytest.approx(sk.mean_absolute_error(t, o), rel=1e-12)
    assert r2(outputs, targets) == pytest.approx(sk.r2_score(t, o), rel=1e-12)
    # float64 inputs, and integer targets, work too
    assert r2(outputs.double(), targets.double()) == pytest.approx(sk.r2_score(t, o), rel=1e-12)
    rounded = targets.round().long()
    assert mae(outputs, rounded) == pytest.approx(
        sk.mean_absolute_error(rounded.numpy(), o), rel=1e-12
    )


def test_r2_averages_columns_uniformly_with_sklearns_constant_column_rule() -> None:
    sk = pytest.importorskip("sklearn.metrics")
    outputs, targets = regression_data(columns=3)
    targets[:, 1] = 2.0  # constant column, predicted wrongly: scores 0
    targets[:, 2] = -1.0  # constant column, predicted exactly: scores 1
    outputs[:, 2] = -1.0
    expected = sk.r2_score(targets.double().numpy(), outputs.double().numpy())
    assert r2(outputs, targets) == pytest.approx(expected, rel=1e-9)
    col0 = sk.r2_score(targets[:, 0].double().numpy(), outputs[:, 0].double().numpy())
    assert r2(outputs, targets) == pytest.approx((col0 + 0.0 + 1.0) / 3, rel=1e-9)
    assert r2(torch.zeros(3), torch.zeros(3)) == 1.0
    assert math.isnan(r2(torch.ones(1), torch.zeros(1)))  # undefined with one sample


def test_column_outputs_against_flat_targets_are_squeezed_never_broadcast() -> None:
    sk = pytest.importorskip("sklearn.metrics")
    outputs, targets = regression_data()
    column = outputs.unsqueeze(1)  # (N, 1) against (N,): broadcasting would give (N, N)
    broadcast_mse = float(((column - targets) ** 2).mean())
    for fn, ref in ((mse, sk.mean_squared_error), (mae, sk.mean_absolute_error),
                    (r2, sk.r2_score)):  # fmt: skip
        expected = ref(targets.double().numpy(), outputs.double().numpy())
        assert fn(column, targets) == pytest.approx(expected, rel=1e-9)
        assert fn(outputs, targets.unsqueeze(1)) == pytest.approx(expected, rel=1e-9)
    assert mse(column, targets) != pytest.approx(broadcast_mse, rel=1e-3)


def test_regression_metric_errors_name_both_shapes() -> None:
    for fn in (mse, mae, r2):
        with pytest.raises(ValueError, match=r"outputs \(5, 2\) and targets \(5,\)"):
            fn(torch.zeros(5, 2), torch.zeros(5))
        with pytest.raises(ValueError, match=r"outputs \(4,\) and targets \(5,\)"):
            fn(torch.zeros(4), torch.zeros(5))
        with pytest.raises(ValueError, match="at least one value"):
            fn(torch.zeros(0), torch.zeros(0))
        with pytest.raises(TypeError, match="must be Tensors"):
            fn([1.0, 2.0], torch.zeros(2))
