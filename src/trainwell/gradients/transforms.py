"""Gradient transforms: clip by value, clip by global norm, skip non-finite steps, chain.

A gradient transform follows optax's idea on torch ``.grad``: an object with
``apply_(params) -> dict`` that changes the gradients in place and returns what
it measured, plus ``state_dict()`` / ``load_state_dict()``. ``chain(a, b, ...)``
applies transforms in order and merges their stats. Every transform accepts a
list (or any iterable) of parameters, or of ``(name, parameter)`` pairs such as
``model.named_parameters()``; parameters whose ``.grad`` is None are ignored.

Stats keys shared by all transforms: ``"grad_norm"`` (the global norm before
the transform changed anything, a 0-d tensor), ``"clipped"`` (0-d bool tensor
or bool) and ``"skip"`` (a Python bool: when True the loop must not call
``optimizer.step()``). Clipping transforms never read a tensor back to the host,
so on a GPU they add no device synchronization; only ``skip_nonfinite`` must
(its decision is a Python bool). Under AMP, apply transforms to *unscaled*
gradients: call ``scaler.unscale_(optimizer)`` first.

The adaptive transforms (``adaptive_clip``, ``auto_clip``, ``zscore_clip``)
live in :mod:`trainwell.gradients.adaptive`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from trainwell.distributed import any_rank

ParamsLike = Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | torch.Tensor

_COEF_EPS = 1e-6  # same guard as torch.nn.utils.clip_grad_norm_


class NonFiniteGradError(RuntimeError):
    """Raised by ``skip_nonfinite`` after too many consecutive non-finite gradients."""


def named_grads(
    params: ParamsLike, names: bool = True
) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor]]:
    """Names, parameters and gradients of the parameters that have a gradient.

    Accepts a tensor, an iterable of tensors, or of ``(name, tensor)`` pairs;
    unnamed parameters are called ``param[i]`` by their position.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2)); w.grad = torch.ones(2)
        >>> named_grads([w])[0]
        ['param[0]']
    """
    out: tuple[list[str], list[torch.Tensor], list[torch.Tensor]] = ([], [], [])
    for i, item in enumerate([params] if isinstance(params, torch.Tensor) else params):
        name, p = item if isinstance(item, tuple) else (None, item)
        if not isinstance(p, torch.Tensor):
            raise TypeError(
                f"params must hold tensors or (name, tensor) pairs, got {type(p).__name__}"
            )
        if p.grad is not None:
            if names:
                out[0].append(name if name is not None else f"param[{i}]")
            out[1].append(p)
            out[2].append(p.grad)
    return out


def _grads(params: ParamsLike) -> list[torch.Tensor]:
    return named_grads(params, names=False)[2]


def global_norm(grads: list[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all tensors seen as one vector (0-d tensor, no host sync).

    Example:
        >>> global_norm([torch.tensor([3.0]), torch.tensor([4.0])])
        tensor(5.)
    """
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads, norm_type)
    device = grads[0].device
    if any(n.device != device for n in norms):
        norms = [n.to(device) for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


def _check_norm_type(norm_type: float) -> float:
    if not isinstance(norm_type, int | float) or isinstance(norm_type, bool):
        raise TypeError(f"norm_type must be a number (e.g. 2.0 or inf), got {norm_type!r}")
    if not (norm_type > 0):
        raise ValueError(f"norm_type must be > 0 (e.g. 1, 2.0 or math.inf), got {norm_type!r}")
    return float(norm_type)


def _check_positive(name: str, value: float) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"{name} must be a positive number, got {value!r}")
    if not (value > 0) or math.isinf(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


@torch.no_grad()
def scale_grads_(grads: list[torch.Tensor], coef: torch.Tensor) -> None:
    """Multiply every gradient by a 0-d tensor ``coef`` in place (foreach, no host sync)."""
    if not grads:
        return
    device = grads[0].device
    if all(g.device == device for g in grads):
        torch._foreach_mul_(grads, coef.to(device))
    else:
        for g in grads:
            g.mul_(coef.to(g.device))


@torch.no_grad()
def clip_grad_norm_(params: ParamsLike, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Scale gradients so their global ``norm_type``-norm is at most ``max_norm``.

    Update rule: ``g <- g * min(1, max_norm / (||g|| + 1e-6))`` with ``||g||`` the
    norm of all gradients seen as one vector (Pascanu et al. 2013). Same result as
    ``torch.nn.utils.clip_grad_norm_``, with less Python overhead; no host sync.

    Returns:
        The global norm before clipping (0-d tensor).

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, 4.0])
        >>> clip_grad_norm_([w], 1.0)
        tensor(5.)
        >>> w.grad
        tensor([0.6000, 0.8000])
    """
    grads = _grads(params)
    total = global_norm(grads, norm_type)
    scale_grads_(grads, torch.clamp(max_norm / (total + _COEF_EPS), max=1.0))
    return total


@torch.no_grad()
def clip_grad_value_(params: ParamsLike, value: float) -> torch.Tensor:
    """Clamp every gradient element to ``[-value, value]`` in place.

    Same result as ``torch.nn.utils.clip_grad_value_``.

    Returns:
        The largest absolute gradient element before clipping (0-d tensor).

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([-3.0, 0.5])
        >>> clip_grad_value_([w], 1.0)
        tensor(3.)
        >>> w.grad
        tensor([-1.0000,  0.5000])
    """
    return _clip_value(_grads(params), _check_positive("value", value))


def _clip_value(grads: list[torch.Tensor], value: float) -> torch.Tensor:
    if not grads:
        return torch.zeros(())
    max_abs = global_norm(grads, math.inf)
    torch._foreach_clamp_min_(grads, -value)
    torch._foreach_clamp_max_(grads, value)
    return max_abs


class GradientTransform:
    """Base of gradient transforms: ``apply_(params) -> dict`` plus state round-trip."""

    def apply_(self, params: ParamsLike) -> dict[str, Any]:
        """Change ``.grad`` in place and return the stats measured (with ``"skip"``)."""
        raise NotImplementedError

    def __call__(self, params: ParamsLike) -> dict[str, Any]:
        return self.apply_(params)

    def state_dict(self) -> dict[str, Any]:
        """State that must survive a resume (empty for stateless transforms)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict()`` returned."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class ClipByValue(GradientTransform):
    """Clamp each gradient element to ``[-value, value]``; see :func:`clip_by_value`."""

    def __init__(self, value: float) -> None:
        self.value = _check_positive("value", value)

    def apply_(self, params: ParamsLike) -> dict[str, Any]:
        grads = _grads(params)
        with torch.no_grad():
            norm = global_norm(grads)
            max_abs = _clip_value(grads, self.value)
        return {"grad_norm": norm, "max_abs_grad": max_abs, "clipped": max_abs > self.value,
                "skip": False}  # fmt: skip


class ClipByNorm(GradientTransform):
    """Clip the global gradient norm; see :func:`clip_by_norm`."""

    def __init__(self, max_norm: float, norm_type: float = 2.0) -> None:
        self.max_norm = _check_positive("max_norm", max_norm)
        self.norm_type = _check_norm_type(norm_type)

    def apply_(self, params: ParamsLike) -> dict[str, Any]:
        grads = _grads(params)
        with torch.no_grad():
            total = global_norm(grads, self.norm_type)
            coef = torch.clamp(self.max_norm / (total + _COEF_EPS), max=1.0)
            scale_grads_(grads, coef)
        return {"grad_norm": total, "clip_coef": coef, "clipped": total > self.max_norm,
                "skip": False}  # fmt: skip


def any_nonfinite(grads: list[torch.Tensor]) -> torch.Tensor:
    """A bool tensor on ``grads[0]``'s device: True when any element is NaN or Inf.

    Dense floating gradients go through torch's fused AMP check
    (``_amp_foreach_non_finite_check_and_unscale_`` with a scale of exactly 1, so the
    values are unchanged), one kernel per device, about 25x faster on CPU than an
    inf-norm per tensor; any other (sparse: its coalesced values; complex) is checked
    on its own with ``isfinite``. No host sync: the caller reads the flag.
    """
    home = grads[0].device
    fused: dict[torch.device, list[torch.Tensor]] = {}
    flags = []
    for g in grads:
        if g.layout == torch.strided and g.is_floating_point():
            fused.setdefault(g.device, []).append(g)
        else:
            values = g.coalesce().values() if g.is_sparse else g
            flags.append((~torch.isfinite(values)).any().to(home).reshape(1))
    for device, group in fused.items():
        found = torch.zeros(1, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, found, torch.ones(1, device=device))
        flags.append(found.to(home).bool())
    return torch.cat(flags).any()


class SkipNonFinite(GradientTransform):
    """Zero non-finite gradients and ask the loop to skip the step; see :func:`skip_nonfinite`."""

    def __init__(self, max_consecutive: int | None = 10) -> None:
        if max_consecutive is not None and (
            not isinstance(max_consecutive, int) or max_consecutive < 0
        ):
            raise ValueError(
                f"max_consecutive must be an int >= 0 or None, got {max_consecutive!r}"
            )
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped = 0
        self.first_bad: list[str] = []

    def apply_(self, params: ParamsLike) -> dict[str, Any]:
        names, _, grads = named_grads(params)
        with torch.no_grad():
            # the one host sync: the skip decision
            local_bad = bool(any_nonfinite(grads)) if grads else False
            bad = any_rank(local_bad)  # every rank takes the same decision under DDP
            if not bad:
                self.consecutive = 0
                return {"nonfinite": False, "skip": False}
            if self.consecutive == 0:  # the first of a run of skips: name the culprits
                flags = [bool(torch.isfinite(g).all()) for g in grads]  # a rare, slow path
                bad_names = [n for n, ok in zip(names, flags, strict=True) if not ok]
                self.first_bad = bad_names if local_bad else ["(non-finite on another rank)"]
            if grads:
                torch._foreach_zero_(grads)
        self.consecutive += 1
        self.skipped += 1
        if self.max_consecutive is not None and self.consecutive > self.max_consecutive:
            shown = ", ".join(self.first_bad[:10]) + (" ..." if len(self.first_bad) > 10 else "")
            raise NonFiniteGradError(
                f"gradients were NaN/Inf for {self.consecutive} consecutive steps "
                f"(max_consecutive={self.max_consecutive}); the first non-finite parameters "
                f"were: {shown}. Lower the learning rate, check the loss and the inputs, "
                "or use a GradScaler for fp16."
            )
        return {"nonfinite": True, "skipped_steps": self.skipped, "skip": True}

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive": self.consecutive, "skipped": self.skipped,
                "first_bad": list(self.first_bad)}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.consecutive = int(state["consecutive"])
        self.skipped = int(state["skipped"])
        self.first_bad = [str(n) for n in state["first_bad"]]


class Chain(GradientTransform):
    """Transforms applied in order; see :func:`chain`."""

    def __init__(self, *transforms: GradientTransform) -> None:
        for t in transforms:
            if not callable(getattr(t, "apply_", None)):
                raise TypeError(
                    f"chain() takes gradient transforms (objects with apply_), got {t!r}"
                )
        self.transforms = list(transforms)

    def apply_(self, params: ParamsLike) -> dict[str, Any]:
        params = params if isinstance(params, torch.Tensor | list) else list(params)
        stats: dict[str, Any] = {"skip": False}
        for t in self.transforms:
            for key, value in t.apply_(params).items():
                if key == "skip":
                    stats["skip"] = stats["skip"] or bool(value)
                elif key != "grad_norm" or "grad_norm" not in stats:
                    stats[key] = value
            if stats["skip"]:
                break  # later transforms must not record a skipped step in their history
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {"transforms": [t.state_dict() for t in self.transforms]}

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        parts = state["transforms"] if isinstance(state, dict) else state
        if not isinstance(parts, list) or len(parts) != len(self.transforms):
            raise ValueError(
                f"state must hold one state per transform ({len(self.transforms)}), "
                f"got {len(parts) if isinstance(parts, list) else type(parts).__name__}"
            )
        for t, s in zip(self.transforms, parts, strict=True):
            t.load_state_dict(s)


def clip_by_value(value: float) -> ClipByValue:
    """Clamp each gradient element to ``[-value, value]``.

    Update rule: ``g_i <- clamp(g_i, -value, value)``. Stats: ``grad_norm`` (L2,
    before), ``max_abs_grad``, ``clipped``. Mirrors ``torch.nn.utils.clip_grad_value_``.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([-3.0, 0.5])
        >>> stats = clip_by_value(1.0).apply_([w])
        >>> w.grad, bool(stats["clipped"]), stats["skip"]
        (tensor([-1.0000,  0.5000]), True, False)
    """
    return ClipByValue(value)


def clip_by_norm(max_norm: float, norm_type: float = 2.0) -> ClipByNorm:
    """Clip the global gradient norm to ``max_norm`` (any p > 0, including ``math.inf``).

    Update rule: ``g <- g * min(1, max_norm / (||g||_p + 1e-6))`` (Pascanu et al. 2013,
    "On the difficulty of training recurrent neural networks"). Same numbers as
    ``torch.nn.utils.clip_grad_norm_``; foreach, no host sync. Stats: ``grad_norm``
    (before), ``clip_coef``, ``clipped``.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, 4.0])
        >>> stats = clip_by_norm(1.0).apply_([w])
        >>> stats["grad_norm"], w.grad
        (tensor(5.), tensor([0.6000, 0.8000]))
    """
    return ClipByNorm(max_norm, norm_type)


def skip_nonfinite(max_consecutive: int | None = 10) -> SkipNonFinite:
    """Guard against NaN/Inf gradients: zero them and report ``"skip": True``.

    When any gradient element is NaN or Inf (on any rank under DDP), every
    gradient is zeroed and the stats say ``skip``: the loop must not call
    ``optimizer.step()`` (with a GradScaler it still calls ``scaler.update()``,
    which lowers the scale). After more than ``max_consecutive`` skipped steps in
    a row it raises :class:`NonFiniteGradError` naming the parameters that went
    non-finite first (None: never raise). Put it first in a ``chain`` so that
    adaptive clippers never record a skipped step. Reads one bool back to the
    host per step (the decision itself).

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([float("nan"), 1.0])
        >>> guard = skip_nonfinite(max_consecutive=3)
        >>> guard.apply_([("w", w)])["skip"], w.grad, guard.first_bad
        (True, tensor([0., 0.]), ['w'])
    """
    return SkipNonFinite(max_consecutive)


def chain(*transforms: GradientTransform) -> Chain:
    """Apply transforms in order and merge their stats.

    Later transforms' keys win, except ``"skip"`` (OR-ed) and ``"grad_norm"``
    (the first one, i.e. the norm of the gradients as the loop produced them).
    Once a transform reports ``skip``, the remaining ones are not applied, so a
    skipped step never enters an adaptive clipper's history. The state is
    ``{"transforms": [state of each part]}``.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, 4.0])
        >>> t = chain(skip_nonfinite(), clip_by_value(3.5), clip_by_norm(1.0))
        >>> stats = t.apply_([w])
        >>> stats["grad_norm"], stats["skip"], w.grad
        (tensor(5.), False, tensor([0.6508, 0.7593]))
    """
    return Chain(*transforms)
