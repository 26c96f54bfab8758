"""Evaluation passes through the step hook, with regression metrics, against references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.training.helpers import DictDataset
from trainwell import EMA, SWA, StepOutput, fit, mae, mse, r2
from trainwell.training.evaluation import evaluate, predict


def regression(n=70, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = x @ torch.randn(5, 1, generator=g) + 0.3 * torch.randn(n, 1, generator=g)
    return x, y


def dict_step(model, batch, loss_fn):
    outputs = model(batch["x"])
    return outputs.sum() * 0, outputs, batch["y"], len(batch["y"])  # a plain tuple of four


def test_evaluate_with_regression_metrics_matches_sklearn_on_the_whole_set():
    sk = pytest.importorskip("sklearn.metrics")
    x, y = regression()
    torch.manual_seed(0)
    model = nn.Linear(5, 1)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)  # a partial last batch
    got = evaluate(model, loader, F.mse_loss, metrics={"mse": mse, "mae": mae, "r2": r2})
    assert set(got) == {"val_loss", "val_mse", "val_mae", "val_r2"}
    with torch.no_grad():
        pred = model(x)
    p, t = pred.double().numpy(), y.double().numpy()
    assert got["val_mse"] == pytest.approx(sk.mean_squared_error(t, p), rel=1e-6)
    assert got["val_mae"] == pytest.approx(sk.mean_absolute_error(t, p), rel=1e-6)
    assert got["val_r2"] == pytest.approx(sk.r2_score(t, p), rel=1e-6)
    # the loss is the item-weighted mean of batch means: the full-set mean loss
    assert got["val_loss"] == pytest.approx(F.mse_loss(pred, y).item(), rel=1e-6)


def test_default_evaluate_keeps_loss_and_accuracy_of_the_concatenated_outputs():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 4, generator=g), torch.randint(3, (50,), generator=g)
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    got = evaluate(model, DataLoader(TensorDataset(x, y), batch_size=16), prefix="test_")
    with torch.no_grad():
        logits = model(x)
    assert got["test_loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert got["test_acc"] == (logits.argmax(1) == y).float().mean().item()
    only_loss = evaluate(model, DataLoader(TensorDataset(x, y), batch_size=16), metrics={})
    assert set(only_loss) == {"val_loss"}


def test_predict_and_evaluate_route_dict_batches_through_the_step():
    x, y = regression()
    model = nn.Linear(5, 1)
    loader = DataLoader(DictDataset(x, y), batch_size=16)
    outputs, targets = predict(model, loader, step=dict_step)
    with torch.no_grad():
        assert torch.equal(outputs, model(x)) and torch.equal(targets, y)
    got = evaluate(model, loader, step=dict_step, metrics={"mse": mse})
    assert got["val_loss"] == 0.0
    assert got["val_mse"] == pytest.approx(F.mse_loss(outputs, y).item(), rel=1e-6)
    with pytest.raises(TypeError, match=r"fit\(step=\.\.\.\)"):
        predict(model, loader)  # the default step cannot unpack a dict


def test_predict_restores_modes_and_needs_no_loss():
    model = nn.Sequential(nn.Linear(5, 1), nn.Dropout(0.5))
    model.train()
    x, y = regression(8)
    a, _ = predict(model, [(x, y)])
    b, _ = predict(model, [(x, y)])
    assert torch.equal(a, b) and model.training and model[1].training  # eval mode inside


def test_token_level_val_loss_is_weighted_by_the_steps_n_items():
    torch.manual_seed(0)
    emb = nn.Embedding(7, 7)
    batches = []
    for rows, real in ((2, 3), (1, 5), (3, 1)):
        tokens = torch.randint(7, (rows, 4))
        labels = torch.randint(7, (rows * 4,))
        labels[real:] = -100
        batches.append((tokens, labels.reshape(rows, 4)))

    def step(model, batch, loss_fn):
        tokens, labels = batch
        logits = model(tokens).flatten(0, 1)
        loss = F.cross_entropy(logits, labels.flatten(), ignore_index=-100)
        return StepOutput(loss, logits, labels.flatten(), (labels != -100).sum())

    got = evaluate(emb, batches, step=step, metrics={})
    with torch.no_grad():
        logits = torch.cat([emb(t).flatten(0, 1) for t, _ in batches])
    labels = torch.cat([y.flatten() for _, y in batches])
    expected = F.cross_entropy(logits, labels, ignore_index=-100).item()
    assert got["val_loss"] == pytest.approx(expected, rel=1e-6)


def test_fit_passes_metrics_and_step_to_live_ema_and_swa_validation():
    x, y = regression()
    train = DataLoader(DictDataset(x, y), batch_size=16)

    def step(model, batch, loss_fn):
        outputs = model(batch["x"])
        return StepOutput(loss_fn(outputs, batch["y"]), outputs, batch["y"], len(batch["y"]))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ema, swa = EMA(model, 0.9), SWA(model, start=1)
    result = fit(model, train, train, opt, F.mse_loss, epochs=3, step=step, ema=ema, swa=swa,
                 metrics={"mae": mae, "r2": r2})  # fmt: skip
    row = result.history[-1]
    for prefix in ("val_", "ema_val_", "swa_val_"):
        assert {prefix + "loss", prefix + "mae", prefix + "r2"} <= set(row)
    assert "val_acc" not in row
    # SWA's BatchNorm recalibration ran the dict batches through the same step
    assert swa.module[1].num_batches_tracked.item() == len(train)
    live = evaluate(model, train, F.mse_loss, step=step, metrics={"mae": mae})
    assert live["val_mae"] == pytest.approx(row["val_mae"], rel=1e-6)


def test_evaluate_rejects_bad_metrics_and_empty_loaders():
    model = nn.Linear(5, 1)
    with pytest.raises(TypeError, match=r"metrics must be a mapping \{name: fn"):
        evaluate(model, [regression(4)], F.mse_loss, metrics=[mse])
    with pytest.raises(ValueError, match="no batches"):
        evaluate(model, [], F.mse_loss)
