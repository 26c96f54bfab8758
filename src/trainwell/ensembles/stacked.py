"""Batched forward pass of ensemble members of one architecture (used by ``Ensemble``).

The members' parameters and buffers are stacked on a new leading dimension once
(``torch.func.stack_module_state`` does the same) and an eval-mode copy of member 0 on the
meta device gives the architecture. The generic pass is
``vmap(functional_call(base, stacked_state, x))``. For ``nn.Sequential`` members, the
children run one by one on the stacked activations ``(members, batch, ...)``: ``Linear`` as
one ``baddbmm``, eval-mode ``BatchNorm`` as one affine map from the running statistics,
``LayerNorm`` as ``layer_norm`` then the stacked affine, element-wise activations and
dropout (identity in eval) directly, and any other child by ``vmap`` + ``functional_call``.
Parameter-free children before the first parameter run once, on the unstacked input.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

__all__ = ["StackedMembers", "architecture_problem"]

Step = Callable[[Tensor, bool], tuple[Tensor, bool]]  # (h, h has the member dim) -> same

_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.Tanh, nn.SiLU, nn.Sigmoid, nn.LeakyReLU, nn.ELU,
    nn.SELU, nn.CELU, nn.Softplus, nn.Mish, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)  # fmt: skip
# trainwell's own dropout modules are the identity in eval (named, not imported: the
# technique layer does not import its siblings).
_IDENTITY_IN_EVAL = (
    "trainwell.regularization.dropout.Dropout",
    "trainwell.regularization.dropout.DropPath",
)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_SIMPLE = (bool, int, float, str, tuple, type(None))


def _state(module: nn.Module) -> Iterable[Tensor]:
    return itertools.chain(module.parameters(), module.buffers())


def _signature(module: nn.Module) -> list:
    """Structure, hyperparameters, shapes, dtypes and devices: what must match to stack."""
    sig: list = []
    for name, m in module.named_modules():
        attrs = {
            k: v
            for k, v in vars(m).items()
            if not k.startswith("_") and k != "training" and isinstance(v, _SIMPLE)
        }
        sig.append((name, type(m), attrs))
    for name, t in itertools.chain(module.named_parameters(), module.named_buffers()):
        sig.append((name, tuple(t.shape), t.dtype, t.device))
    return sig


def architecture_problem(members: Sequence[nn.Module]) -> str | None:
    """Why the members cannot run as one batched pass, or None when they can.

    Example:
        >>> architecture_problem([nn.Linear(2, 3), nn.Linear(2, 3)]) is None
        True
        >>> architecture_problem([nn.Linear(2, 3), nn.Linear(2, 4)])
        'member 1 differs from member 0 (structure, hyperparameters, shapes, dtypes or devices)'
    """
    reference = _signature(members[0])
    for i, member in enumerate(members[1:], start=1):
        if _signature(member) != reference:
            return (
                f"member {i} differs from member 0 "
                "(structure, hyperparameters, shapes, dtypes or devices)"
            )
    for i, member in enumerate(members):
        for m in member.modules():
            if m._forward_hooks or m._forward_pre_hooks:
                return f"member {i} has forward hooks, which only the loop runs"
    return None


def _meta_copy(module: nn.Module) -> nn.Module:
    """An eval-mode deep copy whose parameters and buffers live on the meta device."""
    memo: dict[int, object] = {}
    for t in _state(module):
        meta = torch.empty_like(t, device="meta")
        is_param = isinstance(t, nn.Parameter)
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if is_param else meta
    return copy.deepcopy(module, memo).eval()


def _vmap_step(module: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor]) -> Step:
    def run(p: dict[str, Tensor], b: dict[str, Tensor], h: Tensor) -> Tensor:
        return functional_call(module, (p, b), (h,))

    if not params and not buffers:  # no state: vmap the module itself (half the overhead)
        per_member = vmap(module)

        def stateless(h: Tensor, has_members: bool) -> tuple[Tensor, bool]:
            if not has_members:  # the same for every member: run it once
                return module(h), False
            return per_member(h), True

        return stateless
    unbatched, batched = vmap(run, in_dims=(0, 0, None)), vmap(run, in_dims=(0, 0, 0))

    def step(h: Tensor, has_members: bool) -> tuple[Tensor, bool]:
        return (batched if has_members else unbatched)(params, buffers, h), True

    return step


def _linear_step(weight: Tensor, bias: Tensor | None) -> Step:
    wt = weight.transpose(1, 2)  # (members, in, out)
    b = None if bias is None else bias.unsqueeze(1)  # (members, 1, out)

    def step(h: Tensor, has_members: bool) -> tuple[Tensor, bool]:
        if not has_members:
            h = h.expand(wt.shape[0], *h.shape)
        shape = h.shape
        h3 = h.reshape(shape[0], -1, shape[-1])
        out = torch.bmm(h3, wt) if b is None else torch.baddbmm(b, h3, wt)
        return out.reshape(*shape[:-1], wt.shape[-1]), True

    return step


def _affine_step(
    scale: Tensor, shift: Tensor | None, norm: Callable[[Tensor], Tensor], trailing: bool
) -> Step:
    """``norm(h) * scale + shift`` with stacked ``(members, features...)`` scale and shift.

    The features sit on dim 2 of ``h`` (batch norm: ``norm`` is the identity and
    ``scale``/``shift`` fold the running statistics in) or are its last dims
    (``trailing``; layer norm: ``norm`` is ``layer_norm`` without affine).
    """
    features = scale.shape[1:]

    def step(h: Tensor, has_members: bool) -> tuple[Tensor, bool]:
        if not has_members:
            h = h.expand(scale.shape[0], *h.shape)
        h = norm(h)
        ones = [1] * (h.dim() - 1 - len(features))
        view = (
            (scale.shape[0], *ones, *features)
            if trailing
            else (scale.shape[0], 1, *features, *ones[1:])
        )
        if shift is None:
            return h * scale.view(view), True
        return torch.addcmul(shift.view(view), h, scale.view(view)), True

    return step


def _child_step(
    child: nn.Module, prefix: str, params: dict[str, Tensor], buffers: dict[str, Tensor]
) -> Step:
    own_p = {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}
    own_b = {k[len(prefix) :]: v for k, v in buffers.items() if k.startswith(prefix)}
    kind = type(child)
    if kind is nn.Linear:
        return _linear_step(own_p["weight"], own_p.get("bias"))
    if kind in _ELEMENTWISE:
        return lambda h, has_members: (child(h), has_members)
    if f"{kind.__module__}.{kind.__qualname__}" in _IDENTITY_IN_EVAL and not (own_p or own_b):
        return lambda h, has_members: (h, has_members)
    if kind in _BATCHNORM and child.track_running_stats and "running_mean" in own_b:
        inv_std = torch.rsqrt(own_b["running_var"] + child.eps)
        scale = inv_std if "weight" not in own_p else own_p["weight"] * inv_std
        shift = -own_b["running_mean"] * scale
        if "bias" in own_p:
            shift = shift + own_p["bias"]
        return _affine_step(scale, shift, lambda h: h, trailing=False)
    if kind is nn.LayerNorm and "weight" in own_p:
        shape, eps = tuple(child.normalized_shape), child.eps
        return _affine_step(
            own_p["weight"],
            own_p.get("bias"),
            lambda h: F.layer_norm(h, shape, None, None, eps),
            trailing=True,
        )
    return _vmap_step(child, own_p, own_b)


class StackedMembers:
    """Stacked parameters/buffers of same-architecture members and the plan that runs them.

    Example:
        >>> members = [nn.Sequential(nn.Linear(3, 4), nn.ReLU()) for _ in range(2)]
        >>> stacked = StackedMembers(members)
        >>> x = torch.randn(5, 3)
        >>> torch.allclose(stacked(x), torch.stack([m(x) for m in members]), atol=1e-6)
        True
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        self.ids = [id(m) for m in members]
        self.tensors = [t for m in members for t in _state(m)]
        self.key = self._key()
        self.size = len(members)
        with torch.no_grad():
            named_p = [dict(m.named_parameters()) for m in members]
            named_b = [dict(m.named_buffers()) for m in members]
            params = {k: torch.stack([d[k].detach() for d in named_p]) for k in named_p[0]}
            buffers = {k: torch.stack([d[k] for d in named_b]) for k in named_b[0]}
        base = _meta_copy(members[0])
        plain_sequential = isinstance(base, nn.Sequential) and (
            type(base).forward is nn.Sequential.forward
        )
        if plain_sequential:
            self.steps = [
                _child_step(child, f"{name}.", params, buffers)
                for name, child in base.named_children()
            ]
        else:
            self.steps = [_vmap_step(base, params, buffers)]

    def _key(self) -> list[tuple[int, int]]:
        return [(t._version, t.data_ptr()) for t in self.tensors]

    def current(self, members: Sequence[nn.Module]) -> bool:
        """Whether these are still the members stacked, unmodified and in place."""
        return [id(m) for m in members] == self.ids and self._key() == self.key

    def __call__(self, x: Tensor) -> Tensor:
        h, has_members = x, False
        for step in self.steps:
            h, has_members = step(h, has_members)
        if not isinstance(h, Tensor):
            raise TypeError(f"members must return a Tensor; got {type(h).__name__}.")
        return h if has_members else h.expand(self.size, *h.shape)
