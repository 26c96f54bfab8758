"""Weight regularization: L1/L2 penalties that skip what they should, decoupled decay, max-norm.

Three ways to keep weights small, all sharing one rule for *which* parameters count:

* :class:`Regularizer` -- the L1/L2 penalty ``l1 * sum|w| + l2 * sum w^2``, either as a
  differentiable loss term (``.penalty``) or, faster, added straight to the gradients after
  ``backward()`` (``.apply_``: ``grad += l1 * sign(w) + 2 * l2 * w``, no autograd graph).
* :func:`param_groups` -- optimizer groups for decoupled weight decay (AdamW; Loshchilov &
  Hutter, "Decoupled Weight Decay Regularization", ICLR 2019). L2 in the loss equals weight
  decay only for plain SGD: Adam-style optimizers divide the L2 gradient by the running
  second moment, so heavily-updated weights are barely decayed.
* :func:`max_norm_` -- the max-norm constraint on each unit's incoming weight vector,
  ``w_i <- w_i * min(1, c / ||w_i||)`` (Srivastava et al., "Dropout: A Simple Way to Prevent
  Neural Networks from Overfitting", JMLR 2014).

Exclusion: biases and every parameter of a normalization layer (BatchNorm, LayerNorm,
GroupNorm, InstanceNorm, RMSNorm, recognized by module type, not by name) are excluded by
default; penalizing them only hurts. ``exclude`` holds the categories ``"bias"``, ``"norm"``
and ``"embedding"`` plus any ``fnmatch`` patterns over parameter names.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from trainwell.distributed import unwrap

__all__ = ["DEFAULT_EXCLUDE", "Regularizer", "param_groups", "max_norm_"]

#: Categories excluded unless told otherwise: biases and normalization-layer parameters.
DEFAULT_EXCLUDE: tuple[str, ...] = ("bias", "norm")
_CATEGORIES = ("bias", "norm", "embedding")
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)


def _check_strength(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a non-negative number, got {value!r}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
    return float(value)


def _check_exclude(exclude: str | Iterable[str]) -> tuple[str, ...]:
    items = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    for item in items:
        if not isinstance(item, str) or not item:
            raise TypeError(
                "exclude must hold the categories 'bias', 'norm', 'embedding' or "
                f"parameter-name patterns (non-empty strings), got {item!r}."
            )
    return items


def _classify(
    model: nn.Module, exclude: tuple[str, ...]
) -> list[tuple[str, nn.Parameter, str | None]]:
    """``(name, param, reason)`` for each parameter; reason is None when it is regularized.

    Raises ValueError for an exclusion pattern that matches no parameter.
    """
    module = unwrap(model)
    kind: dict[int, str] = {}
    for m in module.modules():
        tag = "norm" if isinstance(m, _NORM_TYPES) else None
        tag = "embedding" if isinstance(m, _EMBEDDING_TYPES) else tag
        if tag is not None:
            for p in m.parameters(recurse=False):
                kind.setdefault(id(p), tag)
    categories = {c for c in exclude if c in _CATEGORIES}
    patterns = [c for c in exclude if c not in _CATEGORIES]
    used: set[str] = set()
    rows: list[tuple[str, nn.Parameter, str | None]] = []
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        is_bias = leaf == "bias" or leaf.endswith("_bias") or leaf.startswith("bias_")
        hits = [pat for pat in patterns if fnmatchcase(name, pat)]
        used.update(hits)
        reason = None
        if kind.get(id(p)) == "norm" and "norm" in categories:
            reason = "norm layer"
        elif kind.get(id(p)) == "embedding" and "embedding" in categories:
            reason = "embedding"
        elif is_bias and "bias" in categories:
            reason = "bias"
        elif hits:
            reason = f"pattern {hits[0]!r}"
        rows.append((name, p, reason))
    for pat in patterns:
        if pat not in used:
            names = ", ".join(n for n, _, _ in rows[:5])
            raise ValueError(
                f"exclude pattern {pat!r} matches no parameter of the model "
                f"(names look like: {names}, ...)."
            )
    return rows


#: Bytes of one parameter piece per CPU thread in ``Regularizer.apply_`` with L1: the piece,
#: its sign and its gradient stay in the core's cache between the two passes over it.
_PIECE_BYTES_PER_THREAD = 1 << 21


#: Parameters up to this many elements take the foreach path in batches: their sign
#: temporaries are small allocations that the allocator hands back cache-hot.
_SMALL_ELEMENTS = 1 << 14


def _piece_elements() -> int:
    return (_PIECE_BYTES_PER_THREAD // 4) * max(1, torch.get_num_threads())


class Regularizer:
    """L1/L2 weight penalty over the parameters that should carry one.

    Penalty: ``R(w) = sum_i l1_i * sum|w_i| + l2_i * sum w_i^2`` over the included
    parameters ``w_i`` (Tikhonov / ridge for L2, lasso-style sparsity for L1), with
    gradient ``l1 * sign(w) + 2 * l2 * w`` (``sign(0) = 0``).

    Args:
        l1: default L1 strength (>= 0).
        l2: default L2 strength (>= 0). Note ``l2`` multiplies ``w^2``, so the gradient is
            ``2 * l2 * w``; ``weight_decay=wd`` of SGD corresponds to ``l2 = wd / 2``.
        exclude: categories ``"bias"``, ``"norm"`` (parameters of normalization layers,
            by module type), ``"embedding"`` (``nn.Embedding``/``EmbeddingBag``), and
            ``fnmatch`` patterns over parameter names such as ``"head.*"``.
        per_layer: parameter-name pattern -> ``(l1, l2)`` (or ``{"l1": .., "l2": ..}``)
            for the parameters it matches; later entries override earlier ones. It never
            re-includes an excluded parameter.

    Frozen parameters (``requires_grad=False``) are skipped. The resolved parameter lists
    are cached per model; call :meth:`clear_cache` after changing the model's parameters.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
        >>> reg = Regularizer(l2=1e-3)
        >>> [r["name"] for r in reg.report(model) if r["reason"] is None]
        ['0.weight', '2.weight']
        >>> loss = model(torch.randn(8, 4)).square().mean()
        >>> loss.backward()
        >>> reg.apply_(model)  # after backward, before clipping and optimizer.step()
    """

    def __init__(
        self,
        l1: float = 0.0,
        l2: float = 0.0,
        exclude: str | Iterable[str] = DEFAULT_EXCLUDE,
        per_layer: Mapping[str, Any] | None = None,
    ) -> None:
        self.l1 = _check_strength(l1, "l1")
        self.l2 = _check_strength(l2, "l2")
        self.exclude = _check_exclude(exclude)
        if per_layer is not None and not isinstance(per_layer, Mapping):
            raise TypeError(f"per_layer must be a mapping pattern -> (l1, l2), got {per_layer!r}.")
        self.per_layer: dict[str, tuple[float, float]] = {}
        for pat, value in (per_layer or {}).items():
            if not isinstance(pat, str) or not pat:
                raise TypeError(f"per_layer keys must be non-empty name patterns, got {pat!r}.")
            if isinstance(value, Mapping):
                unknown = set(value) - {"l1", "l2"}
                if unknown:
                    raise ValueError(
                        f"per_layer[{pat!r}] accepts the keys 'l1' and 'l2', got {sorted(unknown)}."
                    )
                value = (value.get("l1", 0.0), value.get("l2", 0.0))
            if (
                isinstance(value, (str, bytes))
                or not isinstance(value, Sequence)
                or len(value) != 2
            ):
                raise TypeError(f"per_layer[{pat!r}] must be a pair (l1, l2), got {value!r}.")
            self.per_layer[pat] = (
                _check_strength(value[0], f"per_layer[{pat!r}] l1"),
                _check_strength(value[1], f"per_layer[{pat!r}] l2"),
            )
        self._cache: weakref.WeakKeyDictionary[nn.Module, list[tuple[float, float, list]]]
        self._cache = weakref.WeakKeyDictionary()
        # CPU scratch for sign(w) in apply_, one per dtype, at most _piece_elements() long.
        self._sign_buffers: dict[torch.dtype, torch.Tensor] = {}

    def __repr__(self) -> str:
        return (
            f"Regularizer(l1={self.l1}, l2={self.l2}, exclude={list(self.exclude)}, "
            f"per_layer={self.per_layer or None})"
        )

    def report(self, model: nn.Module) -> list[dict[str, Any]]:
        """One row per parameter: ``name``, ``shape``, ``numel``, ``l1``, ``l2``, ``reason``.

        ``reason`` is None for a regularized parameter, else why it is skipped: ``"bias"``,
        ``"norm layer"``, ``"embedding"``, ``"pattern '...'"`` or ``"frozen"``.
        Raises ValueError for an ``exclude`` or ``per_layer`` pattern that matches nothing.
        """
        out: list[dict[str, Any]] = []
        for name, p, l1, l2, reason in self._resolve(model):
            if reason is None and not p.requires_grad:
                reason = "frozen"
            if reason is not None:
                l1, l2 = 0.0, 0.0
            row = {"name": name, "shape": list(p.shape), "numel": p.numel(), "l1": l1, "l2": l2}
            row["reason"] = reason
            out.append(row)
        return out

    def _resolve(
        self, model: nn.Module
    ) -> list[tuple[str, nn.Parameter, float, float, str | None]]:
        """``(name, param, l1, l2, exclusion_reason)`` per parameter, frozen or not."""
        out = []
        used: set[str] = set()
        for name, p, reason in _classify(model, self.exclude):
            l1, l2 = self.l1, self.l2
            for pat, strengths in self.per_layer.items():
                if fnmatchcase(name, pat):
                    used.add(pat)
                    if reason is None:
                        l1, l2 = strengths
            out.append((name, p, l1, l2, reason))
        for pat in self.per_layer:
            if pat not in used:
                raise ValueError(f"per_layer pattern {pat!r} matches no parameter of the model.")
            if all(row[4] is not None for row in out if fnmatchcase(row[0], pat)):
                raise ValueError(
                    f"per_layer pattern {pat!r} matches only excluded parameters; remove the "
                    "matching category or pattern from exclude to regularize them."
                )
        return out

    def _groups(self, model: nn.Module) -> list[tuple[float, float, list]]:
        """Included parameters (frozen ones too; filtered per call) grouped by strength."""
        key = unwrap(model)
        groups = self._cache.get(key)
        if groups is None:
            by_strength: dict[tuple[float, float], list[nn.Parameter]] = {}
            for _, p, l1, l2, reason in self._resolve(key):
                if reason is None and (l1 > 0 or l2 > 0):
                    by_strength.setdefault((l1, l2), []).append(p)
            groups = [(l1, l2, ps) for (l1, l2), ps in by_strength.items()]
            self._cache[key] = groups
        return groups

    def clear_cache(self) -> None:
        """Forget the resolved parameter lists (after adding or replacing parameters)."""
        self._cache = weakref.WeakKeyDictionary()

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """The differentiable scalar ``sum l1 * |w|_1 + l2 * |w|_2^2`` to add to the loss."""
        terms: list[torch.Tensor] = []
        for l1, l2, params in self._groups(model):
            ps = [p for p in params if p.requires_grad]
            if not ps:
                continue
            if l1 > 0:
                terms.append(l1 * torch.stack(torch._foreach_norm(ps, 1)).float().sum())
            if l2 > 0:
                terms.append(l2 * torch.stack(torch._foreach_norm(ps, 2)).float().square().sum())
        if not terms:
            first = next(unwrap(model).parameters(), None)
            return torch.zeros((), device=first.device if first is not None else None)
        return torch.stack([t.to(terms[0].device) for t in terms]).sum()

    @torch.no_grad()
    def apply_(self, model: nn.Module) -> None:
        """Add the penalty's gradient to ``.grad`` in place: ``g += l1 * sign(w) + 2 * l2 * w``.

        Call once per optimizer step, after ``backward()`` (after gradient accumulation and,
        with a ``GradScaler``, after ``scaler.unscale_(optimizer)``), before clipping. A
        parameter whose ``.grad`` is None gets one. Under DDP, call it on the wrapped model:
        the penalty gradient is the same on every rank, so it is added after the all-reduce.

        With ``l1 > 0`` on CPU, large parameters are processed in cache-sized pieces
        through one reused scratch buffer per dtype (512K elements per torch thread, 2 MiB
        of float32 each, kept by the regularizer); the result is the same as two
        whole-tensor passes. Not for concurrent calls from several threads on one
        regularizer.
        """
        for l1, l2, params in self._groups(model):
            ps = [p for p in params if p.requires_grad]
            for p in ps:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                elif p.grad.is_sparse:
                    raise ValueError(
                        "Regularizer.apply_ cannot add a dense penalty to a sparse gradient; "
                        "add 'embedding' to exclude or use a dense embedding."
                    )
            if not ps:
                continue
            grads = [p.grad for p in ps]
            if l1 > 0:
                self._add_l1_(ps, grads, l1, l2)
            elif l2 > 0:
                torch._foreach_add_(grads, ps, alpha=2.0 * l2)

    def _sign_buffer(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """The reused CPU scratch buffer for ``sign(w)`` of one dtype (at least ``numel``)."""
        buf = self._sign_buffers.get(dtype)
        if buf is None or buf.numel() < numel:
            buf = self._sign_buffers[dtype] = torch.empty(numel, dtype=dtype)
        return buf

    def _add_l1_(
        self, ps: list[nn.Parameter], grads: list[torch.Tensor], l1: float, l2: float
    ) -> None:
        """``g += 2 * l2 * w`` (if ``l2 > 0``) then ``g += l1 * sign(w)``, no big temporaries.

        ``torch._foreach_sign(ps)`` allocates a fresh temporary the size of every parameter
        at each call (on CPU a large one is mapped and page-faulted anew each time) and
        streams it through memory twice. Here a CPU parameter of more than
        ``_SMALL_ELEMENTS`` elements is cut into pieces of at most ``_piece_elements()``
        elements; each piece is signed into one reused buffer (``torch.sign(w, out=buf)``)
        and added while it is still in cache, so memory sees one read of ``w`` and one read
        and write of ``g`` (L1 and L2 in the same pass). Small parameters are batched up to
        the same size and go through the foreach ops (their temporaries are small,
        cache-resident allocations); so do all parameters on other devices (fused
        multi-tensor kernels; the caching allocator serves the temporaries). Every element
        gets the same operations in the same order as before: the result is identical.
        """
        limit = _piece_elements()
        numels = [w.numel() for w in ps]
        if max(numels) <= _SMALL_ELEMENTS and sum(numels) <= limit:  # all small: one batch
            self._add_l1_foreach_(ps, grads, l1, l2)
            return
        batch_w: list[torch.Tensor] = []
        batch_g: list[torch.Tensor] = []
        other_w: list[torch.Tensor] = []  # not on the CPU
        other_g: list[torch.Tensor] = []
        filled = 0
        for w, g, n in zip(ps, grads, numels, strict=True):
            if not w.is_cpu:
                other_w.append(w)
                other_g.append(g)
                continue
            if n <= _SMALL_ELEMENTS:
                if filled + n > limit:
                    self._add_l1_foreach_(batch_w, batch_g, l1, l2)
                    batch_w, batch_g, filled = [], [], 0
                batch_w.append(w)
                batch_g.append(g)
                filled += n
                continue
            if w.is_contiguous() and g.is_contiguous() and g.shape == w.shape:
                pieces = zip(w.view(-1).split(limit), g.view(-1).split(limit), strict=True)
            else:  # strided (channels_last, say): the tensor as one piece
                pieces = iter([(w, g)])
            buf = self._sign_buffer(w.dtype, limit)
            for wp, gp in pieces:
                k = wp.numel()
                if k > limit:  # a strided tensor larger than the buffer: a temporary
                    sign = torch.sign(wp)
                else:
                    sign = buf[:k].view(wp.shape)  # never resizes the shared buffer
                    torch.sign(wp, out=sign)
                if l2 > 0:
                    gp.add_(wp, alpha=2.0 * l2)
                gp.add_(sign, alpha=l1)
        if batch_w:
            self._add_l1_foreach_(batch_w, batch_g, l1, l2)
        if other_w:
            self._add_l1_foreach_(other_w, other_g, l1, l2)

    @staticmethod
    def _add_l1_foreach_(
        ps: list[torch.Tensor], grads: list[torch.Tensor], l1: float, l2: float
    ) -> None:
        if l2 > 0:
            torch._foreach_add_(grads, ps, alpha=2.0 * l2)
        torch._foreach_add_(grads, torch._foreach_sign(ps), alpha=l1)


def param_groups(
    model: nn.Module, weight_decay: float, exclude: str | Iterable[str] = DEFAULT_EXCLUDE
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for decoupled weight decay, skipping biases and norms.

    AdamW's update ``w <- w - lr * (adam_step + weight_decay * w)`` (Loshchilov & Hutter,
    2019) decays every weight at the same relative rate, unlike L2 in the loss, whose
    gradient Adam rescales per coordinate. The first group holds the parameters to decay,
    the second the excluded ones with ``weight_decay=0.0``; empty groups are left out.
    Frozen parameters are kept (the optimizer skips them while their grad is None).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        >>> groups = param_groups(model, weight_decay=0.01)
        >>> [(len(g["params"]), g["weight_decay"]) for g in groups]
        [(1, 0.01), (3, 0.0)]
        >>> opt = torch.optim.AdamW(groups, lr=1e-3)
    """
    wd = _check_strength(weight_decay, "weight_decay")
    rows = _classify(model, _check_exclude(exclude))
    decay = [p for _, p, reason in rows if reason is None]
    no_decay = [p for _, p, reason in rows if reason is not None]
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


@torch.no_grad()
def max_norm_(
    model: nn.Module,
    max_norm: float,
    exclude: str | Iterable[str] = DEFAULT_EXCLUDE,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Project each unit's incoming weight vector into the ball of radius ``max_norm``.

    For every included weight with at least 2 dimensions (Linear ``(out, in)``, Conv
    ``(out, in, *k)``), each slice ``w[i]`` along dim 0 becomes
    ``w[i] * min(1, max_norm / ||w[i]||_2)`` (Srivastava et al., 2014; like
    ``torch.renorm(w, 2, 0, max_norm)``). Call after ``optimizer.step()``. Biases and
    normalization parameters are skipped by default (same ``exclude`` as
    :class:`Regularizer`).

    Returns:
        The largest incoming-vector norm before the projection (a 0-dim tensor, no sync).

    Example:
        >>> layer = nn.Linear(3, 2)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[3.0, 4.0, 0.0], [0.3, 0.4, 0.0]]))
        >>> float(max_norm_(layer, max_norm=1.0))
        5.0
        >>> layer.weight.detach().norm(dim=1)
        tensor([1.0000, 0.5000])
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)):
        raise TypeError(f"max_norm must be a positive number, got {max_norm!r}.")
    if not math.isfinite(max_norm) or max_norm <= 0:
        raise ValueError(f"max_norm must be a finite number > 0, got {max_norm!r}.")
    weights = [
        p for _, p, r in _classify(model, _check_exclude(exclude)) if r is None and p.ndim >= 2
    ]
    if not weights:
        return torch.zeros(())
    largest: list[torch.Tensor] = []
    for w in weights:
        norms = torch.linalg.vector_norm(w.flatten(1).float(), dim=1)
        largest.append(norms.max())
        scale = (max_norm / norms.clamp_min(eps)).clamp_max(1.0)
        w.mul_(scale.to(w.dtype).view(-1, *([1] * (w.ndim - 1))))
    return torch.stack([t.to(largest[0].device) for t in largest]).max()
