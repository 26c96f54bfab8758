"""Tests for trainwell.regularization.dropout: against torch's own dropout or a hand computation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainwell.regularization.dropout import (
    Dropout,
    DropoutSchedule,
    DropPath,
    dropout_modules,
    mc_predict,
    scheduled_rate,
    set_dropout,
)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.drop = Dropout(0.1)
        self.path = DropPath(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.path(self.drop(torch.relu(self.fc(x))))


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6),
        nn.BatchNorm1d(6),
        nn.Dropout(0.1),
        Block(),
        Block(),
        nn.Dropout1d(0.1),
        nn.Linear(6, 3),
    )


def test_dropout_obeys_model_eval_and_train() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(Dropout(0.5)))  # nested: flag must propagate
    x = torch.randn(64, 32)
    model.eval()
    assert torch.equal(model(x), x)
    model.train()
    assert not torch.equal(model(x), x)
    model.eval()
    assert torch.equal(model(x), x)


def test_dropout_matches_torch_and_keeps_expectation() -> None:
    x = torch.randn(50, 40)
    torch.manual_seed(3)
    ours = Dropout(0.3)(x)
    torch.manual_seed(3)
    theirs = nn.Dropout(0.3)(x)
    assert torch.equal(ours, theirs)
    torch.manual_seed(4)
    ones = torch.ones(200_000)
    y = Dropout(0.3)(ones)
    kept = (y != 0).float()
    # Bernoulli(0.7) over n draws: std of the mean = sqrt(0.7*0.3/n); allow 5 std.
    tol = 5 * math.sqrt(0.7 * 0.3 / ones.numel())
    assert abs(kept.mean().item() - 0.7) < tol
    assert abs(y.mean().item() - 1.0) < tol / 0.7
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 1 / 0.7))


def test_droppath_is_per_sample_and_unbiased() -> None:
    torch.manual_seed(5)
    dp = DropPath(0.25)
    x = torch.randn(20_000, 3, 2)
    y = dp(x)
    kept = (y != 0).flatten(1)
    assert bool((kept.all(1) | ~kept.any(1)).all())  # whole sample kept or dropped
    torch.testing.assert_close(y[kept.all(1)], x[kept.all(1)] / 0.75)
    tol = 5 * math.sqrt(0.75 * 0.25 / x.shape[0])
    assert abs(kept.all(1).float().mean().item() - 0.75) < tol
    dp.eval()
    assert torch.equal(dp(x), x)


def test_rate_validation() -> None:
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
            Dropout(bad)
    with pytest.raises(TypeError, match="p must be a number"):
        DropPath("0.1")  # type: ignore[arg-type]
    d = Dropout(0.1)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        d.p = 1.0
    assert torch.equal(Dropout(0.0)(torch.ones(3)), torch.ones(3))


def test_set_dropout_globally_and_by_pattern() -> None:
    model = make_model()
    names = list(dropout_modules(model))
    assert names == ["2", "3.drop", "3.path", "4.drop", "4.path", "5"]
    assert set_dropout(model, 0.2) == dict.fromkeys(names, 0.2)
    assert all(m.p == 0.2 for m in dropout_modules(model).values())
    got = set_dropout(model, {"*.path": 0.3, "4.*": 0.05})  # later patterns override
    assert got == {"3.path": 0.3, "4.drop": 0.05, "4.path": 0.05}
    rates = {n: m.p for n, m in dropout_modules(model).items()}
    assert rates == {
        "2": 0.2,
        "3.drop": 0.2,
        "3.path": 0.3,
        "4.drop": 0.05,
        "4.path": 0.05,
        "5": 0.2,
    }
    torch.manual_seed(1)
    x = torch.randn(30, 6, 5)
    torch.manual_seed(2)
    ref = nn.Dropout1d(0.2)(x)
    torch.manual_seed(2)
    assert torch.equal(model[5](x), ref)  # the torch module really uses the new rate


def test_set_dropout_errors() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="pattern 'decoder.\\*' matches no dropout module"):
        set_dropout(model, {"decoder.*": 0.1})
    with pytest.raises(ValueError, match="pattern '0' matches no dropout module"):
        set_dropout(model, {"0": 0.1})  # a Linear, not a dropout module
    with pytest.raises(ValueError, match=r"rate for '\*' must be in \[0, 1\)"):
        set_dropout(model, {"*": 1.0})
    with pytest.raises(ValueError, match="has no dropout module"):
        set_dropout(nn.Linear(2, 2), 0.1)


def test_scheduled_rate_values() -> None:
    total = 10
    assert [scheduled_rate("early", t, p=0.2, total=total, at=0.3) for t in range(5)] == [
        0.2,
        0.2,
        0.2,
        0.0,
        0.0,
    ]
    assert [scheduled_rate("late", t, p=0.2, total=total, at=3) for t in (0, 2, 3, 10)] == [
        0.0,
        0.0,
        0.2,
        0.2,
    ]
    ramp = [scheduled_rate("linear", t, p=0.0, p_start=0.4, total=total, at=0.5) for t in range(8)]
    expected = [0.4 * (1 - min(t / 5, 1.0)) for t in range(8)]
    assert ramp == pytest.approx(expected)
    assert scheduled_rate("constant", 7, p=0.15, total=total) == 0.15
    assert scheduled_rate("early", 4, p=0.1, total=total) == 0.1  # default at=0.5 -> 5
    assert scheduled_rate("early", 5, p=0.1, total=total) == 0.0
    with pytest.raises(ValueError, match="kind must be one of"):
        scheduled_rate("cosine", 0, p=0.1, total=total)


def test_schedule_drives_modules_and_round_trips() -> None:
    model = make_model()
    sched = DropoutSchedule(model, "late", p=0.3, total=6, at=0.5, unit="epoch", targets="*.drop")
    assert sched.unit == "epoch" and sched.rate == 0.0
    assert model[3].drop.p == 0.0 and model[2].p == 0.1  # applied at construction, targets only
    seen = [sched.step() for _ in range(4)]
    assert seen == [0.0, 0.0, 0.3, 0.3] and model[4].drop.p == 0.3
    state = sched.state_dict()
    assert all(isinstance(v, (int, float, str, list, type(None))) for v in state.values())
    fresh_model = make_model()
    fresh = DropoutSchedule(
        fresh_model, "late", p=0.3, total=6, at=0.5, unit="epoch", targets="*.drop"
    )
    fresh.load_state_dict(state)
    assert fresh.rate == sched.rate and fresh_model[3].drop.p == 0.3
    for _ in range(3):
        assert fresh.step() == sched.step()


def test_schedule_linear_per_step_and_errors() -> None:
    model = make_model()
    sched = DropoutSchedule(model, "linear", p=0.2, total=4)
    assert sched.unit == "step"
    rates = [sched.rate] + [sched.step() for _ in range(5)]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2, 0.2])
    assert all(m.p == pytest.approx(0.2) for m in dropout_modules(model).values())
    with pytest.raises(ValueError, match="kind must be one of"):
        DropoutSchedule(model, "cosine", total=4)
    with pytest.raises(ValueError, match="unit must be 'step' or 'epoch'"):
        DropoutSchedule(model, "early", total=4, unit="batch")
    with pytest.raises(ValueError, match="total must be a positive int"):
        DropoutSchedule(model, "early", total=0)
    with pytest.raises(ValueError, match=r"at as a float is a fraction of total in \[0, 1\]"):
        DropoutSchedule(model, "early", total=4, at=1.5)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        DropoutSchedule(model, "early", p=1.0, total=4)


def test_mc_predict_matches_manual_loop_and_leaves_batchnorm_alone() -> None:
    model = make_model()
    model.train()
    model(torch.randn(16, 4))  # non-trivial running statistics
    model[4].eval()  # a submodule already in eval: must stay so
    bn = model[1]
    stats = {k: v.clone() for k, v in bn.state_dict().items()}
    flags = {n: m.training for n, m in model.named_modules()}
    x = torch.randn(7, 4)
    torch.manual_seed(11)
    probs, entropy = mc_predict(model, x, samples=5)
    assert {k: torch.equal(v, stats[k]) for k, v in bn.state_dict().items()} == dict.fromkeys(
        stats, True
    )
    assert {n: m.training for n, m in model.named_modules()} == flags
    # Reference: the hand-written MC-dropout loop.
    model.eval()
    for m in dropout_modules(model).values():
        m.train()
    torch.manual_seed(11)
    with torch.no_grad():
        ref = torch.stack([torch.softmax(model(x), -1) for _ in range(5)]).mean(0)
    torch.testing.assert_close(probs, ref)
    torch.testing.assert_close(entropy, -(ref * ref.log()).sum(-1))
    torch.testing.assert_close(probs.sum(-1), torch.ones(7))
    set_dropout(model, 0.0)  # no dropout -> deterministic -> entropy of a single softmax
    model.eval()
    p0, _ = mc_predict(model, x, samples=3)
    torch.testing.assert_close(p0, torch.softmax(model(x), -1).detach())


def test_mc_predict_restores_modes_on_exception_and_validates() -> None:
    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)
            self.drop = Dropout(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    model = Boom().train()
    model.bn.eval()
    with pytest.raises(RuntimeError, match="boom"):
        mc_predict(model, torch.randn(2, 3))
    assert model.training and model.drop.training and not model.bn.training
    with pytest.raises(ValueError, match="samples must be a positive int"):
        mc_predict(model, torch.randn(2, 3), samples=0)
    with pytest.raises(ValueError, match="has none"):
        mc_predict(nn.Linear(3, 3), torch.randn(2, 3))
