"""Tests for trainwell.gradients.transforms (clip by value / norm, skip, chain)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tests.gradients.helpers import assert_grads_close, grads_of, make_params
from trainwell.gradients.adaptive import adaptive_clip, auto_clip, zscore_clip
from trainwell.gradients.transforms import (
    NonFiniteGradError,
    chain,
    clip_by_norm,
    clip_by_value,
    clip_grad_norm_,
    clip_grad_value_,
    skip_nonfinite,
)


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_by_norm_matches_torch(norm_type: float, max_norm: float) -> None:
    ours, ref = make_params(1), make_params(1)
    stats = clip_by_norm(max_norm, norm_type).apply_(ours)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type)
    assert_grads_close(grads_of(ours), grads_of(ref))
    torch.testing.assert_close(stats["grad_norm"], ref_norm)
    assert bool(stats["clipped"]) == bool(ref_norm > max_norm)
    assert stats["skip"] is False
    # the pure function too
    again = make_params(1)
    torch.testing.assert_close(clip_grad_norm_(again, max_norm, norm_type), ref_norm)
    assert_grads_close(grads_of(again), grads_of(ref))


def test_clip_by_value_matches_torch() -> None:
    ours, ref, pure = make_params(2), make_params(2), make_params(2)
    stats = clip_by_value(0.3).apply_(ours)
    torch.nn.utils.clip_grad_value_(ref, 0.3)
    assert_grads_close(grads_of(ours), grads_of(ref))
    max_abs = max(float(p.grad.abs().max()) for p in make_params(2))
    assert float(stats["max_abs_grad"]) == pytest.approx(max_abs)
    assert float(clip_grad_value_(pure, 0.3)) == pytest.approx(max_abs)
    assert_grads_close(grads_of(pure), grads_of(ref))


def test_named_parameters_and_missing_grads_are_accepted() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    net(torch.randn(5, 3)).sum().backward()
    net[1].bias.grad = None
    ref = copy.deepcopy(net)
    for p, q in zip(net.parameters(), ref.parameters(), strict=True):
        q.grad = None if p.grad is None else p.grad.clone()
    stats = clip_by_norm(0.1).apply_(net.named_parameters())
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
    assert net[1].bias.grad is None
    for p, q in zip(net.parameters(), ref.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad)
    assert float(stats["grad_norm"]) > 0.1


def test_planted_nan_never_reaches_optimizer_step() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    guard = chain(skip_nonfinite(max_consecutive=2), clip_by_norm(1.0))
    steps = 0

    def train_step(plant_nan: bool) -> dict:
        nonlocal steps
        opt.zero_grad()
        net(torch.randn(16, 4)).pow(2).mean().backward()
        if plant_nan:
            net[2].weight.grad[0, 3] = math.nan
        stats = guard.apply_(list(net.named_parameters()))
        if not stats["skip"]:
            opt.step()
            steps += 1
        return stats

    train_step(False)
    params_before = copy.deepcopy(net.state_dict())
    opt_before = copy.deepcopy(opt.state_dict())
    stats = train_step(True)
    assert stats["skip"] and steps == 1
    assert all(torch.equal(params_before[k], v) for k, v in net.state_dict().items())
    after = opt.state_dict()
    for i, s in opt_before["state"].items():
        for k, v in s.items():
            assert torch.equal(after["state"][i][k], v)
    assert all(torch.count_nonzero(p.grad) == 0 for p in net.parameters())
    assert train_step(False)["skip"] is False  # a finite step resets the count
    train_step(True)
    train_step(True)
    with pytest.raises(NonFiniteGradError, match=r"3 consecutive steps.*2\.weight"):
        train_step(True)


def test_chain_order_and_stats_merge() -> None:
    a, b, c = make_params(4, scale=3.0), make_params(4, scale=3.0), make_params(4, scale=3.0)
    stats = chain(clip_by_value(0.5), clip_by_norm(2.0)).apply_(a)
    torch.nn.utils.clip_grad_value_(b, 0.5)
    torch.nn.utils.clip_grad_norm_(b, 2.0)
    assert_grads_close(grads_of(a), grads_of(b))
    torch.nn.utils.clip_grad_norm_(c, 2.0)
    torch.nn.utils.clip_grad_value_(c, 0.5)
    assert not all(torch.allclose(x, y) for x, y in zip(grads_of(a), grads_of(c), strict=True))
    original = torch.sqrt(sum(p.grad.pow(2).sum() for p in make_params(4, scale=3.0)))
    torch.testing.assert_close(stats["grad_norm"], original)  # the first grad_norm is kept
    assert "clip_coef" in stats and stats["skip"] is False


def test_chain_stops_after_skip() -> None:
    later = auto_clip()
    t = chain(skip_nonfinite(), later)
    w = torch.nn.Parameter(torch.zeros(2))
    w.grad = torch.tensor([math.inf, 1.0])
    stats = t.apply_([w])
    assert stats["skip"] is True and later.count == 0
    assert t.state_dict()["transforms"][1]["count"] == 0


def test_transforms_see_unscaled_gradients_with_grad_scaler() -> None:
    torch.manual_seed(1)
    net = torch.nn.Linear(5, 3)
    ref = copy.deepcopy(net)
    x = torch.randn(8, 5)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(net(x).pow(2).mean()).backward()
    scaler.unscale_(opt)
    clip_by_norm(0.5).apply_(list(net.parameters()))
    ref(x).pow(2).mean().backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    for p, q in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="max_norm must be a finite number > 0"):
        clip_by_norm(0.0)
    with pytest.raises(ValueError, match="norm_type must be > 0"):
        clip_by_norm(1.0, norm_type=-1)
    with pytest.raises(TypeError, match="value must be a positive number"):
        clip_by_value("1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"percentile must be a number in \(0, 100\]"):
        auto_clip(percentile=0)
    with pytest.raises(ValueError, match="window must be None"):
        auto_clip(window=0)
    with pytest.raises(ValueError, match=r"alpha must be a number in \(0, 1\)"):
        zscore_clip(alpha=1.0)
    with pytest.raises(ValueError, match="warmup must be an int >= 1"):
        zscore_clip(warmup=0)
    with pytest.raises(ValueError, match="clipping must be a finite number > 0"):
        adaptive_clip(clipping=-0.1)
    with pytest.raises(ValueError, match="max_consecutive must be an int >= 0 or None"):
        skip_nonfinite(max_consecutive=-1)
    with pytest.raises(TypeError, match="chain"):
        chain(clip_by_norm(1.0), 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="params must hold tensors"):
        clip_by_norm(1.0).apply_([1.0])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="one state per transform"):
        chain(clip_by_norm(1.0)).load_state_dict({"transforms": []})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_clip_modes_do_not_synchronize_on_gpu() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    net = net.cuda()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.randn(64, 64, device="cuda")
    transforms = [clip_by_value(0.1), clip_by_norm(1.0), adaptive_clip(), auto_clip(),
                  auto_clip(window=8), zscore_clip(warmup=2)]  # fmt: skip
    for t in transforms:
        for _ in range(4):  # past warmups and lazily created state
            opt.zero_grad()
            net(x).square().mean().backward()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                t.apply_(list(net.parameters()))
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("seed", range(40))
def test_any_nonfinite_equals_an_elementwise_check_and_changes_nothing(seed):
    """The fused check against ``isfinite`` element by element: NaN, +-Inf, values near
    the float max, mixed dtypes, empty, non-contiguous and sparse gradients."""
    from trainwell.gradients.transforms import any_nonfinite

    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    grads = []
    for i in range(int(torch.randint(1, 6, (1,), generator=g))):
        dtype = dtypes[int(torch.randint(0, 4, (1,), generator=g))]
        t = torch.randn(int(torch.randint(0, 20, (1,), generator=g)), 3, generator=g)
        t = (t * torch.finfo(dtype).max / 4).to(dtype) if i % 2 else t.to(dtype)
        grads.append(t.t() if i % 3 == 2 else t)
    value = [math.nan, math.inf, -math.inf][seed % 3]
    if seed % 3 and grads[0].numel():
        target = grads[int(torch.randint(0, len(grads), (1,), generator=g))]
        if target.numel():
            target[tuple(int(i) for i in torch.nonzero(torch.ones_like(target))[-1])] = value
    if seed % 4 == 0:  # sparse (an embedding's), non-finite in its values half the time
        dense = torch.randn(4, 4, generator=g)
        dense[1, 2] = value if seed % 8 == 0 else 1.0
        grads.append(dense.to_sparse())
    before = [x.clone() for x in grads]
    expected = any(not bool(torch.isfinite(x.to_dense()).all()) for x in grads)
    assert bool(any_nonfinite(grads)) is expected
    for x, y in zip(grads, before, strict=True):
        assert torch.equal(torch.nan_to_num(x.to_dense()), torch.nan_to_num(y.to_dense()))
