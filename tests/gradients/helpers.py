"""Parameters with planted gradients and comparisons shared by the gradient tests."""

from __future__ import annotations

import torch


def make_params(seed: int = 0, scale: float = 1.0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 4), (8,), (3, 2, 3, 3), (3,), (5, 8), ()]
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g))
        p.grad = torch.randn(s, generator=g) * scale
        params.append(p)
    return params


def grads_of(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad.clone() for p in params]


def assert_grads_close(a: list[torch.Tensor], b: list[torch.Tensor], tol: float = 1e-6) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)
