"""Tests for trainwell.averaging and trainwell.running_average (EMA, SWA, update_bn)."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.optim.swa_utils import (
    SWALR,
    AveragedModel,
    get_ema_multi_avg_fn,
    get_swa_multi_avg_fn,
)
from torch.optim.swa_utils import update_bn as torch_update_bn

from trainwell.averaging import EMA, SWA, average_weights, update_bn


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


# ---------------------------------------------------------------- EMA


@pytest.mark.parametrize("buffers", ["copy", "average"])
def test_ema_matches_torch_averaged_model(buffers):
    net = make_net("bn")
    ema = EMA(net, decay=0.9, buffers=buffers)
    ref = AveragedModel(
        net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=buffers == "average"
    )

    def step(_):
        assert ema.update(net)
        ref.update_parameters(net)

    train_steps(net, 25, step)
    assert_close(float_params(ema.module), float_params(ref.module))
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ema.module[1], name), getattr(ref.module[1], name))
    # integer rule: num_batches_tracked is the live count, where torch's EMA truncates it
    assert torch.equal(ema.module[1].num_batches_tracked, net[1].num_batches_tracked)
    if buffers == "average":
        assert ref.module[1].num_batches_tracked != net[1].num_batches_tracked  # the trap
    assert ema.n_averaged == ema.step == 25


def test_ema_warmup_true_is_running_mean_until_decay():
    net = make_net("ln")
    ema = EMA(net, decay=0.999, warmup=True)
    snapshots = []

    def step(_):
        ema.update(net)
        snapshots.append(float_params(net))
        snapshots[-1] = {k: v.clone() for k, v in snapshots[-1].items()}

    train_steps(net, 10, step)
    mean = {k: torch.stack([s[k] for s in snapshots]).mean(0) for k in snapshots[0]}
    assert_close(float_params(ema.module), mean, atol=1e-5)
    assert ema.decay_at(3) == pytest.approx(3 / 4)
    assert EMA(net, decay=0.5, warmup=True).decay_at(10) == 0.5  # capped at decay


def test_ema_warmup_gamma_power_formula():
    ema = EMA(nn.Linear(1, 1), decay=0.9999, warmup=10.0, warmup_power=2 / 3)
    for k in (1, 5, 100):
        assert ema.decay_at(k) == pytest.approx(1 - (1 + k / 10) ** (-2 / 3))


def test_ema_update_every_and_start_step():
    net = make_net("bn")
    ema = EMA(net, decay=0.8, update_every=3, start_step=4)
    ref = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.8))
    results = []

    def step(i):
        results.append(ema.update(net))
        if i < 4:  # before start_step the average follows the live weights
            assert_close(float_params(ema.module), float_params(net), atol=0)
        elif (i - 4) % 3 == 0:
            ref.update_parameters(net)

    train_steps(net, 17, step)
    assert results == [i >= 4 and (i - 4) % 3 == 0 for i in range(17)]
    assert_close(float_params(ema.module), float_params(ref.module))


def test_ema_float64_average_of_float32_model():
    net = make_net("gn")
    ema = EMA(net, decay=0.99, dtype=torch.float64, device="cpu")
    ref = AveragedModel(copy.deepcopy(net).double(), multi_avg_fn=get_ema_multi_avg_fn(0.99))

    def step(_):
        ema.update(net)
        ref.update_parameters(copy.deepcopy(net).double())

    train_steps(net, 12, step)
    assert ema.module[0].weight.dtype == torch.float64
    assert_close(float_params(ema.module), float_params(ref.module), atol=1e-12)


def test_ema_follows_a_live_model_moved_after_construction():
    net = make_net("bn")
    ema = EMA(net, decay=0.9)  # built before the model moved (here: to float64)
    net.double()
    ref = AveragedModel(copy.deepcopy(net), multi_avg_fn=get_ema_multi_avg_fn(0.9))
    for _ in range(3):
        ema.update(net)
        ref.update_parameters(net)
        with torch.no_grad():
            net[0].weight.add_(0.5)
    assert ema.module[0].weight.dtype == torch.float32
    assert_close(
        float_params(ema.module), {k: v.float() for k, v in float_params(ref.module).items()}
    )
    with ema.swapped(net):
        assert torch.equal(net[0].weight, ema.module[0].weight.double())


def test_ema_swapped_swaps_and_restores_even_on_error():
    net = make_net("bn")
    ema = EMA(net, decay=0.5)
    train_steps(net, 5, lambda _: ema.update(net))
    live = copy.deepcopy(net.state_dict())
    with ema.swapped(net) as inner:
        assert inner is net
        assert_close(net.state_dict(), ema.module.state_dict(), atol=0)
        assert not torch.equal(net[0].weight, live["0.weight"])
    assert_close(net.state_dict(), live, atol=0)
    with pytest.raises(RuntimeError, match="boom"), ema.swapped(net):
        raise RuntimeError("boom")
    assert_close(net.state_dict(), live, atol=0)


def _plain(obj) -> bool:
    """Only tensors, numbers, str, bool, None, lists and str-keyed dicts."""
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_plain(v) for v in obj)
    return obj is None or isinstance(obj, (torch.Tensor, int, float, str, bool))


def test_ema_state_round_trip_resumes_identically():
    net = make_net("bn")
    ema = EMA(net, decay=0.9, warmup=True, update_every=2, buffers="average")
    train_steps(net, 7, lambda _: ema.update(net))
    state = copy.deepcopy(ema.state_dict())
    assert _plain(state)
    net_b = copy.deepcopy(net)
    resumed = EMA(make_net("bn", seed=5), decay=0.9, warmup=True, update_every=2, buffers="average")
    resumed.load_state_dict(state)
    train_steps(net, 6, lambda _: ema.update(net), seed=9)
    train_steps(net_b, 6, lambda _: resumed.update(net_b), seed=9)
    assert_close(ema.module.state_dict(), resumed.module.state_dict(), atol=0)
    assert (resumed.step, resumed.n_averaged) == (ema.step, ema.n_averaged)


def test_ema_load_state_dict_errors_name_key():
    ema = EMA(make_net("bn"))
    state = copy.deepcopy(ema.state_dict())
    del state["module"]["0.bias"]
    with pytest.raises(ValueError, match="missing key '0.bias'"):
        ema.load_state_dict(state)
    state = copy.deepcopy(ema.state_dict())
    state["module"]["0.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(3, 3\), expected \(8, 4\)"):
        ema.load_state_dict(state)
    with pytest.raises(ValueError, match="missing key 'n_averaged'"):
        ema.load_state_dict({"step": 0, "module": {}})
    with pytest.raises(ValueError, match="pass the model this average was built from"):
        ema.update(nn.Linear(4, 8))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"decay": 1.5}, "decay must be a number in"),
        ({"warmup": -1.0}, "warmup must be False, True or a number"),
        ({"warmup_power": 0.0}, "warmup_power must be a number > 0"),
        ({"update_every": 0}, "update_every must be an integer >= 1"),
        ({"start_step": -1}, "start_step must be an integer >= 0"),
        ({"buffers": "avg"}, "buffers must be 'copy' or 'average'"),
    ],
)
def test_ema_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EMA(nn.Linear(1, 1), **kwargs)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        EMA("net")


# ---------------------------------------------------------------- SWA


def test_swa_matches_torch_averaged_model_and_handles_integer_buffers():
    net = make_net("bn")
    swa = SWA(net, start=2)
    ref = AveragedModel(net)
    for epoch in range(6):
        train_steps(net, 3, seed=epoch)
        averaged = swa.update(net, epoch)
        assert averaged == (epoch >= 2)
        if averaged:
            ref.update_parameters(net)
    assert swa.n_averaged == 4
    assert_close(float_params(swa.module), float_params(ref.module))
    # the traps: torch's SWA over buffers truncates num_batches_tracked (default
    # averaging on CPU) or crashes (get_swa_multi_avg_fn); ours copies it exactly
    silent = AveragedModel(net, use_buffers=True)
    with pytest.raises(RuntimeError, match="Integer division"):
        crash = AveragedModel(net, use_buffers=True, multi_avg_fn=get_swa_multi_avg_fn())
        crash.update_parameters(net)
        crash.update_parameters(net)
    for epoch in range(3):
        train_steps(net, 2, seed=epoch)
        silent.update_parameters(net)
    assert silent.module[1].num_batches_tracked != net[1].num_batches_tracked
    avg_bn = SWA(net, start=0, buffers="average")
    avg_bn.update(net, 0)
    avg_bn.update(net, 1)
    assert torch.equal(avg_bn.module[1].num_batches_tracked, net[1].num_batches_tracked)


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_swa_schedule_matches_torch_swalr_and_resumes():
    def run(use_ours: bool, epochs: int = 7, resume_at: int | None = None):
        net = make_net("ln")
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        lrs = []
        if use_ours:
            swa = SWA(net, start=2, optimizer=opt, swa_lr=0.05, anneal_epochs=3)
        else:
            sched = SWALR(opt, swa_lr=0.05, anneal_epochs=3)
        for epoch in range(epochs):
            if use_ours:
                swa.update(net, epoch)
                if resume_at == epoch:
                    state = copy.deepcopy(swa.state_dict())
                    opt_state = copy.deepcopy(opt.state_dict())
                    assert _plain(state)
                    net = make_net("ln")
                    opt = torch.optim.SGD(net.parameters(), lr=0.5)
                    opt.load_state_dict(opt_state)
                    swa = SWA(net, start=2, optimizer=opt, swa_lr=0.05, anneal_epochs=3)
                    swa.load_state_dict(state)
            elif epoch >= 2:
                sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        return lrs

    reference = run(False)
    assert reference[-1] == pytest.approx(0.05) and reference[1] == 0.5
    assert run(True) == pytest.approx(reference, abs=1e-12)
    assert run(True, resume_at=3) == pytest.approx(reference, abs=1e-12)


def test_swa_never_averages_an_epoch_twice():
    net = make_net("ln")
    swa = SWA(net, start=0)
    assert swa.update(net, 0) and not swa.update(net, 0)
    assert swa.n_averaged == 1


def test_swa_finalize_recalibrates_bn():
    net = make_net("bn")
    swa = SWA(net, start=0)
    for epoch in range(3):
        train_steps(net, 2, seed=epoch)
        swa.update(net, epoch)
    data = [torch.randn(16, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    ref = copy.deepcopy(swa.module)
    torch_update_bn(data, ref)
    assert swa.finalize(data) == 4
    torch.testing.assert_close(swa.module[1].running_mean, ref[1].running_mean)
    torch.testing.assert_close(swa.module[1].running_var, ref[1].running_var)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"start": -1}, ValueError, "start must be an integer >= 0"),
        ({"start": 0, "swa_lr": 0.1}, ValueError, "optimizer and swa_lr go together"),
        ({"start": 0, "optimizer": "sgd", "swa_lr": 0.1}, TypeError, "torch.optim.Optimizer"),
        ({"start": 0, "anneal_strategy": "exp"}, ValueError, "'cos' or 'linear'"),
        ({"start": 0, "anneal_epochs": -2}, ValueError, "anneal_epochs must be an integer"),
    ],
)
def test_swa_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SWA(nn.Linear(1, 1), **kwargs)


def test_swa_bad_swa_lr():
    net = nn.Linear(1, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="swa_lr must be a number > 0"):
        SWA(net, start=0, optimizer=opt, swa_lr=-0.1)


# ---------------------------------------------------------------- the grid


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
