"""Tests for trainwell.averaging.weights (average_weights, update_bn), the integer rule."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.optim.swa_utils import (
    AveragedModel,
    get_ema_multi_avg_fn,
)
from torch.optim.swa_utils import update_bn as torch_update_bn

from tests.averaging.helpers import (
    assert_close,
    bn_stats,
    conv_bn_net,
    float_params,
    image_batches,
    make_net,
    train_steps,
)
from trainwell.averaging.running import EMA, SWA
from trainwell.averaging.weights import average_weights, update_bn

# ---------------------------------------------------------------- average_weights


def test_average_weights_matches_hand_mean_and_integer_rule():
    models = [make_net("bn", seed=s) for s in range(3)]
    for i, m in enumerate(models):
        train_steps(m, 2 + i, seed=i)  # different running stats and num_batches_tracked
    w = [1.0, 2.0, 5.0]
    avg = average_weights(models, weights=w)
    sds = [m.state_dict() for m in models]
    for key, value in avg.state_dict().items():
        if value.is_floating_point():
            expected = sum(wi * sd[key] for wi, sd in zip(w, sds, strict=True)) / sum(w)
            torch.testing.assert_close(value, expected, atol=1e-6, rtol=0, msg=key)
        else:  # the integer rule: taken from models[0], never averaged
            assert value.dtype == torch.long and torch.equal(value, sds[0][key]), key
    assert sds[0]["1.num_batches_tracked"] != sds[2]["1.num_batches_tracked"]
    # inputs untouched, result is a new module
    assert avg is not models[0] and torch.equal(models[0][0].weight, sds[0]["0.weight"])


def test_average_weights_zero_weight_ties_and_frozen_parameters():
    models = [make_net("ln", seed=s) for s in range(3)]
    for m in models:
        m[0].weight.requires_grad_(False)
    avg = average_weights(models, weights=[0.0, 1.0, 3.0])
    expected = (models[1][3].weight + 3 * models[2][3].weight) / 4
    torch.testing.assert_close(avg[3].weight, expected, atol=1e-6, rtol=0)
    assert not avg[0].weight.requires_grad and avg[3].weight.requires_grad
    assert isinstance(avg[3].weight, nn.Parameter)
    single = average_weights(models[:1])
    assert torch.equal(single[0].weight, models[0][0].weight)
    assert single[0].weight.data_ptr() != models[0][0].weight.data_ptr()
    tied = [nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)) for _ in range(2)]
    for t in tied:
        t[1].weight = t[0].weight
    avg_tied = average_weights(tied)
    assert avg_tied[1].weight is avg_tied[0].weight


def test_average_weights_copy_buffers_takes_first_model():
    models = [make_net("bn", seed=s) for s in range(2)]
    for i, m in enumerate(models):
        train_steps(m, 3, seed=i)
    avg = average_weights(models, buffers="copy")
    assert torch.equal(avg[1].running_mean, models[0][1].running_mean)
    expected = (models[0][0].weight + models[1][0].weight) / 2
    torch.testing.assert_close(avg[0].weight, expected, atol=1e-6, rtol=0)


def test_average_weights_bf16_accumulates_in_float32():
    torch.manual_seed(0)
    models = [nn.Linear(64, 64).to(torch.bfloat16) for _ in range(7)]
    avg = average_weights(models)
    ref = torch.stack([m.weight.detach().double() for m in models]).mean(0)
    naive = models[0].weight.detach() / 7
    for m in models[1:]:
        naive = naive + m.weight.detach() / 7  # accumulated in bf16
    assert avg.weight.dtype == torch.bfloat16
    err = (avg.weight.double() - ref).abs()
    assert (err <= ref.abs() * 2**-8 + 1e-7).all()  # within half a bf16 ulp of the exact mean
    assert err.mean() < (naive.double() - ref).abs().mean() / 2


def test_average_weights_mismatch_names_key():
    a, b = make_net("bn"), make_net("ln")
    with pytest.raises(ValueError, match=r"models\[1\] has no key '1.running_mean'"):
        average_weights([a, b])
    c = nn.Sequential(nn.Linear(4, 9), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"models\[1\] key '0.weight' has shape \(9, 4\)"):
        average_weights([a, c])
    with pytest.raises(ValueError, match=r"key '0.weight' has dtype torch.float64"):
        average_weights([a, copy.deepcopy(a).double()])
    with pytest.raises(ValueError, match="extra key"):
        average_weights([make_net("ln"), make_net("bn")])


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"models": []}, ValueError, "at least one model"),
        ({"models": nn.Linear(1, 1)}, TypeError, "list or tuple"),
        ({"weights": [1.0]}, ValueError, "one entry per model"),
        ({"weights": [1.0, -1.0]}, ValueError, "non-negative"),
        ({"weights": [0.0, 0.0]}, ValueError, "sum to > 0"),
        ({"weights": [1.0, math.nan]}, ValueError, "finite"),
        ({"buffers": "mean"}, ValueError, "buffers must be 'copy' or 'average'"),
    ],
)
def test_average_weights_bad_input(kwargs, exc, match):
    args = {"models": [nn.Linear(2, 1), nn.Linear(2, 1)], **kwargs}
    with pytest.raises(exc, match=match):
        average_weights(**args)


def _hand_mean(models, w):
    sds = [m.state_dict() for m in models]
    total = sum(w)
    return {
        k: sum(wi * sd[k].double() for wi, sd in zip(w, sds, strict=True)) / total
        for k, v in sds[0].items()
        if v.is_floating_point()
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_average_weights_tiles_give_the_untiled_result(monkeypatch, dtype):
    import trainwell.averaging.weights as W

    torch.manual_seed(0)
    models = [
        nn.Sequential(nn.Linear(64, 48), nn.Conv2d(3, 8, 3), nn.BatchNorm1d(5)) for _ in range(4)
    ]
    for m in models:
        m.to(dtype)
        m[1].to(memory_format=torch.channels_last)  # not contiguous: averaged whole
        m[2].running_mean.normal_()
    w = [1.0, 0.0, 2.0, 3.0]
    whole = average_weights(models, weights=w)
    monkeypatch.setattr(W, "_TILE", 100)  # the 64 x 48 weight becomes 31 flat pieces
    tiled = average_weights(models, weights=w)
    monkeypatch.setattr(W, "_TILED_DEVICES", ())  # the accelerator path, here on CPU
    untiled = average_weights(models, weights=w)
    single = average_weights(models[:1])
    assert torch.equal(single[0].weight, models[0][0].weight)
    assert single[0].weight.data_ptr() != models[0][0].weight.data_ptr()
    expected = _hand_mean(models, w)
    tol = 1e-6 if dtype == torch.float32 else 2**-7
    for name, t in tiled.state_dict().items():
        if name in expected:
            assert t.dtype == dtype, name
            torch.testing.assert_close(t.double(), expected[name], atol=tol, rtol=tol, msg=name)
            for other in (whole, untiled):
                torch.testing.assert_close(t, other.state_dict()[name], atol=tol, rtol=0)
    for out in (tiled, untiled):
        assert out[1].weight.stride() == models[0][1].weight.stride()  # layout kept
    assert torch.equal(tiled[2].num_batches_tracked, models[0][2].num_batches_tracked)


def test_average_weights_large_tensors_and_a_fresh_module():
    # tensors larger than a tile are averaged piece by piece; the result must not care
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(1024, 1100), nn.ReLU()) for _ in range(3)]
    avg = average_weights(models)
    expected = _hand_mean(models, [1.0, 1.0, 1.0])
    for name, t in avg.state_dict().items():
        torch.testing.assert_close(t.double(), expected[name], atol=1e-6, rtol=0, msg=name)
    # the copy's hook dicts and buffer sets are its own, not models[0]'s
    avg[0].register_forward_hook(lambda *a: None)
    avg[1].register_buffer("scale", torch.ones(1), persistent=False)
    assert not models[0][0]._forward_hooks and "scale" not in models[0][1]._buffers
    assert not models[0][1]._non_persistent_buffers_set


# ---------------------------------------------------------------- EMA


@pytest.mark.parametrize("norm", ["bn", "ln", "gn"])
@pytest.mark.parametrize("buffers", ["copy", "average"])
@pytest.mark.parametrize("method", ["ema", "swa", "uniform"])
def test_grid_runs_and_follows_the_integer_rule(method, norm, buffers):
    net = make_net(norm)
    if method == "uniform":
        models = [make_net(norm, seed=s) for s in range(3)]
        for i, m in enumerate(models):
            train_steps(m, 2 + i, seed=i)
        out, source = average_weights(models, buffers=buffers), models[0]
        expected = {n: sum(float_params(m)[n] for m in models) / 3 for n in float_params(net)}
    else:
        if method == "ema":
            avg: EMA | SWA = EMA(net, decay=0.5, buffers=buffers)
        else:
            avg = SWA(net, start=0, buffers=buffers)
        ref = AveragedModel(
            net, multi_avg_fn=get_ema_multi_avg_fn(0.5) if method == "ema" else None
        )
        for epoch in range(4):
            train_steps(net, 2, seed=epoch)
            assert avg.update(net) if method == "ema" else avg.update(net, epoch)
            ref.update_parameters(net)
        out, source, expected = avg.module, net, float_params(ref.module)
    assert_close(float_params(out), expected, atol=1e-6)
    for (name, b_out), b_src in zip(out.named_buffers(), source.buffers(), strict=True):
        if not b_out.is_floating_point():  # integer rule: copied from the source, exact
            assert b_out.dtype == b_src.dtype and torch.equal(b_out, b_src), name
        elif buffers == "copy":
            assert torch.equal(b_out, b_src), name
    assert torch.isfinite(out(torch.randn(5, 4))).all()


# ---------------------------------------------------------------- update_bn


def test_update_bn_matches_torch_and_restores_state():
    net = conv_bn_net()
    net[1].momentum = 0.3
    net.eval()
    net[1].train()  # a mixed mode that must come back module by module
    ref = copy.deepcopy(net)
    torch_update_bn(image_batches(), ref)
    inputs = []
    hook = net[4].register_forward_hook(lambda m, args, out: inputs.append(args[0].detach()))
    assert update_bn(net, image_batches()) == 3
    hook.remove()
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        torch.testing.assert_close(net.state_dict()[name], ref.state_dict()[name], msg=name)
    # torch's update_bn does not reset a tracked InstanceNorm (it drifts with momentum 0.1
    # from its old statistics); ours recalibrates it to the
    # equal-weight mean over batches of the per-instance statistics
    mean = torch.stack([x.mean(dim=(2, 3)).mean(0) for x in inputs]).mean(0)
    var = torch.stack([x.var(dim=(2, 3)).mean(0) for x in inputs]).mean(0)
    torch.testing.assert_close(net[4].running_mean, mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(net[4].running_var, var, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ref[4].running_mean, mean, atol=1e-3)
    assert net[1].momentum == 0.3 and net[4].momentum == 0.1
    assert [m.training for m in net] == [False, True, False, False, False, False, False]


def test_update_bn_accepts_torchs_loader_model_order():
    """``update_bn(loader, model[, device])`` as torch spells it gives the same statistics."""
    ours, theirs, ref = conv_bn_net(), conv_bn_net(), conv_bn_net()
    theirs.load_state_dict(ours.state_dict())
    ref.load_state_dict(ours.state_dict())
    torch_update_bn(image_batches(), ref)
    assert update_bn(ours, image_batches()) == update_bn(image_batches(), theirs, "cpu") == 3
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        torch.testing.assert_close(theirs.state_dict()[name], ours.state_dict()[name])
        torch.testing.assert_close(theirs.state_dict()[name], ref.state_dict()[name])
    with pytest.raises(ValueError, match="the model is on cpu"):
        update_bn(image_batches(), theirs, "meta")


def test_update_bn_dict_batches_and_custom_forward():
    class DictNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = conv_bn_net()

        def forward(self, image: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
            return self.body(image)

    base = DictNet().eval()
    batches = image_batches()
    ref = copy.deepcopy(base)
    torch.manual_seed(0)
    update_bn(ref, [x for x, _ in batches])
    as_dict = copy.deepcopy(base)
    torch.manual_seed(0)
    update_bn(as_dict, [{"image": x, "label": y} for x, y in batches])
    assert_close(bn_stats(as_dict), bn_stats(ref))
    seen = []

    def forward(model, batch):
        seen.append(batch["id"])
        model(batch["pixels"])

    custom = copy.deepcopy(base)
    torch.manual_seed(0)
    update_bn(custom, [{"pixels": x, "id": i} for i, (x, _) in enumerate(batches)], forward)
    assert seen == [0, 1, 2]
    assert_close(bn_stats(custom), bn_stats(ref))


def test_update_bn_empty_loader_and_no_norm_layers():
    net = conv_bn_net()
    before = copy.deepcopy(bn_stats(net))
    with pytest.raises(ValueError, match="loader yielded no batches"):
        update_bn(net, [])
    assert_close(bn_stats(net), before, atol=0)

    def never():
        raise AssertionError("iterated")
        yield

    assert update_bn(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), never()) == 0
    with pytest.raises(TypeError, match="a batch must be a tensor"):
        update_bn(net, ["not a batch"])
    with pytest.raises(TypeError, match="forward must be a callable"):
        update_bn(net, image_batches(), forward=3)


def _ddp_worker(rank: int, world: int, path: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        net = conv_bn_net()
        batches = image_batches(4)[rank::world] + (image_batches(5)[4:] if rank == 0 else [])
        torch.manual_seed(0)
        net[5].p = 0.0
        update_bn(net, batches)
        if rank == 0:
            torch.save(bn_stats(net), out)
    finally:
        dist.destroy_process_group()


def test_update_bn_reduces_over_ranks_like_one_process(tmp_path):
    out = str(tmp_path / "stats.pt")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    net = conv_bn_net()
    net[5].p = 0.0
    update_bn(net, image_batches(5))  # the same 5 batches (3 on rank 0, 2 on rank 1)
    assert_close(torch.load(out), bn_stats(net), atol=1e-5)
    assert os.path.exists(out)
