"""Tests for trainwell.gradients.adaptive (AGC, AutoClip, ZClip) against references."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from tests.gradients.helpers import assert_grads_close, grads_of, make_params
from trainwell.gradients.adaptive import adaptive_clip, auto_clip, zscore_clip
from trainwell.gradients.transforms import (
    chain,
    skip_nonfinite,
)


def agc_reference(params, clipping: float, eps: float) -> list[torch.Tensor]:
    """Per-parameter AGC as written in the NFNets paper (and timm)."""
    out = []
    for p in params:
        g = p.grad
        if p.ndim > 1:
            dims = tuple(range(1, p.ndim))
            w_n = torch.linalg.vector_norm(p.detach(), dim=dims, keepdim=True)
            g_n = torch.linalg.vector_norm(g, dim=dims, keepdim=True)
        else:
            w_n, g_n = p.detach().norm(), g.norm()
        max_n = w_n.clamp(min=eps) * clipping
        out.append(torch.where(g_n > max_n, g * max_n / g_n.clamp(min=1e-6), g))
    return out


@pytest.mark.parametrize("clipping", [0.01, 0.3, 100.0])
def test_adaptive_clip_matches_hand_computation(clipping: float) -> None:
    params = make_params(3)
    params[1].data.zero_()  # a zero vector: eps decides its threshold
    expected = agc_reference(params, clipping, 1e-3)
    total = torch.sqrt(sum(p.grad.pow(2).sum() for p in params))
    stats = adaptive_clip(clipping=clipping).apply_(params)
    assert_grads_close(grads_of(params), expected, tol=1e-5)
    torch.testing.assert_close(stats["grad_norm"], total)
    originals = grads_of(make_params(3))
    changed = any(not torch.equal(e, g) for e, g in zip(expected, originals, strict=True))
    assert bool(stats["clipped"]) == changed


def test_adaptive_clip_excludes_final_layer() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    net(torch.randn(7, 4)).pow(2).sum().mul(100).backward()
    before = [p.grad.clone() for p in net.parameters()]
    expected = agc_reference(list(net.parameters()), 0.01, 1e-3)
    stats = adaptive_clip(0.01, exclude_last=True).apply_(list(net.parameters()))
    got = [p.grad for p in net.parameters()]
    assert_grads_close(got[:2], expected[:2], tol=1e-5)
    assert_grads_close(got[2:], before[2:], tol=0)  # classifier untouched
    # grad_norm still covers every gradient
    torch.testing.assert_close(stats["grad_norm"], torch.sqrt(sum(g.pow(2).sum() for g in before)))
    explicit = copy.deepcopy(net)
    for p, g in zip(explicit.parameters(), before, strict=True):
        p.grad = g.clone()
    adaptive_clip(0.01, exclude=[explicit[2].weight]).apply_(list(explicit.parameters()))
    assert torch.equal(explicit[2].weight.grad, before[2])
    assert not torch.equal(explicit[2].bias.grad, before[3])


def test_auto_clip_matches_percentile_of_history() -> None:
    w = torch.nn.Parameter(torch.zeros(3))
    norms = [1.0, 5.0, 2.0, 8.0, 3.0, 40.0, 0.5]
    for window in (None, 3):
        clip = auto_clip(percentile=25.0, window=window)
        history: list[float] = []
        for n in norms:
            w.grad = torch.tensor([n, 0.0, 0.0])
            stats = clip.apply_([w])
            history.append(n)
            kept = history if window is None else history[-window:]
            threshold = float(np.percentile(kept, 25.0))
            expected = n * min(1.0, threshold / (n + 1e-6))
            assert float(w.grad[0]) == pytest.approx(expected, rel=1e-6)
            assert float(stats["clip_threshold"]) == pytest.approx(threshold, rel=1e-6)
            assert bool(stats["clipped"]) == (threshold < n)


def test_auto_clip_ignores_nonfinite_and_grows_history() -> None:
    w = torch.nn.Parameter(torch.zeros(1))
    clip = auto_clip(percentile=50.0)
    for i in range(40):  # past the initial capacity
        w.grad = torch.tensor([float(i + 1)])
        clip.apply_([w])
    w.grad = torch.tensor([math.inf])
    clip.apply_([w])
    w.grad = torch.tensor([100.0])
    stats = clip.apply_([w])
    assert float(stats["clip_threshold"]) == pytest.approx(
        np.percentile(list(range(1, 41)) + [100], 50)
    )


def zclip_reference(norms: list[float], z: float, alpha: float, warmup: int) -> list[float]:
    """ZClip in plain Python floats (Kumar et al. 2025): the clipped norm of each step."""
    out, buf, mean, var = [], [], 0.0, 0.0
    for g in norms:
        if len(buf) < warmup:
            buf.append(g)
            if len(buf) == warmup:
                mean = sum(buf) / warmup
                var = sum((x - mean) ** 2 for x in buf) / warmup
            out.append(g)
            continue
        std = var**0.5
        zt = (g - mean) / (std + 1e-6)
        c = mean + z * z * std / zt if zt > z else g
        out.append(g * min(1.0, c / (g + 1e-6)) if zt > z else g)
        mean = alpha * mean + (1 - alpha) * c
        var = alpha * var + (1 - alpha) * (c - mean) ** 2
    return out


def test_zscore_clip_matches_reference() -> None:
    rng = np.random.default_rng(0)
    norms = list(1.0 + 0.1 * rng.standard_normal(40))
    norms[10], norms[25], norms[26] = 9.0, 30.0, 12.0
    expected = zclip_reference(norms, z=2.5, alpha=0.9, warmup=5)
    clip = zscore_clip(z=2.5, alpha=0.9, warmup=5)
    w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    clipped_steps = []
    for i, n in enumerate(norms):
        w.grad = torch.tensor([n], dtype=torch.float64)
        stats = clip.apply_([w])
        assert float(w.grad[0]) == pytest.approx(expected[i], rel=1e-9)
        if bool(stats["clipped"]):
            clipped_steps.append(i)
    assert {10, 25} <= set(clipped_steps)


def run_sequence(transform, norms, start=0):
    w = torch.nn.Parameter(torch.zeros(2))
    out = []
    for n in norms[start:]:
        w.grad = torch.tensor([n, -n])
        transform.apply_([w])
        out.append(w.grad.clone())
    return out


@pytest.mark.parametrize(
    "factory",
    [
        lambda: auto_clip(10.0),
        lambda: auto_clip(30.0, window=4),
        lambda: zscore_clip(warmup=3),
        lambda: chain(skip_nonfinite(), zscore_clip(warmup=3), auto_clip()),
    ],
)
def test_state_round_trip_preserves_behaviour(factory) -> None:
    norms = [1.0, 1.2, 0.9, 5.0, 1.1, 7.0, 1.0, 1.3, 9.0, 1.0, 0.8]
    full = run_sequence(factory(), norms)
    first = factory()
    run_sequence(first, norms[:5])
    resumed = factory()
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    assert_grads_close(run_sequence(resumed, norms, start=5), full[5:])
