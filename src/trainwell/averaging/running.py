"""Running weight averages during training: :class:`EMA` and :class:`SWA`.

Both keep a deep copy of the model (``.module``, in eval mode, no gradients) and update
it in place with ``torch._foreach_lerp_`` over (device, dtype) groups: no
``state_dict()`` rebuilt per update, no host-device sync, and the live model's tensor
lists are built once and reused while it holds the same tensors (checked by identity on
every update). The tensor rule is the one of
:mod:`trainwell.averaging.weights`: float parameters are averaged; float buffers are copied
from the live model (``buffers="copy"``) or averaged (``"average"``); integer and bool
buffers are always copied from the live model.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import math
import operator
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from trainwell.averaging.weights import (
    _averageable,
    _check_buffers,
    _group,
    _named_tensors,
    update_bn,
)
from trainwell.distributed import unwrap

__all__ = ["EMA", "SWA"]

_referents = gc.get_referents  # for a dict: its values, in order, in one C call


class _LiveView:
    """One live model's tensors as the averaged copy pairs them, cached between updates.

    Rebuilding ``[*model.parameters(), *model.buffers()]`` and the per-group lists costs
    more than the foreach lerp of a cache-resident model, so they are built once and
    reused while the model's tensors stay the same objects. That is checked on every
    update, at C speed: the values of every ``_parameters`` / ``_buffers`` / ``_modules``
    dict of every submodule (``gc.get_referents`` lists them, dict after dict) must be
    the same objects in the same order, and no non-empty dict may change its length (an
    object moved across the boundary of two adjacent dicts). An assigned parameter, a
    buffer replaced by ``.to()``, ``load_state_dict(assign=True)``, an added, deleted or
    swapped submodule or tensor all rebuild it. ``.to()`` keeps parameters (it sets
    ``.data``) and the pairs hold the parameters themselves, so they follow; a changed
    dtype or device is caught by :meth:`_Averager._live`.
    """

    __slots__ = ("ref", "dicts", "full", "lens", "vals", "live", "lerp", "copy")

    ref: weakref.ref | None  # the model as passed (a wrapper or not); None: not cacheable
    dicts: tuple[dict, ...]  # every submodule's three dicts
    full: list[dict]  # the non-empty ones, with their lengths
    lens: list[int]
    vals: list[Any]  # what gc.get_referents(*dicts) returned
    live: list[torch.Tensor]  # parameters then buffers, not detached (.data may change)
    lerp: list[tuple[list[torch.Tensor], list[torch.Tensor]]]  # (average, live) per group
    copy: tuple[list[torch.Tensor], list[torch.Tensor]]

    def current(self, model: nn.Module) -> bool:
        return (
            self.ref is not None
            and self.ref() is model
            and list(map(len, self.full)) == self.lens
            and len(probe := _referents(*self.dicts)) == len(self.vals)
            and all(map(operator.is_, probe, self.vals))
        )


def _forget(owner: weakref.ref, dead: weakref.ref) -> None:
    """Drop the cached view of a live model that was garbage-collected."""
    averager = owner()
    view = getattr(averager, "_view", None)
    if view is not None and view.ref is dead:
        averager._view = None  # type: ignore[union-attr]


class _Averager:
    """The averaged copy shared by :class:`EMA` and :class:`SWA` (not public)."""

    def __init__(
        self,
        model: nn.Module,
        buffers: str,
        device: torch.device | str | None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        _check_buffers(buffers)
        self.buffers = buffers
        self.module: nn.Module = copy.deepcopy(unwrap(model))
        if device is not None or dtype is not None:
            self.module.to(device=device, dtype=dtype)
        self.module.requires_grad_(False).eval()
        self.n_averaged = 0
        named = _named_tensors(self.module)
        self._names = [n for n, _, _ in named]
        self._avg = [t.detach() for _, t, _ in named]
        self._first = (self._avg[0].dtype, self._avg[0].device) if self._avg else None
        avg_idx = [
            j
            for j, (_, t, p) in enumerate(named)
            if _averageable(t) and (p or buffers == "average")
        ]
        chosen = set(avg_idx)
        self._avg_groups = _group(avg_idx, self._avg)
        self._copy_idx = [j for j in range(len(named)) if j not in chosen]
        # when the live model's device/dtype differs, convert its tensors on the way in
        live = [t for _, t, _ in _named_tensors(unwrap(model))]
        self._convert = any(
            a.device != b.device or a.dtype != b.dtype for a, b in zip(self._avg, live, strict=True)
        )
        self._view: _LiveView | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_view"] = None  # references to the live model: never pickled or deep-copied
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._view = None
        # deepcopy and pickle copy ``module`` and ``_avg`` (aliases of its tensors) apart:
        # alias the copy's module again, or updates would miss it
        self._avg = [t.detach() for _, t, _ in _named_tensors(self.module)]
        self._first = (self._avg[0].dtype, self._avg[0].device) if self._avg else None
        self._avg_groups = _group(sorted(j for g in self._avg_groups for j in g), self._avg)

    def _build_view(self, model: nn.Module) -> _LiveView:
        m = unwrap(model)
        live = [*m.parameters(), *m.buffers()]
        if len(live) != len(self._avg):
            raise ValueError(
                f"model has {len(live)} parameters and buffers, the average has "
                f"{len(self._avg)}: pass the model this average was built from"
            )
        view = _LiveView()
        view.live = live
        view.lerp = [([self._avg[j] for j in g], [live[j] for j in g]) for g in self._avg_groups]
        view.copy = ([self._avg[j] for j in self._copy_idx], [live[j] for j in self._copy_idx])
        view.ref = None
        dicts = [
            getattr(mod, name, None)
            for mod in m.modules()
            for name in ("_parameters", "_buffers", "_modules")
        ]
        if all(type(d) in (dict, OrderedDict) for d in dicts):  # else: rebuilt every update
            view.dicts = tuple(dicts)
            view.full = [d for d in dicts if d]
            view.lens = list(map(len, view.full))
            view.vals = _referents(*dicts)
            with contextlib.suppress(TypeError):  # a module that refuses weak references
                view.ref = weakref.ref(model, functools.partial(_forget, weakref.ref(self)))
        self._view = view
        return view

    def _live(self, model: nn.Module) -> _LiveView:
        """The cached view of ``model``, rebuilt when its tensors are no longer the same."""
        view = self._view
        if view is None or not view.current(model):
            view = self._build_view(model)
        first = self._first
        if first is not None and not self._convert:
            t = view.live[0]
            if t.dtype is not first[0] or t.device != first[1]:
                self._convert = True  # the live model moved (e.g. .cuda()) after this was built
        return view

    def _pull(self, avg: list[torch.Tensor], live: list[torch.Tensor]) -> list[torch.Tensor]:
        if self._convert:
            return [t.detach().to(a.device, a.dtype) for a, t in zip(avg, live, strict=True)]
        return live  # raw parameters: every caller runs with grad mode off

    def _copy_from(self, model: nn.Module, everything: bool) -> None:
        view = self._live(model)
        avg, live = (self._avg, view.live) if everything else view.copy
        if avg:
            with torch.no_grad():
                torch._foreach_copy_(avg, self._pull(avg, live))

    def _average_from(self, model: nn.Module, weight: float) -> None:
        """``avg += weight * (live - avg)`` on the averaged tensors, copy the rest.

        The per-update Python work is a few list identity checks (:class:`_LiveView`):
        no parameter traversal, no list building, no tensor math for the weight, no sync.
        """
        if self.n_averaged == 0:
            self._copy_from(model, everything=True)
            return
        view = self._live(model)
        grad = torch.is_grad_enabled()  # a plain toggle: torch.no_grad() costs ~1 us a call
        if grad:
            torch._C._set_grad_enabled(False)
        try:
            for avg, live in view.lerp:
                torch._foreach_lerp_(avg, self._pull(avg, live), weight)
            avg, live = view.copy
            if avg:
                torch._foreach_copy_(avg, self._pull(avg, live))
        finally:
            if grad:
                torch._C._set_grad_enabled(True)

    @contextlib.contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily copy the averaged weights into ``model``; restore them on exit.

        Yields the unwrapped live model. Costs one extra copy of the weights in memory.
        """
        live = [t.detach() for t in self._live(model).live]
        backup = [t.clone() for t in live]
        with torch.no_grad():
            torch._foreach_copy_(
                live, [a.to(t.device) for a, t in zip(self._avg, live, strict=True)]
            )
        try:
            yield unwrap(model)
        finally:
            with torch.no_grad():
                torch._foreach_copy_(live, backup)

    def _module_state(self) -> dict[str, torch.Tensor]:
        return dict(zip(self._names, self._avg, strict=True))

    @torch.no_grad()
    def _load_module_state(self, state: dict[str, Any]) -> None:
        for name in state:
            if name not in self._names:
                raise ValueError(f"state_dict['module'] has an unknown key {name!r}")
        for name, t in zip(self._names, self._avg, strict=True):
            if name not in state:
                raise ValueError(f"state_dict['module'] is missing key {name!r}")
            v = state[name]
            if not isinstance(v, torch.Tensor) or v.shape != t.shape:
                shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(
                    f"state_dict['module'] key {name!r} has shape {shape}, "
                    f"expected {tuple(t.shape)}"
                )
            t.copy_(v)

    @staticmethod
    def _require(state: dict[str, Any], keys: Sequence[str], owner: str) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"{owner} state_dict must be a dict, got {type(state).__name__}")
        for k in keys:
            if k not in state:
                raise ValueError(f"{owner} state_dict is missing key {k!r}")


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def swa_start_epoch(start: int | float, epochs: int | None = None) -> int:
    """The first epoch SWA averages: an int is that epoch; a float in (0, 1) is a fraction
    of ``epochs``, ``min(epochs - 1, max(1, round(start * epochs)))`` -- one epoch trained
    before averaging and at least the last one averaged, as the config's ``swa.start`` means.

    Example:
        >>> swa_start_epoch(3), swa_start_epoch(0.75, epochs=20), swa_start_epoch(0.01, epochs=20)
        (3, 15, 1)
    """
    if isinstance(start, float):
        if not 0 < start < 1:
            raise ValueError(
                f"start must be an epoch (an int >= 0) or a fraction of the epochs in (0, 1), "
                f"got {start!r}"
            )
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(
                f"start={start!r} is a fraction of the epochs: give epochs (an int >= 1), "
                f"got epochs={epochs!r}"
            )
        return min(epochs - 1, max(1, round(start * epochs)))
    return _check_int(start, "start", 0)


class EMA(_Averager):
    """Exponential moving average of a model's weights (Polyak averaging with decay).

    Call ``update(model)`` after every optimizer step. The first averaging update copies
    the weights; the k-th after it (k = 1, 2, ...) applies
    ``theta_ema <- d_k * theta_ema + (1 - d_k) * theta`` (a foreach lerp with weight
    ``1 - d_k``), the rule of ``AveragedModel`` with ``get_ema_multi_avg_fn``. Without
    warm-up ``d_k = decay``; with ``warmup=gamma`` ``d_k = min(decay, 1 - (1 + k / gamma)
    ** -warmup_power)`` (the warm-up of timm's ModelEmaV3; ``gamma=1, power=1`` makes
    the early average the equal-weight mean of the weights seen so far, so it is not
    dominated by the first ones; ``power=2/3`` or ``3/4`` is Karras et al.'s slower ramp).

    Args:
        model: the live model (a DDP or compiled wrapper is unwrapped).
        decay: the decay per averaging update, in [0, 1]. With ``update_every=n`` the
            average spans about ``n / (1 - decay)`` optimizer steps.
        warmup: False (none), True (``gamma=1``) or ``gamma > 0``.
        warmup_power: the power of the warm-up ramp, > 0.
        update_every: average on every n-th call of ``update`` only.
        start_step: calls before this step copy the live weights (no averaging yet).
        buffers: ``"copy"`` float buffers from the live model, or ``"average"`` them.
        device: keep the average on this device (e.g. ``"cpu"`` to save GPU memory).
        dtype: keep floating tensors of the average in this dtype (e.g. float32 for a
            bf16 model, whose 8-bit mantissa drops updates smaller than ~0.4%).

    Example:
        >>> net = nn.Linear(2, 1)
        >>> ema = EMA(net, decay=0.9)
        >>> with torch.no_grad():
        ...     _ = ema.update(net)  # first update: a copy
        ...     _ = net.weight.add_(1.0)
        ...     _ = ema.update(net)  # 0.9 * old + 0.1 * new
        >>> torch.allclose(ema.module.weight, net.weight - 0.9)
        True
        >>> with ema.swapped(net):  # evaluate the average in the live model
        ...     torch.equal(net.weight, ema.module.weight)
        True
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.999,
        *,
        warmup: bool | float = False,
        warmup_power: float = 1.0,
        update_every: int = 1,
        start_step: int = 0,
        buffers: str = "copy",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay <= 1:
            raise ValueError(f"decay must be a number in [0, 1], got {decay!r}")
        if warmup is True:
            warmup = 1.0
        if not isinstance(warmup, (int, float)) or not math.isfinite(warmup) or warmup < 0:
            raise ValueError(f"warmup must be False, True or a number gamma >= 0, got {warmup!r}")
        if not isinstance(warmup_power, (int, float)) or not warmup_power > 0:
            raise ValueError(f"warmup_power must be a number > 0, got {warmup_power!r}")
        self.decay = float(decay)
        self.warmup = float(warmup)
        self.warmup_power = float(warmup_power)
        self.update_every = _check_int(update_every, "update_every", 1)
        self.start_step = _check_int(start_step, "start_step", 0)
        self.step = 0
        super().__init__(model, buffers, device, dtype)

    def decay_at(self, k: int) -> float:
        """The decay ``d_k`` of the k-th averaging update after the initial copy."""
        if self.warmup == 0:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + k / self.warmup) ** -self.warmup_power)

    def update(self, model: nn.Module) -> bool:
        """Count one optimizer step and average it if due; True when it averaged."""
        step, self.step = self.step, self.step + 1
        if step < self.start_step:
            self._copy_from(model, everything=True)
            return False
        if (step - self.start_step) % self.update_every:
            return False
        n = self.n_averaged
        weight = 1.0 - (self.decay if self.warmup == 0 else self.decay_at(n))
        view, first = self._view, self._first
        # _average_from inlined for the common case, as this runs after every optimizer
        # step (at 1M parameters each Python call is ~1% of the update): an average
        # exists, the cached view still matches the model (_LiveView.current) and the
        # model did not move (_live)
        if (
            n == 0
            or self._convert
            or first is None
            or view is None
            or view.ref is None
            or view.ref() is not model
            or list(map(len, view.full)) != view.lens
            or len(probe := _referents(*view.dicts)) != len(view.vals)
            or not all(map(operator.is_, probe, view.vals))
            or view.live[0].dtype is not first[0]
            or view.live[0].device != first[1]
        ):
            self._average_from(model, weight)
        else:
            grad = torch.is_grad_enabled()
            if grad:
                torch._C._set_grad_enabled(False)
            try:
                for avg, live in view.lerp:
                    torch._foreach_lerp_(avg, live, weight)
                avg, live = view.copy
                if avg:
                    torch._foreach_copy_(avg, live)
            finally:
                if grad:
                    torch._C._set_grad_enabled(True)
        self.n_averaged = n + 1
        return True

    def state_dict(self) -> dict[str, Any]:
        """Counters and the averaged tensors (references, not copies)."""
        return {"step": self.step, "n_averaged": self.n_averaged, "module": self._module_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the options come from ``__init__``)."""
        self._require(state, ("step", "n_averaged", "module"), "EMA")
        self._load_module_state(state["module"])
        self.step, self.n_averaged = int(state["step"]), int(state["n_averaged"])


class SWA(_Averager):
    """Stochastic weight averaging (Izmailov et al. 2018, "Averaging Weights Leads to
    Wider Optima and Better Generalization").

    Call ``update(model, epoch)`` at the end of every epoch: from epoch ``start`` on it
    keeps the equal-weight running mean ``theta_swa <- theta_swa + (theta - theta_swa) /
    (n + 1)`` (the default rule of ``AveragedModel``) and, when given an optimizer and
    ``swa_lr``, steps a ``torch.optim.swa_utils.SWALR`` schedule that anneals the
    learning rate to ``swa_lr`` over ``anneal_epochs`` epochs (stop stepping your own
    scheduler while ``update`` returns True). Before ``start`` it copies the live
    weights. After training, :meth:`finalize` recomputes BatchNorm statistics.

    Args:
        model: the live model (a DDP or compiled wrapper is unwrapped).
        start: the first epoch that is averaged (an int >= 0), or a fraction of ``epochs``
            in (0, 1) as in the config (see :func:`swa_start_epoch`).
        optimizer: the optimizer whose learning rate SWALR anneals (needs ``swa_lr``).
        swa_lr: the constant SWA learning rate (> 0).
        anneal_epochs: epochs of the annealing to ``swa_lr`` (>= 0).
        anneal_strategy: ``"cos"`` or ``"linear"``.
        buffers: ``"copy"`` float buffers from the live model, or ``"average"`` them.
        device: keep the average on this device.
        dtype: keep floating tensors of the average in this dtype.
        epochs: the run's epochs; needed only when ``start`` is a fraction.

    Example:
        >>> net = nn.Linear(2, 1)
        >>> SWA(net, start=0.75, epochs=20).start
        15
        >>> swa = SWA(net, start=1)
        >>> w0 = net.weight.detach().clone()
        >>> swa.update(net, epoch=0)  # before start: not averaged
        False
        >>> with torch.no_grad():
        ...     _ = swa.update(net, epoch=1)
        ...     _ = net.weight.add_(2.0)
        ...     _ = swa.update(net, epoch=2)
        >>> swa.n_averaged, torch.allclose(swa.module.weight, w0 + 1.0)
        (2, True)
    """

    def __init__(
        self,
        model: nn.Module,
        start: int | float,
        optimizer: torch.optim.Optimizer | None = None,
        swa_lr: float | Sequence[float] | None = None,
        anneal_epochs: int = 10,
        anneal_strategy: str = "cos",
        *,
        buffers: str = "copy",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        epochs: int | None = None,
    ) -> None:
        self.start = swa_start_epoch(start, epochs)
        if (optimizer is None) != (swa_lr is None):
            raise ValueError(
                "optimizer and swa_lr go together: give both for the SWALR schedule or neither"
            )
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {optimizer!r}")
        lrs = [swa_lr] if isinstance(swa_lr, (int, float)) else list(swa_lr or [])
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in lrs):
            raise ValueError(f"swa_lr must be a number > 0 (or one per group), got {swa_lr!r}")
        self.anneal_epochs = _check_int(anneal_epochs, "anneal_epochs", 0)
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
        self.anneal_strategy = anneal_strategy
        self.optimizer, self.swa_lr = optimizer, swa_lr
        self.scheduler: torch.optim.swa_utils.SWALR | None = None
        self.last_epoch = -1
        super().__init__(model, buffers, device, dtype)

    def _make_scheduler(self) -> None:
        if self.optimizer is not None and self.scheduler is None:
            self.scheduler = torch.optim.swa_utils.SWALR(
                self.optimizer,
                swa_lr=self.swa_lr,  # type: ignore[arg-type]
                anneal_epochs=self.anneal_epochs,
                anneal_strategy=self.anneal_strategy,  # type: ignore[arg-type]
            )

    def update(self, model: nn.Module, epoch: int) -> bool:
        """At the end of ``epoch``: average (and step SWALR) if ``epoch >= start``.

        Returns True when it averaged. An epoch at or before the last averaged one is
        ignored (returns False), so a resumed run never averages an epoch twice.
        """
        epoch = _check_int(epoch, "epoch", 0)
        if epoch < self.start:
            self._copy_from(model, everything=True)
            return False
        if epoch <= self.last_epoch:
            return False
        self._average_from(model, 1.0 / (self.n_averaged + 1))
        self.n_averaged += 1
        self.last_epoch = epoch
        self._make_scheduler()
        if self.scheduler is not None:
            with warnings.catch_warnings():  # created lazily: its first step precedes opt.step
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
                self.scheduler.step()
        return True

    def finalize(self, loader: Any, forward: Any = None) -> int:
        """Recompute the average's BatchNorm statistics (:func:`update_bn`); batches seen."""
        return update_bn(self.module, loader, forward)

    def state_dict(self) -> dict[str, Any]:
        """Counters, the averaged tensors and the SWALR state (None before it exists)."""
        sched = None if self.scheduler is None else self.scheduler.state_dict()
        return {
            "n_averaged": self.n_averaged,
            "last_epoch": self.last_epoch,
            "module": self._module_state(),
            "scheduler": sched,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the options come from ``__init__``)."""
        self._require(state, ("n_averaged", "last_epoch", "module", "scheduler"), "SWA")
        self._load_module_state(state["module"])
        self.n_averaged, self.last_epoch = int(state["n_averaged"]), int(state["last_epoch"])
        if state["scheduler"] is not None:
            if self.optimizer is None:
                raise ValueError("SWA state holds a SWALR schedule but this SWA has no optimizer")
            self._make_scheduler()
            self.scheduler.load_state_dict(dict(state["scheduler"]))  # type: ignore[union-attr]
