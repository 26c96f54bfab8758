"""Gradient monitoring: global and per-layer gradient norms, update-to-weight ratios, warnings.

``grad_norm`` and ``layer_grad_norms`` are pure functions (foreach, no host
sync). ``GradMonitor`` records them every ``every`` optimizer steps, together
with the update-to-weight ratio ``||W_after - W_before|| / ||W_before||`` of
each layer (a healthy ratio is around 1e-3 per step; Karpathy, "A Recipe for
Training Neural Networks", 2019), and warns once, clearly, about exploding
gradients (a norm far above its running median) and vanishing layers (a
layer's gradient norm near zero for a whole window of recorded steps).
"""

from __future__ import annotations

import logging
import math
import statistics
import warnings
from collections import deque
from collections.abc import Iterable
from typing import Any

import torch

from trainwell.distributed import unwrap

logger = logging.getLogger(__name__)


def _params_grads(params: Iterable[Any]) -> list[torch.Tensor]:
    out = []
    for item in [params] if isinstance(params, torch.Tensor) else params:
        p = item[1] if isinstance(item, tuple) else item
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params must hold tensors or (name, tensor) pairs, got {type(p)}")
        if p.grad is not None:
            out.append(p.grad)
    return out


@torch.no_grad()
def grad_norm(params: Iterable[Any] | torch.Tensor, norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all gradients seen as one vector, as a 0-d tensor (no host sync).

    ``params``: tensors or ``(name, tensor)`` pairs; missing gradients are skipped.
    Equals ``torch.nn.utils.get_total_norm`` of the gradients.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, 4.0])
        >>> grad_norm([w]), grad_norm([w], norm_type=math.inf)
        (tensor(5.), tensor(4.))
    """
    if not isinstance(norm_type, int | float) or not norm_type > 0:
        raise ValueError(
            f"norm_type must be a number > 0 (e.g. 2.0 or math.inf), got {norm_type!r}"
        )
    grads = _params_grads(params)
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads, float(norm_type))
    device = grads[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), float(norm_type))


def _layers(model: torch.nn.Module, by: str) -> tuple[list[str], list[torch.Tensor], list[int]]:
    """Names of the layers, trainable parameters, and each parameter's layer index."""
    if by not in ("module", "parameter"):
        raise ValueError(f"by must be 'module' or 'parameter', got {by!r}")
    names: list[str] = []
    params: list[torch.Tensor] = []
    owner: list[int] = []
    for mod_name, module in unwrap(model).named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            layer = full if by == "parameter" else (mod_name or "(root)")
            if not names or names[-1] != layer:
                names.append(layer)
            params.append(p)
            owner.append(len(names) - 1)
    return names, params, owner


def _grouped_norms(tensors: list[torch.Tensor], index: torch.Tensor, n: int) -> torch.Tensor:
    """L2 norm per group of tensors (one foreach norm + one scatter), in float32."""
    if not tensors:
        return torch.zeros(n)
    norms = torch.stack(torch._foreach_norm(tensors)).float()
    out = torch.zeros(n, device=norms.device)
    return out.index_add_(0, index.to(norms.device), norms * norms).sqrt_()


@torch.no_grad()
def layer_grad_norms(model: torch.nn.Module, by: str = "module") -> dict[str, torch.Tensor]:
    """L2 gradient norm per layer (``by="module"``) or per parameter (``by="parameter"``).

    A layer is a module with parameters of its own; parameters without a
    gradient count as zero. Values are 0-d tensors (one foreach norm, no host sync).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> net(torch.ones(1, 2)).sum().backward()
        >>> list(layer_grad_norms(net)), len(layer_grad_norms(net, by="parameter"))
        (['0', '1'], 4)
    """
    names, params, owner = _layers(model, by)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    norms = _grouped_norms(grads, torch.tensor(owner, dtype=torch.long), len(names))
    return dict(zip(names, norms.unbind(), strict=True))


class GradMonitor:
    """Record per-layer gradient norms and update-to-weight ratios; warn on trouble.

    Call ``before_step(step)`` after backward (and after ``scaler.unscale_``) and
    ``after_step(step)`` after ``optimizer.step()``. On steps where
    ``step % every == 0`` it appends one flat dict to ``history``: ``step``,
    ``grad_norm`` (global, L2), ``grad_norm/<layer>`` and ``update_ratio/<layer>``
    (``||dW|| / ||W||`` of that step; 0 if no step was taken; NaN for a zero W). Other steps
    cost nothing. Warnings (each issued once through ``warnings`` and logging, and
    kept in ``warnings``): a global norm above ``explode_factor`` times the
    median of the last ``window`` recorded norms; a layer whose gradient norm
    stayed below ``vanish_tol`` for ``window`` recorded steps in a row.
    State (``state_dict``) keeps the recent norms, the warnings and the recorded history,
    so a resumed run's history (``grad_norms.csv``) holds every row from before the resume.

    Example:
        >>> net = torch.nn.Linear(2, 1); opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> monitor = GradMonitor(net, every=1)
        >>> net(torch.ones(1, 2)).sum().backward()
        >>> monitor.before_step(0); opt.step(); monitor.after_step(0)
        >>> sorted(monitor.history[0])
        ['grad_norm', 'grad_norm/(root)', 'step', 'update_ratio/(root)']
    """

    def __init__(
        self,
        model: torch.nn.Module,
        every: int = 50,
        by: str = "module",
        window: int = 20,
        explode_factor: float = 10.0,
        vanish_tol: float = 1e-8,
    ) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be an int >= 1 (record every N steps), got {every!r}")
        if not isinstance(window, int) or window < 2:
            raise ValueError(f"window must be an int >= 2 (recorded steps), got {window!r}")
        if not explode_factor > 1:
            raise ValueError(f"explode_factor must be a number > 1, got {explode_factor!r}")
        self.every, self.window = every, window
        self.explode_factor, self.vanish_tol = float(explode_factor), float(vanish_tol)
        self.names, self._params, owner = _layers(model, by)
        device = self._params[0].device if self._params else None
        self._owner = torch.tensor(owner, dtype=torch.long, device=device)
        self.history: list[dict[str, float]] = []
        self.warnings: list[str] = []
        self._recent: deque[float] = deque(maxlen=window)
        self._small = [0] * len(self.names)  # consecutive recorded steps below vanish_tol
        self._warned: set[str] = set()
        self._snapshot: list[torch.Tensor] | None = None
        self._pending: tuple[int, torch.Tensor] | None = None

    @torch.no_grad()
    def before_step(self, step: int) -> None:
        """Measure the gradients (on recorded steps) and remember the weights."""
        if step % self.every:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        layer = _grouped_norms(grads, self._owner, len(self.names))
        if self._snapshot is None:
            self._snapshot = [p.detach().clone() for p in self._params]
        else:
            torch._foreach_copy_(self._snapshot, [p.detach() for p in self._params])
        self._pending = (step, layer)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Measure the update of a recorded step, append to ``history`` and check for trouble."""
        if self._pending is None or self._pending[0] != step or self._snapshot is None:
            return
        _, layer = self._pending
        self._pending = None
        delta = torch._foreach_sub([p.detach() for p in self._params], self._snapshot)
        n = len(self.names)
        upd = _grouped_norms(delta, self._owner, n)
        wts = _grouped_norms(self._snapshot, self._owner, n)
        ratio = torch.where(wts > 0, upd / wts, torch.full_like(upd, math.nan))
        values = torch.cat([layer.to(ratio.device), ratio]).tolist()  # the one host sync
        norms, ratios = values[:n], values[n:]
        total = math.sqrt(sum(v * v for v in norms))
        row: dict[str, float] = {"step": step, "grad_norm": total}
        row.update({f"grad_norm/{k}": v for k, v in zip(self.names, norms, strict=True)})
        row.update({f"update_ratio/{k}": v for k, v in zip(self.names, ratios, strict=True)})
        self.history.append(row)
        self._check(step, total, norms)

    def _check(self, step: int, total: float, norms: list[float]) -> None:
        if len(self._recent) >= self.window // 2:
            median = statistics.median(self._recent)
            if not math.isfinite(total) or (median > 0 and total > self.explode_factor * median):
                self._warn(
                    "explode",
                    f"GradMonitor: exploding gradients at step {step}: global gradient norm "
                    f"{total:.4g} is more than {self.explode_factor:g}x the running median "
                    f"{median:.4g} of the last {len(self._recent)} recorded steps. Consider "
                    "clip_by_norm/zscore_clip, a lower learning rate or warmup.",
                )
        if math.isfinite(total):
            self._recent.append(total)
        for i, (name, v) in enumerate(zip(self.names, norms, strict=True)):
            self._small[i] = self._small[i] + 1 if v < self.vanish_tol else 0
            if self._small[i] >= self.window:
                self._warn(
                    f"vanish:{name}",
                    f"GradMonitor: vanishing gradients in layer '{name}': its gradient norm "
                    f"stayed below {self.vanish_tol:g} for {self.window} recorded steps "
                    f"(up to step {step}). The layer is not learning (dead units, a detached "
                    "branch, or too deep without normalization/residuals).",
                )

    def _warn(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        self.warnings.append(message)
        logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def state_dict(self) -> dict[str, Any]:
        """The recent norms, the vanishing counters, the warnings issued and the history."""
        return {
            "recent": list(self._recent),
            "small": list(self._small),
            "warned": sorted(self._warned),
            "warnings": list(self.warnings),
            "history": [dict(row) for row in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict()`` returned (same model layout)."""
        if len(state["small"]) != len(self.names):
            raise ValueError(
                f"state has {len(state['small'])} layers but the model has {len(self.names)}"
            )
        self._recent = deque((float(v) for v in state["recent"]), maxlen=self.window)
        self._small = [int(v) for v in state["small"]]
        self._warned = set(state["warned"])
        self.warnings = [str(w) for w in state["warnings"]]
        self.history = [dict(row) for row in state.get("history", [])]
