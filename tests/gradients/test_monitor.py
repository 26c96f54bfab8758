"""Tests for trainwell.gradients.monitor: norms against torch, GradMonitor records and warnings."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from trainwell.gradients.monitor import GradMonitor, grad_norm, layer_grad_norms


def mlp(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
        torch.nn.Linear(8, 3),
    )  # fmt: skip


def backward(net: torch.nn.Module, seed: int = 0, scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    (torch.nn.functional.cross_entropy(net(x), y) * scale).backward()


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
def test_grad_norm_matches_torch(norm_type: float) -> None:
    net = mlp()
    backward(net)
    grads = [p.grad for p in net.parameters()]
    expected = torch.nn.utils.get_total_norm(grads, norm_type)
    torch.testing.assert_close(grad_norm(net.parameters(), norm_type), expected)
    torch.testing.assert_close(grad_norm(net.named_parameters(), norm_type), expected)


def test_layer_grad_norms_by_module_and_parameter() -> None:
    net = mlp()
    backward(net)
    by_param = layer_grad_norms(net, by="parameter")
    assert list(by_param) == [n for n, _ in net.named_parameters()]
    for name, p in net.named_parameters():
        torch.testing.assert_close(by_param[name], p.grad.norm())
    by_module = layer_grad_norms(net)
    assert list(by_module) == ["0", "2", "4"]
    for name in by_module:
        m = net.get_submodule(name)
        expected = torch.sqrt(m.weight.grad.norm() ** 2 + m.bias.grad.norm() ** 2)
        torch.testing.assert_close(by_module[name], expected)


def train(monitor: GradMonitor, net: torch.nn.Module, steps: int, lr: float = 0.1) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for step in range(steps):
        opt.zero_grad()
        backward(net, seed=step)
        monitor.before_step(step)
        opt.step()
        monitor.after_step(step)


def test_records_every_n_steps_with_update_ratio() -> None:
    net = mlp()
    monitor = GradMonitor(net, every=3)
    # reference: recompute what one recorded SGD step gives, by hand
    ref = mlp()
    backward(ref, seed=0)
    w0 = {n: p.detach().clone() for n, p in ref.named_parameters()}
    g0 = {n: p.grad.clone() for n, p in ref.named_parameters()}
    train(monitor, net, steps=10, lr=0.1)
    assert [row["step"] for row in monitor.history] == [0, 3, 6, 9]
    row = monitor.history[0]
    for layer in ("0", "2", "4"):
        gw, gb = g0[f"{layer}.weight"], g0[f"{layer}.bias"]
        g_norm = math.sqrt(gw.norm() ** 2 + gb.norm() ** 2)
        w_norm = math.sqrt(w0[f"{layer}.weight"].norm() ** 2 + w0[f"{layer}.bias"].norm() ** 2)
        assert row[f"grad_norm/{layer}"] == pytest.approx(g_norm, rel=1e-5)
        assert row[f"update_ratio/{layer}"] == pytest.approx(0.1 * g_norm / w_norm, rel=1e-4)
    total = math.sqrt(sum(float(g.norm()) ** 2 for g in g0.values()))
    assert row["grad_norm"] == pytest.approx(total, rel=1e-5)


def test_skipped_step_has_zero_update() -> None:
    net = mlp()
    monitor = GradMonitor(net, every=1)
    backward(net)
    monitor.before_step(0)
    monitor.after_step(0)  # no optimizer.step(): nothing changed
    assert monitor.history[0]["update_ratio/0"] == 0.0


def test_warns_once_on_exploding_gradients() -> None:
    net = mlp()
    monitor = GradMonitor(net, every=1, window=10)
    for step in range(12):
        scale = 1000.0 if step in (8, 10) else 1.0
        net.zero_grad()
        backward(net, seed=step, scale=scale)
        if step == 8:
            with pytest.warns(RuntimeWarning, match="exploding gradients at step 8"):
                monitor.before_step(step)
                monitor.after_step(step)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no other warning, not even on step 10
                monitor.before_step(step)
                monitor.after_step(step)
    assert len(monitor.warnings) == 1 and "median" in monitor.warnings[0]


def test_warns_once_on_vanishing_layer() -> None:
    net = mlp()
    with torch.no_grad():
        net[2].weight.zero_()  # layer "0" gets no gradient through the zeroed layer 2
    monitor = GradMonitor(net, every=2, window=3)
    with pytest.warns(RuntimeWarning, match="vanishing gradients in layer '0'"):
        train(monitor, net, steps=12, lr=0.0)
    assert len(monitor.warnings) == 1
    assert [r["step"] for r in monitor.history] == [0, 2, 4, 6, 8, 10]


def test_state_round_trip() -> None:
    net = mlp()
    first = GradMonitor(net, every=1, window=4)
    train(first, net, steps=5)
    second = GradMonitor(net, every=1, window=4)
    second.load_state_dict(first.state_dict())
    assert second.state_dict() == first.state_dict()
    with pytest.raises(ValueError, match="layers"):
        GradMonitor(torch.nn.Linear(2, 2)).load_state_dict(first.state_dict())


def test_bad_arguments() -> None:
    net = mlp()
    with pytest.raises(ValueError, match="every must be an int >= 1"):
        GradMonitor(net, every=0)
    with pytest.raises(ValueError, match="window must be an int >= 2"):
        GradMonitor(net, window=1)
    with pytest.raises(ValueError, match="explode_factor must be a number > 1"):
        GradMonitor(net, explode_factor=0.5)
    with pytest.raises(ValueError, match="by must be 'module' or 'parameter'"):
        layer_grad_norms(net, by="layer")
    with pytest.raises(ValueError, match="norm_type must be a number > 0"):
        grad_norm(net.parameters(), norm_type=0)
