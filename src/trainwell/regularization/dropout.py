"""Dropout that obeys ``model.eval()``, stochastic depth, per-layer rates, schedules, MC dropout.

* :class:`Dropout` -- inverted dropout (Srivastava et al., JMLR 2014): in training,
  ``y = x * m / (1 - p)`` with ``m ~ Bernoulli(1 - p)``, so ``E[y] = x``; in eval, ``y = x``.
  It reads the module's own ``training`` flag, which ``model.train()`` / ``model.eval()``
  set, never a flag of its own.
* :class:`DropPath` -- stochastic depth (Huang et al., "Deep Networks with Stochastic
  Depth", ECCV 2016): drop a whole residual branch per sample.
* :func:`set_dropout` -- change the rates of existing dropout modules (torch's too), globally
  or per module-name pattern.
* :class:`DropoutSchedule` -- early / late dropout (Liu et al., "Dropout Reduces Underfitting",
  ICML 2023), linear ramps, constant.
* :func:`mc_predict` -- Monte Carlo dropout (Gal & Ghahramani, "Dropout as a Bayesian
  Approximation", ICML 2016): average softmax outputs over dropout masks at test time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainwell.distributed import unwrap

__all__ = [
    "Dropout",
    "DropPath",
    "DropoutSchedule",
    "dropout_modules",
    "mc_predict",
    "scheduled_rate",
    "set_dropout",
]

_KINDS = ("constant", "early", "late", "linear")
_UNITS = ("step", "epoch")


def _check_rate(p: object, name: str = "p") -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1), got {p!r}.")
    if not (0.0 <= p < 1.0):
        raise ValueError(f"{name} must be in [0, 1) (a dropout rate), got {p!r}.")
    return float(p)


class Dropout(nn.Module):
    """Inverted dropout that follows ``model.train()`` / ``model.eval()``.

    Update rule (training): ``y = x * m / (1 - p)``, ``m_i ~ Bernoulli(1 - p)``; eval: ``y = x``.

    Args:
        p: probability of zeroing an element, in [0, 1).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 4), Dropout(0.5))
        >>> x = torch.randn(2, 4)
        >>> _ = model.eval()
        >>> torch.equal(model(x), model[0](x))
        True
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = p

    @property
    def p(self) -> float:
        """The drop probability."""
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        self._p = _check_rate(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self._p == 0.0:
            return x
        return F.dropout(x, self._p, training=True)

    def extra_repr(self) -> str:
        return f"p={self._p}"


class DropPath(Dropout):
    """Stochastic depth: drop the whole residual branch of a sample with probability ``p``.

    Update rule (training): ``y_b = x_b * m_b / (1 - p)``, one ``m_b ~ Bernoulli(1 - p)`` per
    sample ``b`` (dim 0); eval: ``y = x``. Use as ``x + drop_path(branch(x))``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> dp = DropPath(0.5)
        >>> y = dp(torch.ones(6, 3))
        >>> bool((y == y[:, :1]).all())  # a whole sample is kept (scaled by 2) or dropped
        True
        >>> set(y.unique().tolist()) <= {0.0, 2.0}
        True
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self._p == 0.0:
            return x
        keep = 1.0 - self._p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


_DROPOUT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    Dropout,
)


def dropout_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every dropout module (torch's and trainwell's) of ``model`` by name.

    Example:
        >>> dropout_modules(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1), DropPath(0.2)))
        {'1': Dropout(p=0.1, inplace=False), '2': DropPath(p=0.2)}
    """
    return {n: m for n, m in unwrap(model).named_modules() if isinstance(m, _DROPOUT_TYPES)}


def set_dropout(model: nn.Module, p_or_mapping: float | Mapping[str, float]) -> dict[str, float]:
    """Set the rate of existing dropout modules in place.

    Args:
        model: the model (DDP- or compile-wrapped is fine).
        p_or_mapping: a rate in [0, 1) for every dropout module, or a mapping from
            ``fnmatch`` module-name patterns (``"encoder.*"``, ``"head.drop"``) to rates;
            a module matched by several patterns gets the rate of the last one.

    Returns:
        ``{module_name: rate}`` for every module it set.

    Raises:
        ValueError: the model has no dropout module, a pattern matches no dropout module,
            or a rate is outside [0, 1).

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1), nn.Linear(2, 2), Dropout(0.1))
        >>> set_dropout(model, {"*": 0.2, "3": 0.5})
        {'1': 0.2, '3': 0.5}
    """
    modules = dropout_modules(model)
    if not modules:
        raise ValueError(
            "set_dropout: the model has no dropout module (nn.Dropout*, Dropout, DropPath)."
        )
    if isinstance(p_or_mapping, Mapping):
        chosen: dict[str, float] = {}
        for pattern, rate in p_or_mapping.items():
            if not isinstance(pattern, str):
                raise TypeError(f"set_dropout: patterns must be strings, got {pattern!r}.")
            rate = _check_rate(rate, f"rate for {pattern!r}")
            hits = [n for n in modules if fnmatchcase(n, pattern)]
            if not hits:
                raise ValueError(
                    f"set_dropout: pattern {pattern!r} matches no dropout module; "
                    f"dropout modules are: {', '.join(repr(n) for n in modules)}."
                )
            chosen.update(dict.fromkeys(hits, rate))
    else:
        rate = _check_rate(p_or_mapping, "p_or_mapping")
        chosen = dict.fromkeys(modules, rate)
    for name in modules:  # keep the model's module order
        if name in chosen:
            modules[name].p = chosen[name]
    return {n: chosen[n] for n in modules if n in chosen}


def _boundary(at: float | int, total: int) -> int:
    return int(round(at * total)) if isinstance(at, float) else int(at)


def scheduled_rate(
    kind: str,
    t: int,
    *,
    p: float,
    total: int,
    at: float | int | None = None,
    p_start: float = 0.0,
) -> float:
    """The dropout rate after ``t`` units (steps or epochs) of a schedule.

    * ``"constant"``: ``p``.
    * ``"early"``: ``p`` while ``t < T``, then 0 (early dropout, Liu et al. 2023).
    * ``"late"``: 0 while ``t < T``, then ``p`` (late dropout, Liu et al. 2023).
    * ``"linear"``: ``p_start + (p - p_start) * min(t / T, 1)``.

    ``T`` comes from ``at``: a float in [0, 1] is a fraction of ``total`` (rounded), an int
    is a number of units. Default ``at``: 0.5 for early/late, 1.0 for linear.

    Example:
        >>> [scheduled_rate("early", t, p=0.1, total=4, at=0.5) for t in range(5)]
        [0.1, 0.1, 0.0, 0.0, 0.0]
        >>> [scheduled_rate("linear", t, p=0.2, total=4) for t in (0, 2, 4, 9)]
        [0.0, 0.1, 0.2, 0.2]
    """
    if kind == "constant":
        return p
    boundary = _boundary((1.0 if kind == "linear" else 0.5) if at is None else at, total)
    if kind == "early":
        return p if t < boundary else 0.0
    if kind == "late":
        return 0.0 if t < boundary else p
    if kind == "linear":
        frac = 1.0 if boundary <= 0 else min(t / boundary, 1.0)
        return p_start + (p - p_start) * frac
    raise ValueError(f"kind must be one of {', '.join(_KINDS)}, got {kind!r}.")


class DropoutSchedule:
    """Change dropout rates during training (see :func:`scheduled_rate` for the kinds).

    The starting rate is applied at construction; ``.step()`` advances one unit and applies
    the new rate through :func:`set_dropout`. With ``unit="step"`` call it after each
    optimizer step, with ``unit="epoch"`` at the end of each epoch.

    Args:
        model: the model whose dropout modules it drives.
        kind: ``"constant"``, ``"early"``, ``"late"`` or ``"linear"``.
        p: the rate while dropout is on (linear: the rate at the end of the ramp).
        total: the number of units in training (steps or epochs), > 0.
        at: switch point (early/late) or ramp end (linear): fraction in [0, 1] or int units.
        p_start: the linear ramp's starting rate.
        unit: ``"step"`` or ``"epoch"``.
        targets: module-name patterns to drive (default all dropout modules); use one
            schedule per group for different rates in different layers.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), Dropout(0.3))
        >>> sched = DropoutSchedule(model, "early", p=0.3, total=10, at=0.2)
        >>> rates = [sched.rate] + [sched.step() for _ in range(3)]
        >>> rates, model[1].p
        ([0.3, 0.3, 0.0, 0.0], 0.0)
    """

    def __init__(
        self,
        model: nn.Module,
        kind: str = "constant",
        p: float = 0.1,
        *,
        total: int,
        at: float | int | None = None,
        p_start: float = 0.0,
        unit: str = "step",
        targets: str | list[str] | tuple[str, ...] | None = None,
    ) -> None:
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {', '.join(_KINDS)}, got {kind!r}.")
        if unit not in _UNITS:
            raise ValueError(f"unit must be 'step' or 'epoch', got {unit!r}.")
        if isinstance(total, bool) or not isinstance(total, int) or total <= 0:
            raise ValueError(f"total must be a positive int (steps or epochs), got {total!r}.")
        if at is not None:
            if isinstance(at, bool) or not isinstance(at, (int, float)):
                raise TypeError(f"at must be a fraction in [0, 1] or an int, got {at!r}.")
            if isinstance(at, float) and not (0.0 <= at <= 1.0 and math.isfinite(at)):
                raise ValueError(f"at as a float is a fraction of total in [0, 1], got {at!r}.")
            if isinstance(at, int) and not 0 <= at <= total:
                raise ValueError(f"at as an int must be in [0, total={total}], got {at!r}.")
        self.model = model
        self.kind, self.unit, self.total, self.at = kind, unit, total, at
        self.p = _check_rate(p, "p")
        self.p_start = _check_rate(p_start, "p_start")
        self.targets = [targets] if isinstance(targets, str) else list(targets or ["*"])
        self.t = 0
        self._apply()

    @property
    def rate(self) -> float:
        """The rate in force now."""
        return scheduled_rate(
            self.kind, self.t, p=self.p, total=self.total, at=self.at, p_start=self.p_start
        )

    def _apply(self) -> float:
        rate = self.rate
        set_dropout(self.model, dict.fromkeys(self.targets, rate))
        return rate

    def step(self) -> float:
        """Advance one unit, apply and return the new rate."""
        self.t += 1
        return self._apply()

    def state_dict(self) -> dict[str, Any]:
        """Counter and settings (plain numbers and strings)."""
        keys = ("t", "kind", "p", "p_start", "total", "at", "unit", "targets")
        return {k: getattr(self, k) for k in keys} | {"targets": list(self.targets)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the counter and settings, and apply the rate they give."""
        for key in ("t", "kind", "p", "p_start", "total", "at", "unit", "targets"):
            if key in state:
                setattr(self, key, state[key])
        self.targets = list(self.targets)
        self._apply()


@torch.no_grad()
def mc_predict(
    model: nn.Module, x: torch.Tensor, samples: int = 30, *, dim: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte Carlo dropout prediction (Gal & Ghahramani, 2016).

    Runs ``samples`` forward passes with only the dropout modules in training mode (every
    other module, BatchNorm included, in eval), then returns

    * ``mean_probs = (1/S) sum_s softmax(f_s(x), dim)`` and
    * ``entropy = -sum_c mean_probs * log(mean_probs)`` (predictive entropy, per sample).

    Every module's ``training`` flag is restored afterwards, even on an exception.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), Dropout(0.5), nn.Linear(8, 3))
        >>> probs, entropy = mc_predict(model, torch.randn(5, 4), samples=10)
        >>> probs.shape, entropy.shape, model.training
        (torch.Size([5, 3]), torch.Size([5]), True)
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}.")
    drops = list(dropout_modules(model).values())
    if not drops:
        raise ValueError("mc_predict needs a model with dropout modules; this one has none.")
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        for m in drops:
            m.train()
        total = torch.softmax(model(x).float(), dim=dim)
        for _ in range(samples - 1):
            total.add_(torch.softmax(model(x).float(), dim=dim))
        mean = total.div_(samples)
        entropy = -torch.special.xlogy(mean, mean).sum(dim=dim)
        return mean, entropy
    finally:
        for m, flag in flags:
            m.training = flag
