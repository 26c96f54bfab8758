"""The step hook: what one batch means to the loop, to evaluation and to SWA's BN pass.

``fit()`` and ``evaluate()`` never unpack a batch themselves. Every batch is moved to the
device (:func:`to_device`) and handed to a *step*::

    step(model, batch, loss_fn) -> StepOutput(loss, outputs, targets, n_items)

``loss`` is the mean loss over the batch's ``n_items`` items (samples, or non-padding
tokens); the loop weights it by ``n_items`` for gradient accumulation (the exact weighted
mean of ``Accumulator``) and for the item-weighted mean ``train_loss`` / ``val_loss``.
``outputs`` and ``targets`` are what validation metrics see (concatenated over the
loader). A plain tuple of four is accepted in place of a :class:`StepOutput`.

:func:`supervised_step` is the default: the last element of a tuple or list batch is the
target and the others are the model's positional inputs, so ``(x, y)`` and ``(x1, x2, y)``
need no hook. For anything else (a dict batch, a token model whose loss ignores padding,
a model returning a structure) pass your own ``step``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["Step", "StepOutput", "as_step_output", "supervised_step", "to_device"]


class StepOutput(NamedTuple):
    """What a step returns for one batch.

    Attributes:
        loss: scalar tensor, the mean loss over the batch's ``n_items`` items (with grad
            in training).
        outputs: the model's outputs (what validation metrics receive, concatenated).
        targets: the targets (concatenated for validation metrics when tensors).
        n_items: how many items ``loss`` is a mean over: a Python int (no host sync) or a
            0-d tensor kept on the device (e.g. the count of non-padding tokens).
    """

    loss: Tensor
    outputs: Tensor
    targets: Any
    n_items: int | Tensor


#: the hook's type: ``step(model, batch, loss_fn) -> StepOutput`` (or a tuple of four)
Step = Callable[[nn.Module, Any, Callable[..., Tensor]], Any]


def to_device(batch: Any, device: torch.device | str) -> Any:
    """Move every tensor inside ``batch`` to ``device`` (``non_blocking=True``).

    Tuples, lists, dicts (any mapping) and namedtuples are walked recursively and rebuilt
    with the same type (a mapping that cannot be rebuilt from a dict becomes a dict);
    anything else (strings, numbers, None) is returned as it is.

    Example:
        >>> batch = {"x": torch.zeros(2, 3), "meta": ("id", [torch.ones(2)])}
        >>> moved = to_device(batch, "cpu")
        >>> moved["x"].device.type, moved["meta"][0]
        ('cpu', 'id')
    """
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, tuple):
        items = [to_device(b, device) for b in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else tuple(items)
    if isinstance(batch, list):
        return [to_device(b, device) for b in batch]
    if isinstance(batch, Mapping):
        moved = {k: to_device(v, device) for k, v in batch.items()}
        if type(batch) is dict:
            return moved
        try:
            return type(batch)(moved)
        except TypeError:
            return moved
    return batch


def _describe(batch: Any) -> str:
    if isinstance(batch, Tensor):
        return f"a bare tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return f"a {type(batch).__name__} with keys {sorted(map(str, batch))}"
    if isinstance(batch, tuple | list):
        return f"a {type(batch).__name__} of length {len(batch)}"
    return f"a {type(batch).__name__}"


def supervised_step(
    model: nn.Module, batch: Any, loss_fn: Callable[[Any, Any], Tensor]
) -> StepOutput:
    """The default step: ``batch = (*inputs, targets)``, ``loss = loss_fn(model(*inputs),
    targets)``, ``n_items = len(targets)``.

    A tuple or list batch of length >= 2 is split into the model's positional inputs
    ``batch[:-1]`` and the targets ``batch[-1]``; ``loss_fn`` must return the mean over the
    batch's ``len(targets)`` samples (the reduction of every torch loss by default).

    Args:
        model: the model.
        batch: a tuple or list ``(x, y)`` or ``(x1, x2, ..., y)``, already on the device.
        loss_fn: ``loss_fn(outputs, targets)``, a mean over the batch.

    Returns:
        ``StepOutput(loss, outputs, targets, len(targets))``.

    Raises:
        TypeError: the batch is not a tuple or list of at least two elements (a dict, a
            bare tensor, ...): pass ``fit(step=...)`` for it.

    Example:
        >>> import torch.nn.functional as F
        >>> net = nn.Bilinear(2, 3, 1)  # two inputs
        >>> out = supervised_step(net, (torch.ones(4, 2), torch.ones(4, 3), torch.zeros(4, 1)),
        ...                       F.mse_loss)
        >>> out.outputs.shape, out.n_items
        (torch.Size([4, 1]), 4)
        >>> supervised_step(net, {"x": torch.ones(4, 2)}, F.mse_loss)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: supervised_step expects a tuple or list batch (*inputs, targets) of ...
    """
    if not isinstance(batch, tuple | list) or len(batch) < 2:
        raise TypeError(
            "supervised_step expects a tuple or list batch (*inputs, targets) of length >= 2, "
            f"got {_describe(batch)}; pass fit(step=...) a callable "
            "step(model, batch, loss_fn) -> StepOutput (or set [task] step = "
            '"module:function" in a config) to say how to run such a batch.'
        )
    *inputs, targets = batch
    outputs = model(*inputs)
    return StepOutput(loss_fn(outputs, targets), outputs, targets, len(targets))


def as_step_output(value: Any) -> StepOutput:
    """A step's return value as a :class:`StepOutput` (a plain tuple of four is accepted).

    Example:
        >>> as_step_output((torch.tensor(0.5), torch.zeros(2), torch.ones(2), 2)).n_items
        2
    """
    if isinstance(value, StepOutput):
        return value
    if isinstance(value, tuple) and len(value) == 4:
        return StepOutput(*value)
    raise TypeError(
        "a step must return StepOutput(loss, outputs, targets, n_items) or a tuple of those "
        f"four, got {type(value).__name__}"
        + (f" of length {len(value)}" if isinstance(value, tuple | list) else "")
    )
