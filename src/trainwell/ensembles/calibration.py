"""Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017).

One scalar ``T > 0`` divides the logits, ``softmax(z / T)``; it is fitted on held-out
logits by minimizing the NLL. It changes confidence, never the argmax (accuracy stays).
For an ensemble, fit it on the combined logits (``Ensemble.predict_logits``): scaling after
combining is what Ashukha et al. (ICLR 2020) recommend; it works the same for one member.

With ``beta = 1 / T`` the NLL ``f(beta) = mean_i [logsumexp(beta z_i) - beta z_i[y_i]]`` is
convex in ``beta``, with ``f'(beta) = mean_i (E_p[z_i] - z_i[y_i])`` and
``f''(beta) = mean_i Var_p(z_i) >= 0`` under ``p = softmax(beta z_i)``; :func:`fit_temperature`
finds the root of ``f'`` in the bounds by safeguarded Newton steps (bisection when a step
leaves the bracket), in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["TemperatureScaler", "fit_temperature"]


def _check_bounds(bounds: tuple[float, float]) -> tuple[float, float]:
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise TypeError(f"bounds must be two numbers (low, high); got {bounds!r}.") from None
    if not (0 < low < high < math.inf):
        raise ValueError(f"bounds must satisfy 0 < low < high < inf; got {bounds!r}.")
    return low, high


def _check_data(logits: object, labels: object) -> tuple[Tensor, Tensor]:
    if not isinstance(logits, Tensor) or not isinstance(labels, Tensor):
        raise TypeError("logits and labels must be Tensors.")
    if logits.dim() < 2 or not logits.is_floating_point() or logits.numel() == 0:
        raise ValueError(
            "logits must be non-empty float logits of shape (batch, classes, ...); "
            f"got {logits.dtype} of shape {tuple(logits.shape)}."
        )
    shape = (logits.shape[0], *logits.shape[2:])
    if labels.is_floating_point() or labels.is_complex() or tuple(labels.shape) != shape:
        raise ValueError(
            f"labels must be integer class indices of shape {shape} (logits without the class "
            f"dim); got {labels.dtype} of shape {tuple(labels.shape)}."
        )
    z = logits.detach().movedim(1, -1).reshape(-1, logits.shape[1]).double()
    y = labels.reshape(-1).to(z.device)
    classes = z.shape[1]
    flags = torch.stack(
        [
            (y.amin() >= 0) & (y.amax() < classes),
            torch.isfinite(z).all(),
            (z.amin() >= 0) & (z.amax() <= 1) & ((z.sum(1) - 1).abs().amax() <= 1e-3),
        ]
    ).tolist()
    if not flags[0]:
        raise ValueError(f"labels must be class indices in [0, {classes}).")
    if not flags[1]:
        raise ValueError("logits must be finite (no NaN or Inf).")
    if flags[2] and classes > 1:
        raise ValueError(
            "logits look like probabilities (rows in [0, 1] summing to 1); temperature "
            "scaling acts on logits: pass log-probabilities (probs.log(), or "
            "Ensemble.predict_logits for an ensemble)."
        )
    return z, y


def _derivatives(z: Tensor, y: Tensor, beta: float) -> tuple[float, float]:
    """``f'(beta)`` and ``f''(beta)`` of the mean NLL of ``softmax(beta z)``."""
    p = torch.softmax(beta * z, dim=1)
    mean_z = (p * z).sum(1)
    second = (p * z * z).sum(1) - mean_z * mean_z
    first = mean_z - z.gather(1, y.unsqueeze(1)).squeeze(1)
    return tuple(torch.stack([first.mean(), second.clamp_min(0).mean()]).tolist())  # type: ignore[return-value]


def fit_temperature(
    logits: Tensor, labels: Tensor, bounds: tuple[float, float] = (0.01, 100.0)
) -> float:
    """The temperature in ``bounds`` that minimizes the NLL of ``softmax(logits / T)``.

    Args:
        logits: held-out logits ``(batch, classes, ...)`` (log-probabilities work too; not
            probabilities, which are refused).
        labels: integer class indices ``(batch, ...)``.
        bounds: ``(low, high)`` for ``T``; the optimum is clipped to them.

    Example:
        >>> torch.manual_seed(0) and None
        >>> z = torch.randn(2000, 5) * 2
        >>> y = torch.distributions.Categorical(logits=z).sample()  # calibrated at T = 1
        >>> 2.8 < fit_temperature(3 * z, y) < 3.2  # over-confident logits: T is about 3
        True
    """
    low, high = _check_bounds(bounds)
    z, y = _check_data(logits, labels)
    lo, hi = 1.0 / high, 1.0 / low  # bracket for beta = 1 / T
    if _derivatives(z, y, lo)[0] >= 0:  # NLL increasing over the whole bracket
        return high
    if _derivatives(z, y, hi)[0] <= 0:  # decreasing over the whole bracket
        return low
    beta = min(max(1.0, lo), hi)
    for _ in range(100):
        grad, curvature = _derivatives(z, y, beta)
        if grad == 0:
            break
        if grad > 0:
            hi = beta
        else:
            lo = beta
        step = beta - grad / curvature if curvature > 0 else math.nan
        new = step if lo < step < hi else 0.5 * (lo + hi)
        if abs(new - beta) <= 1e-12 * beta or hi - lo <= 1e-12 * hi:
            beta = new
            break
        beta = new
    return 1.0 / beta


class TemperatureScaler(nn.Module):
    """Divides logits by one fitted temperature: ``scaler(logits) = logits / T``.

    ``T`` lives in the buffer ``temperature`` (1.0 until fitted), so ``state_dict()`` /
    ``load_state_dict()`` round-trip it and ``.to(device)`` moves it.

    Args:
        temperature: the initial temperature (> 0).
        bounds: the search range of :meth:`fit`.

    Example:
        >>> torch.manual_seed(0) and None
        >>> z = torch.randn(1000, 4)
        >>> y = torch.distributions.Categorical(logits=z).sample()
        >>> scaler = TemperatureScaler()
        >>> t = scaler.fit(4 * z, y)  # about 4
        >>> torch.allclose(scaler(4 * z), 4 * z / t)
        True
    """

    temperature: Tensor

    def __init__(self, temperature: float = 1.0, bounds: tuple[float, float] = (0.01, 100.0)):
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, int | float):
            raise TypeError(f"temperature must be a positive number; got {temperature!r}.")
        if not (0 < temperature < math.inf):
            raise ValueError(f"temperature must be a positive number; got {temperature!r}.")
        self.bounds = _check_bounds(bounds)
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def fit(self, logits: Tensor, labels: Tensor) -> float:
        """Fit ``T`` on held-out logits and labels (see :func:`fit_temperature`); returns it."""
        t = fit_temperature(logits, labels, self.bounds)
        self.temperature.fill_(t)
        return t

    def forward(self, logits: Tensor) -> Tensor:
        """``logits / T`` (any shape; the dtype of ``logits`` is kept)."""
        return logits / self.temperature.to(logits.dtype)

    def extra_repr(self) -> str:
        return f"temperature={float(self.temperature):.4g}"
