"""Adaptive gradient clipping: unit-wise (AGC), percentile (AutoClip), z-score (ZClip).

A fixed clipping threshold is a guess. These transforms derive it from the
weights (AGC) or from the history of gradient norms (AutoClip, ZClip); that
history is state, so it survives a resume through ``state_dict()``. All of them
keep their state on the gradients' device and never read a tensor back to the
host: no device synchronization on a GPU. Transform protocol and stats keys as
in :mod:`trainwell.gradients.transforms`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from trainwell.gradients.transforms import (
    _COEF_EPS,
    GradientTransform,
    ParamsLike,
    _check_norm_type,
    _check_positive,
    _grads,
    global_norm,
    named_grads,
    scale_grads_,
)


class AdaptiveClip(GradientTransform):
    """Unit-wise adaptive gradient clipping; see :func:`adaptive_clip`."""

    def __init__(
        self,
        clipping: float = 0.01,
        eps: float = 1e-3,
        exclude_last: bool = False,
        exclude: tuple[torch.Tensor, ...] | list[torch.Tensor] = (),
    ) -> None:
        self.clipping = _check_positive("clipping", clipping)
        self.eps = _check_positive("eps", eps)
        if not isinstance(exclude_last, bool):
            raise TypeError(f"exclude_last must be True or False, got {exclude_last!r}")
        self.exclude_last = exclude_last
        self._exclude = {id(t) for t in exclude}
        self._plans: dict[tuple[int, ...], _Plan] = {}

    def _plan(self, ps: list[torch.Tensor]) -> _Plan:
        """Which parameters to clip, matrices first, with unit counts (cached per param list)."""
        key = tuple(map(id, ps))
        plan = self._plans.get(key)
        if plan is None:
            keep = [p for p in ps if id(p) not in self._exclude]
            if self.exclude_last:
                last = max((i for i, p in enumerate(keep) if p.ndim > 1), default=None)
                keep = keep if last is None else keep[:last]
            mats = [p for p in keep if p.ndim > 1]
            vecs = [p for p in keep if p.ndim <= 1]
            rows = [p.shape[0] for p in mats]
            views = [(r,) + (1,) * (p.ndim - 1) for p, r in zip(mats, rows, strict=True)]
            views += [() if p.ndim == 0 else None for p in vecs]  # 0-d: no broadcast
            plan = _Plan(mats, vecs, rows, rows + [1] * len(vecs), views, len(keep) == len(ps))
            self._plans = {key: plan}  # one parameter list at a time
        return plan

    def apply_(self, params: ParamsLike) -> dict[str, Any]:
        ps = named_grads(params, names=False)[1]
        plan = self._plan(ps)
        mats, vecs, rows = plan.mats, plan.vecs, plan.rows
        with torch.no_grad():
            if not mats and not vecs:
                norm = global_norm([p.grad for p in ps])
                return {"grad_norm": norm, "clipped": torch.zeros((), dtype=torch.bool),
                        "skip": False}  # fmt: skip
            grads = [p.grad for p in mats] + [p.grad for p in vecs]
            # one unit per output row of a matrix/filter; one per vector (a single foreach call)
            g_parts = [_row_norms(g, r) for g, r in zip(grads, rows)]  # noqa: B905 (vecs after)
            w_parts = [_row_norms(p, r) for p, r in zip(mats, rows, strict=True)]
            if vecs:
                vn = torch._foreach_norm(grads[len(mats) :] + vecs)
                vn = torch.stack(vn)
                vn = vn if vn.dtype in (torch.float32, torch.float64) else vn.float()
                g_parts.append(vn[: len(vecs)])
                w_parts.append(vn[len(vecs) :])
            both = torch.cat(g_parts + w_parts)
            g_norm, w_norm = both[: both.numel() // 2], both[both.numel() // 2 :]
            if plan.full:
                norm = torch.linalg.vector_norm(g_norm)  # sum of unit norms squared = global
            else:
                norm = global_norm([p.grad for p in ps])
            max_norm = w_norm.clamp_(min=self.eps).mul_(self.clipping)
            scale = max_norm.div_(g_norm.clamp(min=_COEF_EPS)).clamp_(max=1.0)
            pieces = scale.split(plan.sizes)
            pieces = [
                t if v is None else t.view(v) for t, v in zip(pieces, plan.views, strict=True)
            ]
            torch._foreach_mul_(grads, pieces)
        return {"grad_norm": norm, "clipped": (scale < 1.0).any(), "skip": False}


class _Plan(NamedTuple):
    mats: list[torch.Tensor]
    vecs: list[torch.Tensor]
    rows: list[int]
    sizes: list[int]
    views: list[tuple[int, ...] | None]
    full: bool


def _row_norms(t: torch.Tensor, rows: int) -> torch.Tensor:
    """L2 norm of each output unit of ``t`` (all dimensions but the first), in float32."""
    t = t.reshape(rows, -1)
    dtype = None if t.dtype in (torch.float32, torch.float64) else torch.float32
    return torch.linalg.vector_norm(t, dim=1, dtype=dtype)


def _as_iter(params: ParamsLike) -> Any:
    return [params] if isinstance(params, torch.Tensor) else params


def _check_finite_norm(norm: torch.Tensor) -> torch.Tensor:
    """The norm, or NaN when it is not finite (so it never enters a history)."""
    return torch.where(torch.isfinite(norm), norm, torch.full_like(norm, math.nan))


class AutoClip(GradientTransform):
    """Clip to a percentile of the gradient-norm history; see :func:`auto_clip`."""

    def __init__(
        self, percentile: float = 10.0, window: int | None = None, norm_type: float = 2.0
    ) -> None:
        if not isinstance(percentile, int | float) or not (0 < percentile <= 100):
            raise ValueError(f"percentile must be a number in (0, 100], got {percentile!r}")
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be None (all history) or an int >= 1, got {window!r}")
        self.percentile = float(percentile)
        self.window = window
        self.norm_type = _check_norm_type(norm_type)
        self.count = 0  # norms seen; the buffer holds the last min(count, window) of them
        self._buf: torch.Tensor | None = None

    def _push(self, value: torch.Tensor) -> torch.Tensor:
        """Record ``value``; return the history (a view, order irrelevant)."""
        cap = self.window or max(16, 2 * self.count)
        if self._buf is None or self._buf.device != value.device:
            old = self._buf
            self._buf = torch.full((cap,), math.nan, dtype=value.dtype, device=value.device)
            if old is not None:
                self._buf[: old.numel()] = old.to(value.device)
        elif self.window is None and self.count >= self._buf.numel():
            grown = torch.full((cap,), math.nan, dtype=value.dtype, device=value.device)
            grown[: self._buf.numel()] = self._buf
            self._buf = grown
        pos = self.count % self.window if self.window else self.count
        self._buf[pos] = value
        self.count += 1
        return self._buf[: min(self.count, self._buf.numel())]

    def apply_(self, params: ParamsLike) -> dict[str, Any]:
        grads = _grads(params)
        with torch.no_grad():
            norm = global_norm(grads, self.norm_type)
            history = self._push(_check_finite_norm(norm))
            threshold = torch.nanquantile(history, self.percentile / 100.0)
            threshold = torch.nan_to_num(threshold, nan=math.inf)  # no finite history yet
            coef = torch.clamp(threshold / (norm + _COEF_EPS), max=1.0)
            scale_grads_(grads, coef)
        return {"grad_norm": norm, "clip_threshold": threshold, "clipped": norm > threshold,
                "skip": False}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        n = 0 if self._buf is None else min(self.count, self._buf.numel())
        hist = torch.zeros(0) if self._buf is None else self._buf[:n].detach().cpu().clone()
        return {"count": self.count, "history": hist}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        hist = torch.as_tensor(state["history"])
        self.count = int(state["count"])
        cap = self.window or max(16, 2 * self.count)
        self._buf = torch.full((max(cap, hist.numel()),), math.nan, dtype=hist.dtype)
        self._buf[: hist.numel()] = hist


class ZScoreClip(GradientTransform):
    """Clip norms whose z-score against running statistics is too high; see :func:`zscore_clip`."""

    def __init__(
        self,
        z: float = 2.5,
        alpha: float = 0.97,
        warmup: int = 25,
        eps: float = 1e-6,
        norm_type: float = 2.0,
    ) -> None:
        self.z = _check_positive("z", z)
        if not isinstance(alpha, int | float) or not (0 < alpha < 1):
            raise ValueError(f"alpha must be a number in (0, 1), got {alpha!r}")
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1 (steps before clipping), got {warmup!r}")
        self.alpha = float(alpha)
        self.warmup = warmup
        self.eps = float(eps)
        self.norm_type = _check_norm_type(norm_type)
        self.count = 0
        self._buf: torch.Tensor | None = None  # the warmup norms
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None

    def apply_(self, params: ParamsLike) -> dict[str, Any]:
        grads = _grads(params)
        with torch.no_grad():
            norm = global_norm(grads, self.norm_type)
            value = _check_finite_norm(norm)
            if self.count < self.warmup:  # collect, do not clip
                if self._buf is None:
                    self._buf = torch.full((self.warmup,), math.nan, dtype=norm.dtype)
                self._buf = self._buf.to(norm.device)
                self._buf[self.count] = value
                self.count += 1
                if self.count == self.warmup:
                    self.mean = torch.nanmean(self._buf)
                    self.var = torch.nanmean((self._buf - self.mean) ** 2)
                false = torch.zeros((), dtype=torch.bool, device=norm.device)
                return {"grad_norm": norm, "clipped": false, "skip": False}
            assert self.mean is not None and self.var is not None
            mean, var = self.mean.to(norm.device), self.var.to(norm.device)
            std = var.sqrt()
            zscore = (norm - mean) / (std + self.eps)
            spike = zscore > self.z
            # ZClip's adaptive threshold: mean + z_thr * std / (z / z_thr)
            threshold = torch.where(spike, mean + self.z * self.z * std / zscore, norm)
            coef = torch.where(spike, threshold / (norm + _COEF_EPS), torch.ones_like(norm))
            scale_grads_(grads, coef.clamp(max=1.0))
            # update the running statistics with the clipped norm (finite norms only)
            new_mean = self.alpha * mean + (1 - self.alpha) * threshold
            new_var = self.alpha * var + (1 - self.alpha) * (threshold - new_mean) ** 2
            finite = torch.isfinite(value)
            self.mean = torch.where(finite, new_mean, mean)
            self.var = torch.where(finite, new_var, var)
            self.count += 1
        return {"grad_norm": norm, "zscore": zscore, "clipped": spike, "skip": False}

    def state_dict(self) -> dict[str, Any]:
        def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().cpu().clone()

        return {"count": self.count, "warmup_norms": cpu(self._buf), "mean": cpu(self.mean),
                "var": cpu(self.var)}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.count = int(state["count"])
        self._buf, self.mean, self.var = (
            None if state[k] is None else torch.as_tensor(state[k]).clone()
            for k in ("warmup_norms", "mean", "var")
        )


def adaptive_clip(
    clipping: float = 0.01,
    eps: float = 1e-3,
    exclude_last: bool = False,
    exclude: tuple[torch.Tensor, ...] | list[torch.Tensor] = (),
) -> AdaptiveClip:
    """Unit-wise adaptive gradient clipping (AGC; Brock et al. 2021, NFNets).

    For every unit ``i`` (a row of a weight matrix or conv filter, i.e. all
    dimensions but the first; a whole vector for biases and norm weights):
    ``g_i <- g_i * min(1, clipping * max(||W_i||, eps) / max(||g_i||, 1e-6))``.
    The paper leaves out the final classifier layer: ``exclude_last=True`` leaves
    out the last parameter with two or more dimensions and the parameters after
    it (its bias) — right when the classifier is the last layer registered;
    ``exclude`` names tensors to leave out explicitly. One fused pass over a
    flat buffer instead of a loop over parameters; no host sync.

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
        >>> w.grad = torch.tensor([[1.0, 0.0], [0.0, 0.001]])
        >>> _ = adaptive_clip(clipping=0.1).apply_([w])  # row 0: ||W||=5, max 0.5
        >>> w.grad
        tensor([[0.5000, 0.0000],
                [0.0000, 0.0010]])
    """
    return AdaptiveClip(clipping, eps, exclude_last, exclude)


def auto_clip(percentile: float = 10.0, window: int | None = None) -> AutoClip:
    """Clip the global norm to a percentile of its own history (AutoClip).

    Update rule (Seetharaman et al. 2020, "AutoClip: Adaptive Gradient Clipping
    for Source Separation Networks"): append ``||g||`` to the history ``h``, then
    ``g <- g * min(1, q_p(h) / (||g|| + 1e-6))`` with ``q_p`` the ``percentile``-th
    percentile (linear interpolation, as ``numpy.percentile``). ``window`` keeps
    only the last ``window`` norms (None: all; the percentile is then a sort of
    the whole history each step). Non-finite norms never enter the history.
    Stats: ``grad_norm``, ``clip_threshold``, ``clipped``.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(1))
        >>> clip = auto_clip(percentile=50.0)
        >>> for g in (1.0, 3.0, 10.0):
        ...     w.grad = torch.tensor([g]); stats = clip.apply_([w])
        >>> stats["clip_threshold"], w.grad  # median of [1, 3, 10]
        (tensor(3.), tensor([3.0000]))
    """
    return AutoClip(percentile, window)


def zscore_clip(z: float = 2.5, alpha: float = 0.97, warmup: int = 25) -> ZScoreClip:
    """Clip a norm whose z-score against running statistics exceeds ``z`` (ZClip).

    Update rule (Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM
    Pre-Training"): the first ``warmup`` norms are collected unclipped and give
    the initial mean ``mu`` and variance ``s2`` (population). Then, with
    ``z_t = (||g|| - mu) / (sqrt(s2) + 1e-6)``: if ``z_t > z`` the gradients are
    scaled to the norm ``c = mu + z**2 * sqrt(s2) / z_t`` (otherwise
    ``c = ||g||``), and the statistics follow the clipped norm:
    ``mu <- alpha*mu + (1-alpha)*c``; ``s2 <- alpha*s2 + (1-alpha)*(c - mu)**2``
    (with the new ``mu``). Non-finite norms leave the statistics unchanged.
    Stats: ``grad_norm``, ``zscore``, ``clipped``.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(1))
        >>> clip = zscore_clip(z=2.0, warmup=4)
        >>> for g in (1.0, 2.0, 1.0, 2.0, 50.0):
        ...     w.grad = torch.tensor([g]); stats = clip.apply_([w])
        >>> bool(stats["clipped"]), w.grad  # 1.5 + 4 * 0.5 / 97
        (True, tensor([1.5206]))
    """
    return ZScoreClip(z, alpha, warmup)
