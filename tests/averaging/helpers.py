"""Small nets, training steps and comparisons shared by the averaging tests."""

from __future__ import annotations

import torch
from torch import nn


def make_net(norm: str = "bn", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layer = {"bn": lambda: nn.BatchNorm1d(8), "ln": lambda: nn.LayerNorm(8)}.get(
        norm, lambda: nn.GroupNorm(2, 8)
    )()
    return nn.Sequential(nn.Linear(4, 8), layer, nn.ReLU(), nn.Linear(8, 3))


def train_steps(model: nn.Module, steps: int, on_step=None, seed: int = 1) -> None:
    """SGD on random data; ``on_step(i)`` after each optimizer step."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for i in range(steps):
        x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if on_step is not None:
            on_step(i)


def float_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def assert_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def _plain(obj) -> bool:
    """Only tensors, numbers, str, bool, None, lists and str-keyed dicts."""
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_plain(v) for v in obj)
    return obj is None or isinstance(obj, (torch.Tensor, int, float, str, bool))


def conv_bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.InstanceNorm2d(4, track_running_stats=True, affine=True),
        nn.Dropout(0.5),
        nn.Flatten(),
    )


def image_batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 3, 7, 7, generator=g) * 2 + 1, torch.zeros(8)) for _ in range(n)]


def bn_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
