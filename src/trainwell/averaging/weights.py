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
from collections import OrderedDict
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
    """(name, tensor, is_parameter) for every parameter, then every buffer.

    Exactly ``named_parameters()`` then ``named_buffers()``, from one walk over the
    modules instead of two (unless the model overrides either method).
    """
    cls = type(model)
    if (
        cls.named_parameters is not nn.Module.named_parameters
        or cls.named_buffers is not nn.Module.named_buffers
    ):
        out = [(n, p, True) for n, p in model.named_parameters()]
        return out + [(n, b, False) for n, b in model.named_buffers()]
    params: list[tuple[str, torch.Tensor, bool]] = []
    bufs: list[tuple[str, torch.Tensor, bool]] = []
    seen_p: set[torch.Tensor] = set()
    seen_b: set[torch.Tensor] = set()
    for prefix, module in model.named_modules():
        for out, seen, members, is_param in (
            (params, seen_p, module._parameters, True),
            (bufs, seen_b, module._buffers, False),
        ):
            for k, v in members.items():
                if v is None or v in seen:
                    continue
                seen.add(v)
                out.append((f"{prefix}.{k}" if prefix else k, v, is_param))
    return params + bufs


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


def _signature(named: list[tuple[str, torch.Tensor, bool]]) -> tuple[list, list, list]:
    """Names, shapes and dtypes in order: equal signatures pass ``_check_same_structure``."""
    return [n for n, _, _ in named], [t.shape for _, t, _ in named], [t.dtype for _, t, _ in named]


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


# CPU averages run in tiles of this many elements (2 MB of float32, about one core's L2):
# all models' lerps of one tile run back to back, so the accumulator stays in cache and
# memory sees one read of every model and one write of the result, not a
# read-modify-write of the result per model.
_TILE = 1 << 19
_TILED_DEVICES = ("cpu",)  # on an accelerator, whole-tensor foreach kernels are the fast path
_FEW = 4  # a bundle of at most this many pieces: a lerp per piece writes the output


def _units(tensors: Sequence[Sequence[torch.Tensor]], tile: int) -> list[list[list[torch.Tensor]]]:
    """Bundles of about ``tile`` elements; each bundle holds, per tensor list, its pieces.

    ``tensors[k]`` is the k-th list (output, then one per model), all lists aligned. A
    tensor larger than a tile is cut into flat pieces when every list holds it
    contiguous; anything else goes whole.
    """
    bundles: list[list[list[torch.Tensor]]] = []
    current: list[list[torch.Tensor]] = [[] for _ in tensors]
    size = 0
    for column in zip(*tensors, strict=True):
        n = column[0].numel()
        if n > tile and all(t.is_contiguous() for t in column):
            pieces = [t.view(-1).split(tile) for t in column]
        else:
            pieces = [(t,) for t in column]
        for i in range(len(pieces[0])):
            for k, p in enumerate(pieces):
                current[k].append(p[i])
            size += pieces[0][i].numel()
            if size >= tile:
                bundles.append(current)
                current, size = [[] for _ in tensors], 0
    if size:
        bundles.append(current)
    return bundles


def _average_group(srcs: list[list[torch.Tensor]], fractions: list[float]) -> list[torch.Tensor]:
    """New tensors ``acc <- srcs[0]``, then ``acc <- lerp(acc, srcs[i], fractions[i - 1])``.

    ``srcs[i]`` holds model i's tensors of one (device, dtype) group. Half precision
    accumulates in float32 and rounds once. On CPU the outputs are allocated first
    and filled tile by tile (see ``_TILE``); elsewhere the first
    lerp allocates them and each further model is one foreach lerp over whole tensors.
    """
    first, rest = srcs[0], srcs[1:]
    low = first[0].dtype in (torch.float16, torch.bfloat16)
    if first[0].device.type not in _TILED_DEVICES:
        acc = [t.float() for t in first] if low else first
        if rest:
            src = [t.float() for t in rest[0]] if low else rest[0]
            acc = torch._foreach_lerp(acc, src, fractions[0])
        else:
            acc = [t.clone() for t in acc]
        for src, f in zip(rest[1:], fractions[1:], strict=True):
            torch._foreach_lerp_(acc, [t.float() for t in src] if low else src, f)
        return [t.to(first[0].dtype) for t in acc] if low else acc
    outs = [torch.empty_like(t) for t in first]
    for out, a, *more in _units([outs, *srcs], _TILE):
        if low:
            acc = [t.float() for t in a]
            for src, f in zip(more, fractions, strict=True):
                torch._foreach_lerp_(acc, [t.float() for t in src], f)
            torch._foreach_copy_(out, acc)
        elif more and len(out) <= _FEW:  # big pieces: the first lerp writes the output
            for o, x, y in zip(out, a, more[0], strict=True):
                torch.lerp(x, y, fractions[0], out=o)
            for src, f in zip(more[1:], fractions[1:], strict=True):
                torch._foreach_lerp_(out, src, f)
        else:  # many small tensors: one foreach copy beats a call per tensor
            torch._foreach_copy_(out, a)
            for src, f in zip(more, fractions, strict=True):
                torch._foreach_lerp_(out, src, f)
    return outs


def _fresh_containers(module: nn.Module, memo: dict[int, Any]) -> None:
    """Seed ``deepcopy``'s memo with new empty hook dicts and sets: the copy they would
    get anyway, without ``deepcopy``'s generic reconstruction (most of its cost)."""
    for m in module.modules():
        for v in m.__dict__.values():
            cls = type(v)
            if (cls is OrderedDict or cls is dict or cls is set) and not v:
                memo[id(v)] = cls()


@torch.no_grad()
def average_weights(
    models: Sequence[nn.Module],
    weights: Sequence[float] | None = None,
    buffers: str = "average",
) -> nn.Module:
    """A new model whose weights are the (weighted) mean of ``models``' weights.

    ``theta = sum_i w_i * theta_i`` with ``w`` normalized to sum to 1 (uniform when
    ``weights`` is None): the "uniform soup" of Wortsman et al. 2022 and the average of
    Izmailov et al. 2018. Float parameters are averaged with foreach ops as the running
    weighted mean (``acc <- acc + w_i / (w_0 + ... + w_i) * (theta_i - acc)``, one lerp
    per model; half precision accumulates in float32). On CPU it runs in cache-sized
    tiles, every model's lerp of a tile back to back, so memory traffic is one read of
    each model and one write of the result. Float buffers are averaged
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
    signature = _signature(ref)
    for i, s in enumerate(srcs[1:], start=1):
        if _signature(s) != signature:  # the detailed check names the first difference
            _check_same_structure(ref, s, f"models[{i}]")
    pick = [
        j
        for j, (_, t, is_param) in enumerate(ref)
        if _averageable(t) and (is_param or buffers == "average")
    ]
    # models with weight 0 are skipped; the others get their lerp fraction w / (seen + w)
    used, fractions, seen = [srcs[0]], [], ws[0]
    for src, w in zip(srcs[1:], ws[1:], strict=True):
        if w > 0:
            used.append(src)
            fractions.append(w / (seen + w))
            seen += w
    # The averages are computed into fresh tensors that deepcopy then uses (its memo), so
    # models[0]'s weights are never copied only to be overwritten.
    memo: dict[int, Any] = {}
    for group in _group(pick, [t for _, t, _ in ref]):
        device = ref[group[0]][1].device
        on_cpu = device.type == "cpu"
        inputs = [
            [
                t if (t.is_cpu if on_cpu else t.device == device) else t.to(device)
                for t in (src[j][1] for j in group)
            ]
            for src in used
        ]
        for j, t in zip(group, _average_group(inputs, fractions), strict=True):
            _, orig, is_param = ref[j]
            memo[id(orig)] = nn.Parameter(t, orig.requires_grad) if is_param else t
    _fresh_containers(mods[0], memo)
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
def _torch_order_device(model: nn.Module, third: Any) -> Any:
    """In torch's ``update_bn(loader, model, device)`` order the third argument is a device:
    accepted (and dropped) when it is where the model is; anything else stays ``forward``."""
    if third is None or callable(third):
        return third
    if isinstance(third, (str, torch.device)):
        where = next(iter([*model.parameters(), *model.buffers()]), torch.empty(0)).device
        if torch.device(third).type == where.type and torch.device(third).index in (
            None,
            where.index,
        ):
            return None
        raise ValueError(
            f"update_bn(loader, model, device={third!r}): the model is on {where}; move the "
            "model there first (batches go to the model's device)"
        )
    return third


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

    torch's order, ``update_bn(loader, model)`` (``torch.optim.swa_utils.update_bn``), is
    accepted too: the two are told apart by which one is an ``nn.Module``, and a device
    given third in that order must be the model's own (batches go to the model's device).

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
    if isinstance(loader, nn.Module) and not isinstance(model, nn.Module):
        model, loader, forward = loader, model, _torch_order_device(loader, forward)
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
