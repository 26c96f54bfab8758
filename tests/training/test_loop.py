import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainwell import Accumulator, CheckpointManager, EarlyStopping, chain, fit, skip_nonfinite
from trainwell.app.data import load_splits


@pytest.fixture(scope="module")
def splits():
    return load_splits("wine", seed=0)


def make(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def strip_time(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_fit_equals_a_hand_written_loop_bit_for_bit(splits):
    model, opt = make()
    loader = splits.loader("train", 16, shuffle=True, seed=1)
    torch.manual_seed(7)
    fit(model, loader, None, opt, epochs=3)
    ref, ref_opt = make()
    torch.manual_seed(7)
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        ref.train()
        for x, y in loader:
            loss = F.cross_entropy(ref(x), y)
            loss.backward()
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


def test_fit_is_deterministic_and_reports_history(splits):
    runs = []
    for _ in range(2):
        model, opt = make()
        torch.manual_seed(0)
        result = fit(
            model, splits.loader("train", 16, shuffle=True), splits.loader("val", 64), opt, epochs=4
        )
        runs.append((model.state_dict(), strip_time(result.history)))
        assert [r["epoch"] for r in result.history] == [0, 1, 2, 3]
        assert {"train_loss", "val_loss", "val_acc", "seconds", "lr"} <= set(result.history[0])
        assert result.steps == 4 * len(splits.loader("train", 16))
    assert runs[0][1] == runs[1][1]
    for key in runs[0][0]:
        assert torch.equal(runs[0][0][key], runs[1][0][key])


def test_accumulation_steps_per_epoch(splits):
    model, opt = make()
    loader = splits.loader("train", 10, shuffle=True)
    batches = len(loader)
    result = fit(model, loader, None, opt, epochs=2, accumulator=Accumulator(model, 4))
    assert result.steps == 2 * -(-batches // 4)  # partial last window still steps


def test_planted_nan_never_reaches_the_optimizer(splits):
    model, opt = make()
    calls = {"n": 0}

    def poisoned(out, y):
        calls["n"] += 1
        loss = F.cross_entropy(out, y)
        return loss * float("nan") if calls["n"] == 3 else loss

    stepped = {"n": 0}
    original = opt.step

    def counting_step(*args, **kwargs):
        for p in model.parameters():
            assert torch.isfinite(p.grad).all()
        stepped["n"] += 1
        return original(*args, **kwargs)

    opt.step = counting_step
    result = fit(
        model,
        splits.loader("train", 16),
        None,
        opt,
        poisoned,
        epochs=1,
        transforms=chain(skip_nonfinite()),
    )
    assert result.skipped_steps == 1
    assert stepped["n"] == result.steps - 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


class Boom:
    def __init__(self, at, exc):
        self.at, self.exc = at, exc

    def on_epoch_end(self, row):
        if row["epoch"] == self.at:
            raise self.exc


@pytest.mark.parametrize("how", ["patience", "max_epochs", "interrupt", "exception"])
def test_restore_best_whatever_stopped_training(splits, how):
    model, opt = make()
    # a learning rate schedule that makes training diverge after a few epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 if e < 3 else 40.0)
    seen = {}

    class Track:
        def on_epoch_end(self, row):
            seen[row["epoch"]] = (
                row["val_loss"],
                {k: v.clone() for k, v in model.state_dict().items()},
            )

    callbacks = [Track()]
    stopper = EarlyStopping(patience=2, nan_policy="worst") if how == "patience" else None
    if how == "interrupt":
        callbacks.append(Boom(5, KeyboardInterrupt()))
    if how == "exception":
        callbacks.append(Boom(5, RuntimeError("boom")))
    kwargs = dict(
        epochs=7, scheduler=sched, restore_best=True, early_stopping=stopper, callbacks=callbacks
    )
    if how == "exception":
        with pytest.raises(RuntimeError, match="boom"):
            fit(
                model,
                splits.loader("train", 16, shuffle=True),
                splits.loader("val", 64),
                opt,
                **kwargs,
            )
    else:
        result = fit(
            model, splits.loader("train", 16, shuffle=True), splits.loader("val", 64), opt, **kwargs
        )
        assert result.stop_reason != "max_epochs" or how == "max_epochs"
    finite = {e: v for e, v in seen.items() if v[0] == v[0]}
    best_epoch = min(finite, key=lambda e: finite[e][0])
    assert best_epoch < max(seen)  # training got worse after the best epoch
    for key, value in model.state_dict().items():
        assert torch.equal(value, finite[best_epoch][1][key])


def test_resume_continues_exactly(splits, tmp_path):
    def run(epochs, directory, resume=False):
        model, opt = make()
        torch.manual_seed(0)
        manager = CheckpointManager(directory)
        result = fit(
            model,
            splits.loader("train", 16, shuffle=True),
            splits.loader("val", 64),
            opt,
            epochs=epochs,
            checkpoints=manager,
            resume=resume,
            early_stopping=EarlyStopping(patience=50),
        )
        return model, result

    straight, full = run(6, tmp_path / "a")
    run(3, tmp_path / "b")
    resumed, part = run(6, tmp_path / "b", resume=True)
    assert strip_time(part.history) == strip_time(full.history)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_fit_rejects_bad_epochs(splits):
    model, opt = make()
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        fit(model, splits.loader("train", 16), None, opt, epochs=0)


def test_transforms_and_regularizer_see_unscaled_gradients_under_grad_scaler(splits):
    from trainwell import Regularizer, clip_by_norm

    norms = {}
    for use_scaler in (False, True):
        model, opt = make()
        seen = []

        class Record:
            def apply_(self, params, seen=seen):
                stats = clip_by_norm(1e9).apply_(params)
                seen.append(float(stats["grad_norm"]))
                return stats

        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if use_scaler else None
        torch.manual_seed(0)
        fit(model, splits.loader("train", 16), None, opt, epochs=1, scaler=scaler,
            regularizer=Regularizer(l2=1e-2), transforms=Record())  # fmt: skip
        norms[use_scaler] = seen
    assert norms[True] == pytest.approx(norms[False], rel=1e-4)


@pytest.mark.parametrize("restore_best", [False, True])
def test_resuming_an_early_stopped_run_trains_nothing_more(splits, tmp_path, restore_best):
    """Issue: a resumed early-stopped run trained one more epoch (8 rows instead of 7)."""

    def run(resume=False):
        model, opt = make()
        torch.manual_seed(0)
        result = fit(
            model, splits.loader("train", 16, shuffle=True), splits.loader("val", 64), opt,
            epochs=40, checkpoints=CheckpointManager(tmp_path), resume=resume,
            early_stopping=EarlyStopping(patience=2, min_delta=0.05), restore_best=restore_best,
        )  # fmt: skip
        return model, result

    first, done = run()
    assert done.stop_reason != "max_epochs" and done.epochs_run < 40
    again, resumed = run(resume=True)
    assert strip_time(resumed.history) == strip_time(done.history)
    assert (resumed.steps, resumed.stop_reason, resumed.finished) == (
        done.steps, done.stop_reason, True)  # fmt: skip
    for a, b in zip(first.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)


def test_monitor_history_survives_a_resume(splits, tmp_path):
    """Issue: grad_norms.csv lost every row from before the resume point."""
    from trainwell import GradMonitor

    def run(epochs, directory, resume=False):
        model, opt = make()
        torch.manual_seed(0)
        monitor = GradMonitor(model, every=3)
        return fit(model, splits.loader("train", 16, shuffle=True), None, opt, epochs=epochs,
                   monitor=monitor, checkpoints=CheckpointManager(directory),
                   resume=resume)  # fmt: skip

    straight = run(4, tmp_path / "a")
    run(2, tmp_path / "b")
    resumed = run(4, tmp_path / "b", resume=True)
    assert len(straight.grad_history) > 10
    assert resumed.grad_history == straight.grad_history


def test_on_step_end_sees_every_optimizer_step_with_its_loss_and_skip(splits):
    """The per-step hook: one call per optimizer step (skipped ones too), counted from 1,
    with the loss that step's window ended on and the transforms' ``skip``."""
    model, opt = make()
    calls = []

    class Steps:
        def on_step_end(self, step, info):
            calls.append((step, bool(info["skip"]), float(info["loss"]), info["lr"]))

    def poisoned(out, y):
        loss = F.cross_entropy(out, y)
        return loss * float("nan") if len(calls) == 2 else loss

    result = fit(
        model,
        splits.loader("train", 16),
        None,
        opt,
        poisoned,
        epochs=2,
        accumulator=Accumulator(model, 3),
        transforms=chain(skip_nonfinite()),
        callbacks=[Steps()],
    )
    assert [c[0] for c in calls] == list(range(1, result.steps + 1))
    assert [c[1] for c in calls].count(True) == result.skipped_steps >= 1
    assert calls[2][1] and not any(skip for _, skip, _, _ in calls[:2])
    assert all(c[3] == opt.param_groups[0]["lr"] for c in calls)
    assert all(math.isfinite(c[2]) for i, c in enumerate(calls) if not c[1])
