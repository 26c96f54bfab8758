"""Weight averaging: uniform/weighted means, BatchNorm recalibration, EMA and SWA.

Every function here follows one rule for the tensors of a model:

* floating-point (and complex) **parameters** are averaged;
* floating-point **buffers** (BatchNorm's ``running_mean``/``running_var``) are averaged
  with ``buffers="average"`` or copied with ``buffers="copy"`` (see each function for
  *copied from where*);
* **integer and bool buffers** (BatchNorm's ``num_batches_tracked``) are never averaged
  as floats: ``average_weights`` takes them from the first model, ``EMA`` and ``SWA``
  copy them from the live model at every update. No crash, no silent truncation.

After averaging, BatchNorm statistics no longer match the averaged weights;
:func:`update_bn` recomputes them with one pass over data (and can also make a model
worse: measure it, as :func:`trainwell.averaging.soups.greedy_soup` does). The running averages
:class:`EMA` and :class:`SWA` live in ``trainwell.averaging.running`` (also importable from here).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from trainwell.distributed import is_distributed, unwrap

__all__ = ["average_weights", "update_bn"]

_BUFFER_MODES = ("copy", "average")


def _averageable(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, is_parameter) for every parameter, then every buffer."""
    out = [(n, p, True) for n, p in model.named_parameters()]
    return out + [(n, b, False) for n, b in model.named_buffers()]


def _check_buffers(buffers: str) -> None:
    if buffers not in _BUFFER_MODES:
        raise ValueError(f"buffers must be 'copy' or 'average', got {buffers!r}")


def _check_same_structure(
    reference: list[tuple[str, torch.Tensor, bool]],
    other: list[tuple[str, torch.Tensor, bool]],
    label: str,
) -> None:
    """Raise ValueError naming the first key, shape or dtype that differs."""
    ref = {n: t for n, t, _ in reference}
    oth = {n: t for n, t, _ in other}
    for name, t in ref.items():
        if name not in oth:
            raise ValueError(f"{label} has no key {name!r} (the reference model has it)")
        o = oth[name]
        if o.shape != t.shape:
            raise ValueError(
                f"{label} key {name!r} has shape {tuple(o.shape)}, expected {tuple(t.shape)}"
            )
        if o.dtype != t.dtype:
            raise ValueError(f"{label} key {name!r} has dtype {o.dtype}, expected {t.dtype}")
    for name in oth:
        if name not in ref:
            raise ValueError(f"{label} has an extra key {name!r} that the reference model lacks")


def _group(indices: Sequence[int], tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices grouped by (device, dtype), so each foreach call takes its fast path."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i in indices:
        groups.setdefault((tensors[i].device, tensors[i].dtype), []).append(i)
    return list(groups.values())


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    ws = [float(w) for w in weights]
    if len(ws) != n:
        raise ValueError(f"weights must have one entry per model ({n}), got {len(ws)}")
    if any(not math.isfinite(w) or w < 0 for w in ws) or sum(ws) <= 0:
        raise ValueError(f"weights must be finite, non-negative and sum to > 0, got {ws}")
    total = sum(ws)
    return [w / total for w in ws]


def _take(
    src: list[tuple[str, torch.Tensor, bool]], group: list[int], device: torch.device, low: bool
) -> list[torch.Tensor]:
    ts = [src[j][1].detach().to(device) for j in group]
    return [t.float() for t in ts] if low else ts


@torch.no_grad()
def average_weights(
    models: Sequence[nn.Module],
    weights: Sequence[float] | None = None,
    buffers: str = "average",
) -> nn.Module:
    """A new model whose weights are the (weighted) mean of ``models``' weights.

    ``theta = sum_i w_i * theta_i`` with ``w`` normalized to sum to 1 (uniform when
    ``weights`` is None): the "uniform soup" of Wortsman et al. 2022 and the average of
    Izmailov et al. 2018. Float parameters are averaged with foreach ops, one lerp pass
    per model (``acc <- acc + w_i / (w_0 + ... + w_i) * (theta_i - acc)``, the running
    weighted mean; half precision accumulates in float32). Float buffers are averaged
    (``buffers="average"``) or taken from ``models[0]`` (``"copy"``); integer and bool
    buffers are always taken from ``models[0]``. The result is a deep copy of
    ``models[0]`` (unwrapped from DDP), on its device, in its train/eval mode.

    Args:
        models: models with identical parameter and buffer names, shapes and dtypes.
        weights: one non-negative weight per model; normalized to sum to 1.
        buffers: ``"average"`` or ``"copy"`` for floating-point buffers.

    Raises:
        ValueError: an empty list, bad weights, or models whose keys, shapes or dtypes
            differ (the message names the first mismatch).

    Example:
        >>> a, b = nn.Linear(2, 1), nn.Linear(2, 1)
        >>> avg = average_weights([a, b])
        >>> torch.allclose(avg.weight, (a.weight + b.weight) / 2)
        True
    """
    if isinstance(models, nn.Module) or not isinstance(models, Sequence):
        raise TypeError("models must be a list or tuple of nn.Module")
    if not models:
        raise ValueError("models must hold at least one model, got an empty sequence")
    _check_buffers(buffers)
    ws = _weights(weights, len(models))
    mods = [unwrap(m) for m in models]
    ref = _named_tensors(mods[0])
    srcs = [_named_tensors(m) for m in mods]
    for i, s in enumerate(srcs[1:], start=1):
        _check_same_structure(ref, s, f"models[{i}]")
    pick = [
        j
        for j, (_, t, is_param) in enumerate(ref)
        if _averageable(t) and (is_param or buffers == "average")
    ]
    # The averages are computed into fresh tensors that deepcopy then uses (its memo), so
    # models[0]'s weights are never copied only to be overwritten.
    memo: dict[int, Any] = {}
    others = [(src, w) for src, w in zip(srcs[1:], ws[1:], strict=True) if w > 0]
    for group in _group(pick, [t for _, t, _ in ref]):
        dtype, device = ref[group[0]][1].dtype, ref[group[0]][1].device
        low = dtype in (torch.float16, torch.bfloat16)

        seen = ws[0]  # acc: the weighted mean of the models so far, one lerp per model
        if others:
            (src, w), rest = others[0], others[1:]
            acc = torch._foreach_lerp(
                _take(ref, group, device, low), _take(src, group, device, low), w / (seen + w)
            )
            seen += w
        else:
            acc, rest = [t.clone() for t in _take(ref, group, device, low)], []
        for src, w in rest:
            torch._foreach_lerp_(acc, _take(src, group, device, low), w / (seen + w))
            seen += w
        for j, t in zip(group, acc, strict=True):
            t = t.to(dtype) if low else t
            _, orig, is_param = ref[j]
            memo[id(orig)] = nn.Parameter(t, orig.requires_grad) if is_param else t
    return copy.deepcopy(mods[0], memo)


def _tracked_norms(model: nn.Module) -> list[nn.modules.batchnorm._NormBase]:
    """Normalization layers with running statistics (BatchNorm, tracked InstanceNorm)."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase)
        and m.track_running_stats
        and isinstance(m.running_mean, torch.Tensor)
    ]


def _move(x: Any, device: torch.device | None) -> Any:
    return x.to(device) if isinstance(x, torch.Tensor) and device is not None else x


def _default_forward(model: nn.Module, batch: Any, device: torch.device | None) -> None:
    if isinstance(batch, torch.Tensor):
        model(_move(batch, device))
    elif isinstance(batch, (list, tuple)) and batch:
        model(_move(batch[0], device))
    elif isinstance(batch, dict):
        model(**{k: _move(v, device) for k, v in batch.items()})
    else:
        raise TypeError(
            "update_bn: a batch must be a tensor, a non-empty tuple/list (input first) or a "
            f"dict of keyword arguments, got {type(batch).__name__}; pass forward=callable"
        )


def _all_reduce_stats(norms: list[nn.modules.batchnorm._NormBase], batches: int) -> None:
    """Batch-count-weighted mean of every rank's running statistics (one all-reduce)."""
    import torch.distributed as dist

    stats = [t for m in norms for t in (m.running_mean, m.running_var) if t is not None]
    counts = [m.num_batches_tracked for m in norms if m.num_batches_tracked is not None]
    sizes = [t.numel() for t in stats]
    weighted = torch.cat([t.reshape(-1).float() * batches for t in stats])
    extra = [c.reshape(1).float() for c in counts] + [weighted.new_full((1,), float(batches))]
    flat = torch.cat([weighted, *extra])
    dist.all_reduce(flat)  # sums: weighted statistics, call counts, batches
    total, n = flat[-1], sum(sizes)
    torch._foreach_copy_(stats, list((flat[:n] / total).split(sizes)))
    for c, summed in zip(counts, flat[n:-1], strict=True):
        c.copy_(summed.round())


@torch.no_grad()
def update_bn(
    model: nn.Module,
    loader: Any,
    forward: Any = None,
) -> int:
    """Recompute the running statistics of every normalization layer that tracks them.

    After averaging weights, BatchNorm's ``running_mean``/``running_var`` belong to none
    of the averaged models (Izmailov et al. 2018, sec. 3.2). This resets them and makes
    one pass over ``loader`` in train mode, so each statistic is the equal-weight mean
    over batches of the batch statistics: BatchNorm with ``momentum=None``, exactly as
    ``torch.optim.swa_utils.update_bn``; tracked InstanceNorm (which torch's version
    leaves stale: it ignores ``momentum=None``) with momentum ``1 / (k + 1)`` at
    batch k. Afterwards every module's momentum and its own
    train/eval flag are restored. Under ``torch.distributed`` the statistics are averaged
    over ranks, weighted by each rank's batch count: the same result as one process
    seeing every rank's batches.

    Args:
        model: the model (a DDP wrapper is unwrapped: its forward would broadcast buffers).
        loader: an iterable of batches: a tensor (the input), a tuple or list (the input
            is its first element) or a dict (passed as keyword arguments, ``model(**b)``).
            Default forwards move tensors to the model's device.
        forward: optional ``forward(model, batch)`` that runs the model on one batch
            (it receives the unwrapped model and the raw batch).

    Returns:
        The number of batches seen; 0 when the model has no layer with running
        statistics (the loader is then not iterated).

    Raises:
        ValueError: the loader yielded no batch (the statistics are left untouched).
        TypeError: a batch of another type without ``forward``.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> update_bn(net, [torch.randn(8, 3) for _ in range(2)])
        2
        >>> net.training, net[1].momentum
        (True, 0.1)
    """
    net = unwrap(model)
    norms = _tracked_norms(net)
    if not norms:
        return 0
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be a callable forward(model, batch), got {forward!r}")
    modes = [(m, m.training) for m in net.modules()]
    momenta = [(m, m.momentum) for m in norms]
    device = next(iter([*net.parameters(), *net.buffers()]), torch.empty(0)).device
    seen = 0
    try:
        for batch in loader:
            if seen == 0:
                net.train()
                for m in norms:
                    m.reset_running_stats()
            for m in norms:  # BatchNorm: None (1 / calls); InstanceNorm ignores None
                is_bn = isinstance(m, nn.modules.batchnorm._BatchNorm)
                m.momentum = None if is_bn else 1.0 / (seen + 1)
            if forward is None:
                _default_forward(net, batch, device)
            else:
                forward(net, batch)
            seen += 1
        if seen == 0:
            raise ValueError("update_bn: loader yielded no batches; statistics left unchanged")
        if is_distributed():
            _all_reduce_stats(norms, seen)
    finally:
        for m, momentum in momenta:
            m.momentum = momentum
        for m, training in modes:
            m.training = training
    return seen
