"""Gradient accumulation that gives exactly the gradient of the weighted mean loss.

The usual recipe, ``(loss / steps).backward()``, is right only when every
micro-batch holds the same number of items and every window is full. With
micro-batches of different sizes, a partial last window, or a token-level loss
whose number of non-padding targets varies per micro-batch (the bug Hugging Face
Transformers fixed across its trainer in late 2024), it weights some items more
than others. ``Accumulator`` weights each micro-batch by its item count and
divides once, at the end of the window, by the window's total:

    grad = sum_k w_k * grad(mean loss_k) / sum_k w_k

which is the gradient of the mean loss over every item of the window.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from trainwell.distributed import all_reduce_mean, is_distributed, maybe_no_sync, world_size

Weight = float | int | torch.Tensor


class Accumulator:
    """Accumulate micro-batch gradients into the exact weighted-mean gradient.

    ``backward(loss, weight, last)`` runs backward on ``loss * weight / w_0``
    (``w_0``: the window's first weight, which keeps the magnitudes of a plain
    mean loss, friendly to fp16 loss scaling; 1 under DDP so that ranks agree)
    and returns True when an optimizer step is due: after ``steps`` micro-batches,
    or at once when ``last=True`` (the partial last window of an epoch). At that
    moment ``.grad`` is divided by ``sum(w) / w_0`` (one foreach op), so it holds
    the gradient of the weighted mean loss over every item in the window.
    Gradients are cleared (set to None) at the start of each window, so no stale
    gradient leaks in.

    With a ``GradScaler`` the backward goes through ``scaler.scale``; call
    ``scaler.unscale_(optimizer)`` after a window is due, then clip and step.
    Under DDP every micro-step that does not complete the window must run under
    ``model.no_sync()``: one gradient all-reduce per optimizer step. DDP decides at
    *forward* time whether the next backward all-reduces, so wrap the forward too:
    ``with acc.no_sync(last=...): loss = loss_fn(model(x), y)``. DDP averages
    gradients over ranks; when ranks see different item counts the exact
    global weighted mean needs the global weight, so (``global_weight=True``)
    the window's weight is all-reduced once per step (one host sync) and the
    averaged gradient is divided by ``global_weight / world_size``; with
    ``global_weight=False`` each rank divides by its own weight (a mean of rank
    means, exact only when ranks hold equal counts).

    Example:
        >>> net = torch.nn.Linear(3, 1); acc = Accumulator(net, steps=2)
        >>> x, y = torch.randn(5, 3), torch.randn(5, 1)
        >>> mse = torch.nn.functional.mse_loss
        >>> acc.backward(mse(net(x[:2]), y[:2]), weight=2)
        False
        >>> acc.backward(mse(net(x[2:]), y[2:]), weight=3)
        True
        >>> full = torch.autograd.grad(mse(net(x), y), net.weight)[0]
        >>> torch.allclose(net.weight.grad, full, atol=1e-6)
        True
    """

    def __init__(
        self,
        model: torch.nn.Module,
        steps: int = 1,
        scaler: Any | None = None,
        global_weight: bool = True,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be an int >= 1 (micro-batches per step), got {steps!r}")
        if scaler is not None and not callable(getattr(scaler, "scale", None)):
            raise TypeError("scaler must be a torch.amp.GradScaler (with .scale) or None")
        self.model = model
        self.steps = steps
        self.scaler = scaler
        self.global_weight = global_weight
        self.micro_step = 0  # micro-batches in the current window
        self.optimizer_steps = 0  # windows completed
        self._ref: Weight = 1.0  # the window's first weight (w_0)
        self._total: Weight = 0.0  # sum of weights / w_0 in this window
        self._synced = True  # whether the last backward ran with gradient sync

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @staticmethod
    def _check_weight(weight: Weight) -> Weight:
        if isinstance(weight, torch.Tensor):
            if weight.numel() != 1:
                raise ValueError(
                    f"weight must be a number or a 1-element tensor, got {weight.shape}"
                )
            return weight.detach().reshape(())
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise TypeError(f"weight must be a number >= 0 or a tensor, got {weight!r}")
        if not weight >= 0:
            raise ValueError(f"weight must be >= 0 (items in the micro-batch), got {weight!r}")
        return float(weight)

    @staticmethod
    def _first_weight(weight: Weight) -> Weight:
        """w_0: 1 under DDP (ranks must agree), else the window's first positive weight."""
        if is_distributed():
            return 1.0
        if isinstance(weight, torch.Tensor):
            return weight.clamp(min=1.0)
        return weight if weight > 0 else 1.0

    def no_sync(self, last: bool = False) -> contextlib.AbstractContextManager:
        """Context for the next micro-batch's forward (and backward) pass.

        Under DDP it is ``model.no_sync()`` unless this micro-batch ends the window
        (``last=True`` or the window is full); elsewhere it does nothing.
        """
        due = last or self.micro_step + 1 >= self.steps
        return maybe_no_sync(self.model, skip_sync=not due)

    def backward(self, loss: torch.Tensor, weight: Weight = 1.0, last: bool = False) -> bool:
        """Backward one micro-batch whose ``loss`` is a mean over ``weight`` items.

        Args:
            loss: scalar tensor, the mean loss over the micro-batch's items.
            weight: number of items (samples, or non-padding tokens); a number or
                a 0-d tensor (kept on the device: no host sync).
            last: True for the last micro-batch of the epoch: the window ends here.

        Returns:
            True when an optimizer step is due (the gradients are then final).
        """
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("loss must be a scalar tensor: the mean loss over `weight` items")
        weight = self._check_weight(weight)
        if self.micro_step == 0:
            for p in self._params():
                p.grad = None
            self._ref = self._first_weight(weight)
            self._total = 0.0
        due = last or self.micro_step + 1 >= self.steps
        rel = weight / self._ref
        if isinstance(rel, torch.Tensor):
            rel = rel.to(loss.device)
        # a weight-0 micro-batch (all padding) adds nothing; skip its backward (and NaN risk)
        # unless DDP needs this rank to join the window's all-reduce
        if not (isinstance(weight, float) and weight == 0 and (not due or not is_distributed())):
            scaled = loss.reshape(()) * rel
            if self.scaler is not None:
                scaled = self.scaler.scale(scaled)
            with maybe_no_sync(self.model, skip_sync=not due):
                scaled.backward()
        self._synced = due or not isinstance(self.model, DDP)
        self._total = self._total + rel
        self.micro_step += 1
        if due:
            self._finish()
        return due

    def flush(self) -> bool:
        """End a partial window (for loops that did not pass ``last=True``).

        Returns True when there were gradients to step on. Under DDP every rank
        must call it; the gradients are all-reduced here when the last micro-step
        skipped the sync.
        """
        if self.micro_step == 0:
            return False
        if not self._synced and is_distributed():
            _all_reduce_grads_mean(self._params())
        self._finish()
        return True

    @torch.no_grad()
    def _finish(self) -> None:
        total = self._total
        if is_distributed() and self.global_weight:
            # DDP averaged the sums over ranks: divide by global weight / world size (w_0 = 1).
            total = all_reduce_mean({"w": float(total)})["w"]
        grads = [p.grad for p in self._params() if p.grad is not None]
        if grads:
            if isinstance(total, torch.Tensor):
                torch._foreach_div_(grads, total.to(grads[0].device))
            elif total > 0:
                torch._foreach_mul_(grads, 1.0 / total)
            else:
                torch._foreach_zero_(grads)
        self.micro_step = 0
        self._total = 0.0
        self._synced = True
        self.optimizer_steps += 1

    def state_dict(self) -> dict[str, Any]:
        """Counters; take checkpoints at window boundaries (gradients are not saved)."""
        return {"steps": self.steps, "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters; a new window starts."""
        if int(state["steps"]) != self.steps:
            raise ValueError(
                f"state was saved with steps={state['steps']} but this Accumulator has "
                f"steps={self.steps}; use the same accumulation steps to resume"
            )
        self.optimizer_steps = int(state["optimizer_steps"])
        self.micro_step = 0
        self._total = 0.0


def _all_reduce_grads_mean(params: list[torch.nn.Parameter]) -> None:
    """Average every gradient over ranks with one flat all-reduce per dtype/device."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # every rank must join the same collective
        groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for grads in groups.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world_size()
        torch._foreach_copy_(grads, [f.view_as(g) for f, g in zip(
            flat.split([g.numel() for g in grads]), grads, strict=True)])  # fmt: skip
