"""LR schedulers in fit(): per step or per epoch as designed, plateau schedulers on their
metric, against hand-written loops, and across a resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.training.helpers import EpochSampler
from trainwell import SWA, Accumulator, CheckpointManager, chain, fit, skip_nonfinite

EPOCHS = 3


def loaders(n=90, batch_size=16):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 6, generator=g), torch.randint(3, (n,), generator=g)
    vx, vy = torch.randn(30, 6, generator=g), torch.randint(3, (30,), generator=g)
    train = DataLoader(TensorDataset(x, y), batch_size=batch_size, sampler=EpochSampler(n))
    return train, DataLoader(TensorDataset(vx, vy), batch_size=len(vy))


def make(seed=0, lr=0.05):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def one_cycle(opt, total_steps):
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=total_steps)


class LrTrace:
    """A gradient transform that records the learning rate each optimizer step uses."""

    def __init__(self, opt):
        self.opt, self.lrs = opt, []

    def apply_(self, params):
        self.lrs.append(self.opt.param_groups[0]["lr"])
        return {}


def count_steps(scheduler):
    calls = {"n": 0}
    original = scheduler.step

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    scheduler.step = counted
    return calls


def strip_time(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


# ------------------------------------------------------------------ per-step schedules
def test_one_cycle_per_step_is_stepped_exactly_epochs_times_batches_like_a_hand_loop():
    train, _ = loaders()
    model, opt = make()
    sched = one_cycle(opt, EPOCHS * len(train))
    calls, trace = count_steps(sched), LrTrace(opt)
    result = fit(model, train, None, opt, epochs=EPOCHS, scheduler=sched,
                 scheduler_interval="step", transforms=trace)  # fmt: skip
    assert calls["n"] == result.steps == EPOCHS * len(train) == sched.total_steps
    ref, ref_opt = make()
    ref_sched = one_cycle(ref_opt, EPOCHS * len(train))
    ref_lrs = []
    for epoch in range(EPOCHS):
        train.sampler.set_epoch(epoch)
        for x, y in train:
            F.cross_entropy(ref(x), y).backward()
            ref_lrs.append(ref_opt.param_groups[0]["lr"])
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)
            ref_sched.step()
    assert trace.lrs == ref_lrs
    # each row's lr is the one the next step uses (after the epoch's last scheduler step)
    next_lrs = [*ref_lrs, ref_opt.param_groups[0]["lr"]]
    assert [row["lr"] for row in result.history] == [
        next_lrs[(e + 1) * len(train)] for e in range(EPOCHS)
    ]
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


def test_per_step_schedule_counts_optimizer_steps_under_accumulation():
    train, _ = loaders()  # 6 batches: windows of 4 give 2 optimizer steps per epoch
    model, opt = make()
    per_epoch = -(-len(train) // 4)
    sched = one_cycle(opt, EPOCHS * per_epoch)
    calls = count_steps(sched)
    result = fit(model, train, None, opt, epochs=EPOCHS, scheduler=sched,
                 scheduler_interval="step", accumulator=Accumulator(model, 4))  # fmt: skip
    assert calls["n"] == result.steps == EPOCHS * per_epoch


def test_per_step_schedule_also_steps_on_a_skipped_step():
    train, _ = loaders()
    model, opt = make()
    seen = {"n": 0}

    def poisoned(out, y):
        seen["n"] += 1
        loss = F.cross_entropy(out, y)
        return loss * float("nan") if seen["n"] == 2 else loss

    sched = one_cycle(opt, len(train))
    calls = count_steps(sched)
    result = fit(model, train, None, opt, poisoned, epochs=1, scheduler=sched,
                 scheduler_interval="step", transforms=chain(skip_nonfinite()))  # fmt: skip
    assert result.skipped_steps == 1
    assert calls["n"] == result.steps == len(train)


def test_epoch_interval_steps_once_per_epoch():
    train, _ = loaders()
    model, opt = make()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    calls = count_steps(sched)
    result = fit(model, train, None, opt, epochs=EPOCHS, scheduler=sched)
    assert calls["n"] == EPOCHS
    assert [row["lr"] for row in result.history] == [0.025, 0.0125, 0.00625]


def test_one_cycle_schedules_that_cannot_be_followed_fail_fast():
    train, _ = loaders()
    model, opt = make()
    before = [p.detach().clone() for p in model.parameters()]
    # the classic bug: a per-batch OneCycleLR stepped once per epoch never completes its cycle
    with pytest.raises(ValueError, match="scheduler_interval='step'"):
        fit(model, train, None, opt, epochs=EPOCHS, scheduler=one_cycle(opt, EPOCHS * len(train)))
    # too few total_steps would make torch raise in the middle of the run
    with pytest.raises(ValueError, match=r"total_steps=10 but this run makes 18"):
        fit(model, train, None, opt, epochs=EPOCHS, scheduler=one_cycle(opt, 10),
            scheduler_interval="step")  # fmt: skip
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)  # raised before training


def test_per_step_schedule_stops_once_swa_averages():
    train, _ = loaders()
    model, opt = make()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.99**step)
    calls = count_steps(sched)
    fit(model, train, None, opt, epochs=5, scheduler=sched, scheduler_interval="step",
        swa=SWA(model, start=2))  # fmt: skip
    # epochs 0-2 step per batch; SWA averages from the end of epoch 2 on (as with "epoch",
    # where the scheduler is not stepped from epoch 2's end on)
    assert calls["n"] == 3 * len(train)


def test_bad_scheduler_interval_raises():
    train, _ = loaders()
    model, opt = make()
    with pytest.raises(ValueError, match="scheduler_interval must be 'epoch' or 'step'"):
        fit(model, train, None, opt, epochs=1, scheduler_interval="batch")


# ------------------------------------------------------------------ plateau schedulers
def plateau(opt):
    # a large relative threshold, so that the improvement stalls within a few epochs
    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1, threshold=0.05)


def test_plateau_lowers_lr_on_the_monitored_val_loss_like_a_hand_loop():
    train, val = loaders()
    epochs = 10
    model, opt = make(lr=0.02)
    result = fit(model, train, val, opt, epochs=epochs, scheduler=plateau(opt))
    ref, ref_opt = make(lr=0.02)
    ref_sched = plateau(ref_opt)
    ref_lrs, ref_losses = [], []
    for epoch in range(epochs):
        train.sampler.set_epoch(epoch)
        ref.train()
        for x, y in train:
            F.cross_entropy(ref(x), y).backward()
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)
        ref.eval()
        with torch.no_grad():
            val_loss = sum(F.cross_entropy(ref(x), y).item() for x, y in val)  # one batch
        ref_sched.step(val_loss)
        ref_losses.append(val_loss)
        ref_lrs.append(ref_opt.param_groups[0]["lr"])
    assert [row["val_loss"] for row in result.history] == pytest.approx(ref_losses, rel=1e-6)
    assert [row["lr"] for row in result.history] == ref_lrs
    assert ref_lrs[-1] < 0.02  # it did lower the learning rate
    first_drop = next(e for e, lr in enumerate(ref_lrs) if lr < 0.02)
    assert first_drop >= 2  # patience=1: two epochs without improvement first


def test_plateau_can_watch_another_metric_of_the_row():
    train, _ = loaders()
    model, opt = make()
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", patience=0)
    calls = count_steps(sched)
    # train_loss falls, so judged with mode="max" it never improves: the lr halves... by 10
    result = fit(model, train, None, opt, epochs=3, scheduler=sched, scheduler_monitor="train_loss")
    assert calls["n"] == 3
    assert result.history[-1]["lr"] == pytest.approx(0.05 * 0.1**2)


def test_plateau_errors_name_the_monitor_and_the_interval():
    train, val = loaders()
    model, opt = make()
    missing = r"scheduler_monitor='val_f1'.*available: epoch, train_loss, val_loss, val_acc"
    with pytest.raises(ValueError, match=missing):
        fit(model, train, val, opt, epochs=2, scheduler=plateau(opt), scheduler_monitor="val_f1")
    model, opt = make()
    before = [p.detach().clone() for p in model.parameters()]
    no_val = r"scheduler_monitor='val_loss'.*available: epoch, train_loss"
    with pytest.raises(ValueError, match=no_val):
        fit(model, train, None, opt, epochs=2, scheduler=plateau(opt))
    per_step = "scheduler_interval='step' cannot drive a ReduceLROnPlateau"
    with pytest.raises(ValueError, match=per_step):
        fit(model, train, val, opt, epochs=2, scheduler=plateau(opt), scheduler_interval="step")
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)  # both raised before training


# ------------------------------------------------------------------ resume
@pytest.mark.parametrize("kind", ["one_cycle_per_step", "plateau"])
def test_resume_with_a_scheduler_continues_exactly(tmp_path, kind):
    train, val = loaders()
    epochs = 6

    def run(until, directory, resume=False):
        model, opt = make()
        if kind == "plateau":
            sched, interval = plateau(opt), "epoch"
        else:
            sched, interval = one_cycle(opt, epochs * len(train)), "step"
        torch.manual_seed(0)
        result = fit(model, train, val, opt, epochs=until, scheduler=sched,
                     scheduler_interval=interval, checkpoints=CheckpointManager(directory),
                     resume=resume)  # fmt: skip
        return model, result, sched

    straight, full, full_sched = run(epochs, tmp_path / "a")
    run(3, tmp_path / "b")
    resumed, part, part_sched = run(epochs, tmp_path / "b", resume=True)
    assert strip_time(part.history) == strip_time(full.history)
    assert part_sched.state_dict() == full_sched.state_dict()
    if kind == "one_cycle_per_step":
        assert part_sched.last_epoch == epochs * len(train)
    else:
        assert full.history[-1]["lr"] < 0.05
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
