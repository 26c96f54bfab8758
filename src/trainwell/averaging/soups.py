"""Model soups (Wortsman et al. 2022, "Model soups: averaging weights of multiple
fine-tuned models improves accuracy without increasing inference time").

A soup is the weight average of several models fine-tuned from the same start (or, less
reliably, trained from the same initialization). The uniform soup averages them all; the
greedy soup adds ingredients one at a time, best first, and keeps one only if the
held-out score does not get worse, so it is never worse than the best ingredient on the
held-out data it was chosen on (report a separate test set).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import nn

from trainwell.averaging.weights import average_weights, update_bn

__all__ = ["greedy_soup", "uniform_soup"]


def uniform_soup(models: Sequence[nn.Module], buffers: str = "average") -> nn.Module:
    """The uniform soup: the equal-weight average of every model.

    ``theta = (1 / n) sum_i theta_i``; the tensor rule is that of
    :func:`trainwell.averaging.weights.average_weights` (integer buffers from ``models[0]``).

    Example:
        >>> import torch
        >>> a, b = nn.Linear(2, 1), nn.Linear(2, 1)
        >>> soup = uniform_soup([a, b])
        >>> torch.allclose(soup.bias, (a.bias + b.bias) / 2)
        True
    """
    return average_weights(models, buffers=buffers)


def _score(evaluate: Callable[[nn.Module], Any], model: nn.Module) -> float:
    value = evaluate(model)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"evaluate(model) must return a number, got {type(value).__name__}"
        ) from None


def greedy_soup(
    models: Sequence[nn.Module],
    evaluate: Callable[[nn.Module], Any],
    mode: str = "max",
    recalibrate_bn: Iterable[Any] | None = None,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    buffers: str = "average",
) -> tuple[nn.Module, list[int], list[dict[str, Any]]]:
    """The greedy soup of Wortsman et al. 2022 (their Recipe 1).

    Score every ingredient with ``evaluate`` (on held-out data), sort them best first
    (ties keep the input order; NaN scores go last), start the soup with the best one,
    then for each next ingredient form the uniform average of the soup's members plus
    it and keep it when its score is not worse (``>=`` for ``"max"``, ``<=`` for
    ``"min"``; a NaN score is never kept).

    BatchNorm recalibration is measured, not assumed: with ``recalibrate_bn`` (a loader
    of training batches for :func:`trainwell.averaging.weights.update_bn`) every candidate soup is
    scored twice, as averaged and after recalibration, and the better one counts (the
    un-recalibrated one on a tie). Both scores go into the history.

    Args:
        models: the ingredients, identical in structure.
        evaluate: ``evaluate(model) -> float`` on held-out data; it may switch the
            model to eval mode.
        mode: ``"max"`` (accuracy-like) or ``"min"`` (loss-like).
        recalibrate_bn: None, or an iterable of batches for ``update_bn`` (it must be
            iterable more than once, like a DataLoader or a list).
        forward: optional ``forward(model, batch)`` for ``update_bn``.
        buffers: ``"average"`` or ``"copy"`` float buffers (see ``average_weights``).

    Returns:
        ``(soup, chosen, history)``: the soup (a new model), the indices of the models
        in it in the order they were added, and one dict per candidate with ``index``,
        ``ingredient_score``, ``score`` (averaged), ``score_recalibrated`` (None without
        ``recalibrate_bn``), ``soup_score`` (the one that counts), ``recalibrated`` and
        ``accepted``.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> models = [nn.Linear(1, 1, bias=False) for _ in range(3)]
        >>> target = models[0].weight.item()
        >>> score = lambda m: -abs(m.weight.item() - target)  # best: models[0] alone
        >>> soup, chosen, history = greedy_soup(models, score)
        >>> chosen[0], len(history)
        (0, 3)
    """
    if isinstance(models, nn.Module) or not isinstance(models, Sequence) or not models:
        raise ValueError("models must be a non-empty list or tuple of nn.Module")
    if not callable(evaluate):
        raise TypeError(f"evaluate must be a callable evaluate(model) -> float, got {evaluate!r}")
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    sign = 1.0 if mode == "max" else -1.0

    def key(score: float) -> float:  # larger is better; NaN is worst
        return -math.inf if math.isnan(score) else sign * score

    scores = [_score(evaluate, m) for m in models]
    order = sorted(range(len(models)), key=lambda i: -key(scores[i]))
    chosen: list[int] = []
    history: list[dict[str, Any]] = []
    soup: nn.Module | None = None
    best = -math.inf
    for i in order:
        candidate = average_weights([models[j] for j in [*chosen, i]], buffers=buffers)
        raw = scores[i] if not chosen else _score(evaluate, candidate)
        recal = None
        if recalibrate_bn is not None:
            calibrated = copy.deepcopy(candidate)
            if update_bn(calibrated, recalibrate_bn, forward) > 0:
                recal = _score(evaluate, calibrated)
        use_recal = recal is not None and key(recal) > key(raw)
        value: float = recal if use_recal and recal is not None else raw
        # the best ingredient always starts the soup (even if every score is NaN)
        accepted = not chosen or (not math.isnan(value) and key(value) >= best)
        history.append(
            {
                "index": i,
                "ingredient_score": scores[i],
                "score": raw,
                "score_recalibrated": recal,
                "soup_score": value,
                "recalibrated": use_recal,
                "accepted": accepted,
            }
        )
        if accepted:
            chosen.append(i)
            best = key(value)
            soup = calibrated if use_recal else candidate
    assert soup is not None  # the first ingredient is always accepted
    return soup, chosen, history
