"""Tests for trainwell.averaging.running (EMA, SWA) against torch.optim.swa_utils."""

from __future__ import annotations

import copy
import gc
import pickle
import weakref

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import (
    SWALR,
    AveragedModel,
    get_ema_multi_avg_fn,
    get_swa_multi_avg_fn,
)
from torch.optim.swa_utils import update_bn as torch_update_bn

from tests.averaging.helpers import (
    _plain,
    assert_close,
    float_params,
    make_net,
    train_steps,
)
from trainwell.averaging.running import EMA, SWA


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


# ------------------------------------------------- EMA's cached view of the live model


def _ema_and_reference(net, decay=0.5):
    ema = EMA(net, decay=decay)
    ref = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay))
    return ema, ref


def _step_both(ema, ref, net):
    ema.update(net)
    ref.update_parameters(net)
    assert_close(float_params(ema.module), float_params(ref.module))


def test_ema_follows_parameters_buffers_and_submodules_replaced_between_updates():
    # the tensor lists are cached between updates: every way of swapping a live tensor
    # must be seen, as when they were rebuilt from model.parameters() on every update
    net = make_net("bn")
    ema, ref = _ema_and_reference(net)
    _step_both(ema, ref, net)
    _step_both(ema, ref, net)
    net[0].weight = nn.Parameter(torch.randn(8, 4))  # an assigned parameter
    _step_both(ema, ref, net)
    net[3] = nn.Linear(8, 3)  # a swapped submodule
    _step_both(ema, ref, net)
    other = make_net("bn", seed=7)
    train_steps(other, 2)
    net.load_state_dict(other.state_dict(), assign=True)  # new tensor objects throughout
    _step_both(ema, ref, net)
    net[1].running_mean = torch.randn(8)  # a buffer assigned: copied from the new one
    net[1].num_batches_tracked = torch.tensor(41)
    _step_both(ema, ref, net)
    assert torch.equal(ema.module[1].running_mean, net[1].running_mean)
    assert ema.module[1].num_batches_tracked.item() == 41
    with torch.no_grad():
        net[0].weight.data = torch.full((8, 4), 3.0)  # .data swapped in place of the storage
    _step_both(ema, ref, net)


@pytest.mark.parametrize(
    "change",
    [
        lambda net: setattr(net[0], "extra", nn.Parameter(torch.zeros(2))),
        lambda net: net[3].register_buffer("counter", torch.zeros(1)),  # into an empty dict
        lambda net: net[2].add_module("inner", nn.Linear(1, 1)),  # a leaf gets a child
    ],
)
def test_ema_sees_tensors_added_after_it_cached_the_model(change):
    net = make_net("bn")
    ema = EMA(net, decay=0.9)
    ema.update(net)
    ema.update(net)
    change(net)
    with pytest.raises(ValueError, match="pass the model this average was built from"):
        ema.update(net)


class _Twice(nn.Module):
    def forward(self, x):
        return 2 * x


def _move_bias_to_buffers(net):
    bias = net[0].bias
    del net[0].bias
    net[0].register_buffer("bias", bias)  # the same object, now the first buffer


@pytest.mark.parametrize(
    "change",
    [
        lambda net: setattr(net[0], "weight", nn.Parameter(torch.randn(8, 4))),
        lambda net: net.__setitem__(3, nn.Linear(8, 3)),
        lambda net: net.load_state_dict(make_net("bn", seed=3).state_dict(), assign=True),
        lambda net: net.double(),
        lambda net: delattr(net[3], "bias"),
        lambda net: setattr(net[3], "bias", None),
        _move_bias_to_buffers,
        lambda net: torch.nn.utils.parametrize.register_parametrization(net[0], "weight", _Twice()),
        lambda net: net[2].register_buffer("extra", torch.zeros(3)),
    ],
)
def test_ema_cached_view_is_always_parameters_then_buffers(change):
    # the cache must hold exactly what [*parameters(), *buffers()] would give right now
    net = make_net("bn")
    ema = EMA(net, decay=0.9)
    ema.update(net)
    ema.update(net)
    change(net)
    expected = [*net.parameters(), *net.buffers()]
    if len(expected) != len(ema._avg):
        with pytest.raises(ValueError, match="pass the model this average was built from"):
            ema.update(net)
        return
    view = ema._live(net)
    assert [id(t) for t in view.live] == [id(t) for t in expected]
    assert ema._live(net) is view  # and it is reused while nothing changes


def test_ema_does_not_keep_a_deleted_live_model_alive():
    net = make_net("bn")
    ema = EMA(net, decay=0.9)
    for _ in range(3):
        ema.update(net)
    probe = weakref.ref(net[0].weight)
    del net
    gc.collect()
    assert probe() is None
    assert ema.module[0].weight.shape == (8, 4)


def test_ema_copies_do_not_share_the_cached_view():
    net = make_net("bn")
    ema = EMA(net, decay=0.8)
    train_steps(net, 3, lambda _: ema.update(net))
    clones = [copy.deepcopy(ema), pickle.loads(pickle.dumps(ema))]
    train_steps(net, 2, lambda _: [e.update(net) for e in (ema, *clones)], seed=4)
    for clone in clones:
        assert_close(clone.module.state_dict(), ema.module.state_dict(), atol=0)
        assert clone.n_averaged == ema.n_averaged == 5


def test_ema_update_leaves_no_autograd_graph_and_restores_grad_mode():
    net = make_net("ln")
    ema = EMA(net, decay=0.9)
    for _ in range(3):
        assert torch.is_grad_enabled()
        ema.update(net)  # called with grad mode on, as in a training loop
    assert torch.is_grad_enabled()
    assert all(t.grad_fn is None and not t.requires_grad for t in ema.module.parameters())
    with torch.no_grad():
        ema.update(net)
        assert not torch.is_grad_enabled()


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
        ({"start": 0.5}, ValueError, "start=0.5 is a fraction of the epochs: give epochs"),
        ({"start": 1.0, "epochs": 10}, ValueError, r"or a fraction of the epochs in \(0, 1\)"),
        ({"start": 0.5, "epochs": 0}, ValueError, "give epochs"),
    ],
)
def test_swa_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SWA(nn.Linear(1, 1), **kwargs)


@pytest.mark.parametrize(
    ("fraction", "epochs"), [(0.75, 20), (0.5, 7), (0.01, 20), (0.99, 4), (0.5, 1)]
)
def test_swa_start_fraction_averages_the_epochs_the_config_would(fraction, epochs):
    """SWA(start=fraction, epochs=E) averages exactly the epochs from the config's rule
    (one trained first, the last one always averaged) and nothing before them."""
    expected = min(epochs - 1, max(1, round(fraction * epochs)))
    net = nn.Linear(2, 1)
    swa = SWA(net, start=fraction, epochs=epochs)
    averaged = [e for e in range(epochs) if swa.update(net, e)]
    assert averaged == list(range(expected, epochs)) and averaged[-1] == epochs - 1


def test_swa_bad_swa_lr():
    net = nn.Linear(1, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="swa_lr must be a number > 0"):
        SWA(net, start=0, optimizer=opt, swa_lr=-0.1)


# ---------------------------------------------------------------- the grid
