"""Temperature scaling: the NLL optimum (grid and LBFGS references), round trips, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainwell.ensembles.calibration import TemperatureScaler, fit_temperature
from trainwell.ensembles.ensemble import Ensemble
from trainwell.metrics import accuracy, ece, nll


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def calibrated(n: int = 4000, classes: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels drawn from their softmax: calibrated at T = 1."""
    z = torch.randn(n, classes) * 2
    return z, torch.distributions.Categorical(logits=z).sample()


def nll_at(z: torch.Tensor, y: torch.Tensor, t: float) -> float:
    return F.cross_entropy(z.double() / t, y).item()


def test_lowers_nll_and_ece_of_over_confident_logits_and_keeps_accuracy() -> None:
    z, y = calibrated()
    over = 3 * z
    scaler = TemperatureScaler()
    t = scaler.fit(over, y)
    assert 2.7 < t < 3.3
    assert nll(scaler(over), y) < nll(over, y) - 0.1
    assert ece(scaler(over), y) < ece(over, y)
    assert accuracy(scaler(over), y) == accuracy(over, y)
    assert fit_temperature(z / 2, y) == pytest.approx(0.5, rel=0.1)  # under-confident


def test_fitted_temperature_is_the_nll_minimum() -> None:
    z, y = calibrated(1000)
    logits = 2.5 * z + 0.3 * torch.randn_like(z)
    t = fit_temperature(logits, y)
    grid = torch.logspace(-1, 1.5, 2001).tolist()
    best_grid = min(nll_at(logits, y, g) for g in grid)
    assert nll_at(logits, y, t) <= best_grid + 1e-12
    # LBFGS on log T as an independent reference
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, tolerance_grad=1e-12)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits.double() / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    assert t == pytest.approx(log_t.exp().item(), rel=1e-4)


def test_bounds_clip_and_degenerate_logits() -> None:
    z, _ = calibrated(500)
    wrong = z.argmin(1)  # anti-correlated: the NLL keeps falling as T grows
    assert fit_temperature(z, wrong, bounds=(0.1, 10.0)) == 10.0
    right = z.argmax(1)  # always right: the NLL keeps falling as T shrinks
    assert fit_temperature(z, right, bounds=(0.1, 10.0)) == 0.1
    constant = torch.zeros(10, 3)  # no information: any T, and no crash
    assert math.isfinite(fit_temperature(constant, torch.zeros(10, dtype=torch.long)))


def test_state_dict_round_trip_and_call() -> None:
    z, y = calibrated(500)
    a = TemperatureScaler()
    a.fit(2 * z, y)
    b = TemperatureScaler()
    b.load_state_dict(a.state_dict())
    assert torch.equal(b(z), a(z))
    torch.testing.assert_close(a(z), z / a.temperature)
    assert a(z.half()).dtype == torch.float16
    assert isinstance(a.state_dict()["temperature"], torch.Tensor)


def test_works_for_an_ensemble_on_combined_logits() -> None:
    x = torch.randn(600, 5)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    members = []
    for _ in range(3):
        m = nn.Linear(5, 3)
        with torch.no_grad():
            m.weight.mul_(10)  # confident, mostly wrong members
        members.append(m)
    ens = Ensemble(members)
    logits = ens.predict_logits(x)
    scaler = TemperatureScaler()
    scaler.fit(logits, y)
    assert nll(scaler(logits), y) < nll(ens.predict(x), y)


def test_errors_name_the_argument() -> None:
    z, y = calibrated(20)
    with pytest.raises(ValueError, match="look like probabilities"):
        fit_temperature(z.softmax(1), y)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 6\)"):
        fit_temperature(z, y + 6)
    with pytest.raises(ValueError, match="labels must be integer class indices"):
        fit_temperature(z, y.float())
    with pytest.raises(ValueError, match="logits must be finite"):
        fit_temperature(torch.full((2, 3), math.nan), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="0 < low < high"):
        fit_temperature(z, y, bounds=(2.0, 1.0))
    with pytest.raises(TypeError, match="bounds must be two numbers"):
        TemperatureScaler(bounds=5)
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        TemperatureScaler(temperature=0.0)
    with pytest.raises(TypeError, match="temperature must be a positive number"):
        TemperatureScaler(temperature="1")
    with pytest.raises(ValueError, match="logits must be non-empty float logits"):
        fit_temperature(torch.zeros(5, dtype=torch.long), y[:5])
