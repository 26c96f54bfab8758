"""Metrics for every validation pass: classification (accuracy, NLL, ECE, Brier,
ensemble diversity) and regression (MSE, MAE, R^2).

Each metric is ``fn(outputs, targets) -> float``, so any of them can go into
``fit(metrics={...})`` / ``evaluate(metrics={...})``.

**Regression** (:func:`mse`, :func:`mae`, :func:`r2`) takes ``outputs`` and ``targets`` of
the same shape; ``(N, 1)`` outputs with ``(N,)`` targets (or the reverse) are accepted and
the trailing 1 is squeezed -- never broadcast, which would silently compare every output
with every target as an ``(N, N)`` matrix. They are computed in float64 (float32 on MPS).
:func:`r2` is the coefficient of determination ``1 - SS_res / SS_tot``; for 2-D targets it
is computed per column and averaged uniformly (scikit-learn's ``r2_score`` default).

**Classification**: every metric takes ``outputs`` of shape ``(batch, classes, ...)``
(classes on dim 1, like ``F.cross_entropy``) and integer ``labels`` of shape
``(batch, ...)``, and returns a Python float. ``kind`` says what ``outputs`` hold:

* ``"logits"`` -- unnormalized scores (log-probabilities are logits too); softmax is applied.
* ``"probs"`` -- probabilities (each row in [0, 1], summing to 1); checked.
* ``"auto"`` (default) -- probabilities when every row is in [0, 1] and sums to 1 (to 1e-3),
  otherwise logits. Real logits practically never pass that test; pass ``kind`` to be exact.

Each call is a handful of vectorized tensor ops (no Python loop over samples) and one
host sync for the checks, plus the one that returns the float.

* :func:`ece` -- expected calibration error (Naeini et al. 2015; Guo et al., "On
  Calibration of Modern Neural Networks", ICML 2017): confidences ``max_c p_c`` in
  ``bins`` equal-width bins ``(k/B, (k+1)/B]`` (a confidence of 0 goes in the first),
  ``ECE = sum_b (n_b / n) |acc_b - conf_b|``.
* :func:`brier` -- Brier score (Brier 1950), multi-class form:
  ``mean_i sum_c (p_ic - 1[y_i = c])^2``, in [0, 2].
* :func:`disagreement`, :func:`mean_pairwise_kl` -- ensemble diversity on stacked member
  outputs ``(members, batch, classes, ...)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "KINDS",
    "accuracy",
    "brier",
    "disagreement",
    "ece",
    "mae",
    "mean_pairwise_kl",
    "mse",
    "nll",
    "r2",
    "reliability_diagram_data",
]

KINDS = ("auto", "logits", "probs")
_TINY = torch.finfo(torch.float32).tiny  # probabilities are clamped here before a log


def _check_kind(kind: object) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}.")


def _check_bins(bins: object) -> int:
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive int (number of equal-width bins); got {bins!r}.")
    return bins


def _rows(outputs: Tensor) -> Tensor:
    """``(batch, classes, ...)`` -> ``(rows, classes)`` in float32 (float64 kept)."""
    flat = outputs.detach().movedim(1, -1).reshape(-1, outputs.shape[1])
    return flat if flat.dtype == torch.float64 else flat.float()


def _looks_like_probs(rows: Tensor, dtype: torch.dtype) -> Tensor:
    tol = max(1e-3, 2 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-3
    in_range = (rows.amin() >= 0) & (rows.amax() <= 1)
    return in_range & ((rows.sum(1) - 1).abs().amax() <= tol)


def check_labels(outputs: Tensor, labels: Tensor) -> None:
    """Labels must be integer class indices shaped like ``outputs`` without its class dim."""
    expected = (outputs.shape[0], *outputs.shape[2:])
    if labels.is_floating_point() or labels.is_complex() or tuple(labels.shape) != expected:
        raise ValueError(
            f"labels must be integer class indices of shape {expected}; "
            f"got {labels.dtype} of shape {tuple(labels.shape)}."
        )


def _prepare(outputs: Any, labels: Any, kind: str) -> tuple[Tensor, Tensor, bool]:
    """Rows ``(rows, classes)``, flat labels and whether the rows are probabilities."""
    _check_kind(kind)
    if not isinstance(outputs, Tensor) or not isinstance(labels, Tensor):
        raise TypeError("outputs and labels must be Tensors.")
    if outputs.dim() < 2 or not outputs.is_floating_point():
        raise ValueError(
            "outputs must be float logits or probabilities of shape (batch, classes, ...); "
            f"got {outputs.dtype} of shape {tuple(outputs.shape)}."
        )
    check_labels(outputs, labels)
    if outputs.numel() == 0:
        raise ValueError("outputs must hold at least one sample.")
    rows, y = _rows(outputs), labels.reshape(-1).to(outputs.device)
    classes = rows.shape[1]
    checks = [(y.amin() >= 0) & (y.amax() < classes)]
    if kind != "logits":
        checks.append(_looks_like_probs(rows, outputs.dtype))
    flags = torch.stack(checks).tolist()  # the one host sync of the checks
    if not flags[0]:
        raise ValueError(f"labels must be class indices in [0, {classes}).")
    if kind == "probs" and not flags[1]:
        raise ValueError(
            "outputs were given as kind='probs' but are not probabilities "
            "(every row in [0, 1], summing to 1); pass kind='logits' for logits."
        )
    return rows, y, kind == "probs" or (kind == "auto" and flags[1])


def _probs(outputs: Any, labels: Any, kind: str) -> tuple[Tensor, Tensor]:
    rows, y, is_probs = _prepare(outputs, labels, kind)
    return (rows if is_probs else torch.softmax(rows, dim=1)), y


def accuracy(outputs: Tensor, labels: Tensor) -> float:
    """Fraction of correct predictions: ``mean(argmax_c outputs == labels)``.

    ``outputs``: logits or probabilities ``(batch, classes, ...)`` (the argmax is the same),
    or predicted class indices of the same shape as ``labels`` (e.g. a vote).

    Example:
        >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]))
        0.5
    """
    if not isinstance(outputs, Tensor) or not isinstance(labels, Tensor):
        raise TypeError("outputs and labels must be Tensors.")
    if outputs.shape == labels.shape and not outputs.is_floating_point():
        predicted = outputs
    elif outputs.dim() >= 2 and (outputs.shape[0], *outputs.shape[2:]) == labels.shape:
        predicted = outputs.argmax(dim=1)
    else:
        raise ValueError(
            "outputs must be (batch, classes, ...) scores or class indices shaped like labels; "
            f"got outputs {tuple(outputs.shape)} and labels {tuple(labels.shape)}."
        )
    if labels.numel() == 0:
        raise ValueError("labels must hold at least one sample.")
    return float((predicted == labels.to(predicted.device)).float().mean())


def nll(outputs: Tensor, labels: Tensor, kind: str = "auto") -> float:
    """Mean negative log-likelihood of the labels: ``-mean_i log p_i[y_i]``.

    Takes logits (``F.cross_entropy``, exact) or probabilities (``-log p`` with ``p``
    clamped at 1.2e-38, so a zero probability costs about 87 nats, not infinity); see
    ``kind`` in the module docstring.

    Example:
        >>> import math
        >>> probs = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
        >>> abs(nll(probs, torch.tensor([0, 1])) - (math.log(2) - math.log(0.75)) / 2) < 1e-7
        True
        >>> nll(torch.zeros(3, 4), torch.tensor([0, 1, 2]), kind="logits")  # log 4
        1.3862943649291992
    """
    rows, y, is_probs = _prepare(outputs, labels, kind)
    if not is_probs:  # exact for logits: no softmax-then-log round trip
        return float(F.cross_entropy(rows, y))
    p_true = rows.gather(1, y.unsqueeze(1)).squeeze(1)
    return float(-p_true.clamp_min(_TINY).log().mean())


def _bin_totals(probs: Tensor, labels: Tensor, bins: int) -> tuple[Tensor, Tensor]:
    """Per-bin [count, sum of confidence, sum of correct] ``(bins, 3)`` and the edges."""
    confidence, predicted = probs.max(dim=1)
    edges = torch.linspace(0.0, 1.0, bins + 1, dtype=probs.dtype, device=probs.device)
    index = torch.bucketize(confidence, edges[1:-1])  # right-closed bins (k/B, (k+1)/B]
    values = torch.stack(
        [torch.ones_like(confidence), confidence, (predicted == labels).to(probs.dtype)], dim=1
    )
    totals = torch.zeros(bins, 3, dtype=probs.dtype, device=probs.device)
    return totals.index_add_(0, index, values), edges


def ece(outputs: Tensor, labels: Tensor, bins: int = 15, kind: str = "auto") -> float:
    """Expected calibration error with ``bins`` equal-width confidence bins (Guo et al. 2017).

    ``ECE = sum_b (n_b / n) |acc_b - conf_b| = sum_b |correct_b - sum of conf in b| / n``.

    Example:
        >>> probs = torch.tensor([[0.75, 0.25]] * 4)  # 75% confident, right 3 times in 4
        >>> ece(probs, torch.tensor([0, 0, 0, 1]))
        0.0
        >>> ece(probs, torch.tensor([0, 1, 1, 1]))  # |0.25 - 0.75|
        0.5
    """
    bins = _check_bins(bins)
    probs, y = _probs(outputs, labels, kind)
    totals, _ = _bin_totals(probs, y, bins)
    return float((totals[:, 2] - totals[:, 1]).abs().sum() / probs.shape[0])


def brier(outputs: Tensor, labels: Tensor, kind: str = "auto") -> float:
    """Multi-class Brier score ``mean_i sum_c (p_ic - 1[y_i = c])^2`` (Brier 1950), in [0, 2].

    Computed as ``sum_c p_ic^2 - 2 p_i[y_i] + 1`` (no one-hot matrix).

    Example:
        >>> brier(torch.tensor([[0.5, 0.5], [1.0, 0.0]]), torch.tensor([0, 0]))  # (0.5 + 0) / 2
        0.25
    """
    probs, y = _probs(outputs, labels, kind)
    p_true = probs.gather(1, y.unsqueeze(1)).squeeze(1)
    return float(((probs * probs).sum(1) - 2 * p_true + 1).mean())


def reliability_diagram_data(
    outputs: Tensor, labels: Tensor, bins: int = 15, kind: str = "auto"
) -> dict[str, Any]:
    """Per-bin data of a reliability diagram, JSON-ready.

    Returns ``{"edges": bins + 1 floats, "count": ints, "confidence": mean confidence per
    bin, "accuracy": accuracy per bin, "ece": float}``; an empty bin has ``None`` for
    confidence and accuracy. Plot accuracy against confidence (the diagonal is perfect
    calibration).

    Example:
        >>> d = reliability_diagram_data(torch.tensor([[0.9, 0.1], [0.3, 0.7]]),
        ...                              torch.tensor([0, 0]), bins=2)
        >>> d["count"], d["accuracy"], d["edges"]
        ([0, 2], [None, 0.5], [0.0, 0.5, 1.0])
    """
    bins = _check_bins(bins)
    probs, y = _probs(outputs, labels, kind)
    totals, edges = _bin_totals(probs, y, bins)
    table = totals.tolist()
    counts = [round(row[0]) for row in table]
    return {
        "edges": edges.tolist(),
        "count": counts,
        "confidence": [row[1] / n if n else None for row, n in zip(table, counts, strict=True)],
        "accuracy": [row[2] / n if n else None for row, n in zip(table, counts, strict=True)],
        "ece": sum(abs(row[2] - row[1]) for row in table) / probs.shape[0],
    }


def _members(member_outputs: Tensor | Sequence[Tensor]) -> Tensor:
    stacked = member_outputs
    if not isinstance(stacked, Tensor):
        try:
            stacked = torch.stack(list(member_outputs))
        except (TypeError, RuntimeError) as exc:
            raise TypeError(
                "member_outputs must be a Tensor (members, batch, classes, ...) or a sequence "
                f"of equally shaped (batch, classes, ...) Tensors ({exc})."
            ) from None
    if stacked.dim() < 3 or stacked.shape[0] < 2 or stacked.numel() == 0:
        raise ValueError(
            "member_outputs must be (members, batch, classes, ...) with at least 2 members; "
            f"got shape {tuple(stacked.shape)}."
        )
    if not stacked.is_floating_point():
        raise ValueError(
            f"member_outputs must be float logits or probabilities; got {stacked.dtype}."
        )
    return stacked.detach()


def disagreement(member_outputs: Tensor | Sequence[Tensor]) -> float:
    """Mean pairwise disagreement rate: the fraction of samples on which two members' argmax
    differ, averaged over all pairs of members (logits or probabilities alike).

    With ``n_c`` the members predicting class ``c`` for a sample, the agreeing ordered pairs
    are ``sum_c n_c (n_c - 1)``, so the rate is ``1 - mean_i sum_c n_c (n_c - 1) / (M (M - 1))``.

    Example:
        >>> a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # member a: class 0, 0
        >>> b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # member b: class 0, 1
        >>> disagreement(torch.stack([a, b]))
        0.5
    """
    stacked = _members(member_outputs)
    m, classes = stacked.shape[0], stacked.shape[2]
    predicted = stacked.argmax(dim=2).reshape(m, -1)
    counts = F.one_hot(predicted, classes).sum(0)  # (samples, classes)
    agree = (counts * (counts - 1)).sum(1).double() / (m * (m - 1))
    return float(1 - agree.mean())


def mean_pairwise_kl(member_outputs: Tensor | Sequence[Tensor], kind: str = "auto") -> float:
    """Mean KL divergence ``KL(p_i || p_j)`` over ordered pairs of members ``i != j`` and
    over samples, in nats (0 when all members agree exactly).

    Uses ``sum_{i,j} KL(p_i||p_j) = M sum_i <p_i, log p_i> - <sum_i p_i, sum_j log p_j>``
    (float64), so it costs O(M) not O(M^2). Probabilities are clamped at 1.2e-38 before
    the log (a zero where another member has mass counts as a large finite KL).

    Example:
        >>> import math
        >>> p = torch.tensor([[[0.5, 0.5]], [[0.9, 0.1]]])
        >>> kl = 0.5 * (0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
        ...             + 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5))
        >>> abs(mean_pairwise_kl(p) - kl) < 1e-6
        True
    """
    _check_kind(kind)
    stacked = _members(member_outputs)
    m, classes = stacked.shape[0], stacked.shape[2]
    flat = stacked.movedim(2, -1).reshape(m, -1, classes).double()
    is_probs = kind == "probs"
    if kind != "logits":
        looks = bool(_looks_like_probs(flat.reshape(-1, classes), stacked.dtype))
        if kind == "probs" and not looks:
            raise ValueError(
                "member_outputs were given as kind='probs' but are not probabilities "
                "(every row in [0, 1], summing to 1); pass kind='logits' for logits."
            )
        is_probs = looks
    if is_probs:
        probs, log_probs = flat, flat.clamp_min(_TINY).log()
    else:
        log_probs = torch.log_softmax(flat, dim=2)
        probs = log_probs.exp()
    self_term = m * (probs * log_probs).sum(dim=(0, 2))
    cross = (probs.sum(0) * log_probs.sum(0)).sum(1)
    return float(((self_term - cross) / (m * (m - 1))).mean())


# ---------------------------------------------------------------- regression


def _regression_pair(outputs: Any, targets: Any, name: str) -> tuple[Tensor, Tensor]:
    """Same-shaped float64 ``(outputs, targets)``; a trailing size-1 dim on one is squeezed."""
    if not isinstance(outputs, Tensor) or not isinstance(targets, Tensor):
        raise TypeError(
            f"{name}: outputs and targets must be Tensors, got "
            f"{type(outputs).__name__} and {type(targets).__name__}."
        )
    o, t = outputs.detach(), targets.detach()
    if o.dim() == 2 and o.shape[1] == 1 and t.dim() == 1:
        o = o[:, 0]
    elif t.dim() == 2 and t.shape[1] == 1 and o.dim() == 1:
        t = t[:, 0]
    if o.shape != t.shape:
        raise ValueError(
            f"{name}: outputs and targets must have the same shape (or (N, 1) against (N,)); "
            f"got outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)}."
        )
    if o.numel() == 0:
        raise ValueError(f"{name}: outputs and targets must hold at least one value.")
    dtype = torch.float32 if o.device.type == "mps" else torch.float64
    return o.to(dtype), t.to(device=o.device, dtype=dtype)


def mse(outputs: Tensor, targets: Tensor) -> float:
    """Mean squared error ``mean((outputs - targets)^2)`` over every element.

    Example:
        >>> mse(torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([1.0, 3.0, 2.0]))  # (0+1+4)/3
        1.6666666666666667
    """
    o, t = _regression_pair(outputs, targets, "mse")
    return float((o - t).square().mean())


def mae(outputs: Tensor, targets: Tensor) -> float:
    """Mean absolute error ``mean(|outputs - targets|)`` over every element.

    Example:
        >>> mae(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 3.0, 2.0]))  # (0+1+2)/3
        1.0
    """
    o, t = _regression_pair(outputs, targets, "mae")
    return float((o - t).abs().mean())


def r2(outputs: Tensor, targets: Tensor) -> float:
    """Coefficient of determination ``R^2 = 1 - SS_res / SS_tot``.

    ``SS_res = sum_i (y_i - f_i)^2``, ``SS_tot = sum_i (y_i - mean(y))^2``. For 2-D (or
    higher) targets ``(N, d, ...)`` it is computed per output column and averaged
    uniformly, like ``sklearn.metrics.r2_score`` (``multioutput="uniform_average"``); a
    column with constant targets scores 1.0 if predicted exactly, else 0.0 (sklearn's
    ``force_finite``). 1 is perfect, 0 is predicting the mean, negative is worse than
    that. NaN with fewer than two samples (undefined, as in sklearn).

    Example:
        >>> y = torch.tensor([1.0, 2.0, 3.0, 4.0])
        >>> r2(y, y), r2(torch.full((4,), 2.5), y)
        (1.0, 0.0)
        >>> r2(torch.tensor([1.0, 2.0, 3.0, 5.0]), y)  # 1 - 1 / 5
        0.8
    """
    o, t = _regression_pair(outputs, targets, "r2")
    if t.shape[0] < 2:
        return float("nan")
    o, t = o.reshape(o.shape[0], -1), t.reshape(t.shape[0], -1)  # (N, columns)
    ss_res = (t - o).square().sum(0)
    ss_tot = (t - t.mean(0)).square().sum(0)
    score = torch.where(
        ss_tot != 0,
        1 - ss_res / torch.where(ss_tot != 0, ss_tot, 1),
        (ss_res == 0).to(o.dtype),
    )
    return float(score.mean())
