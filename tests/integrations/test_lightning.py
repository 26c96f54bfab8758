"""trainwell's Lightning callbacks, on the real ``lightning.Trainer``, against references.

The references are hand-written torch loops (the same data, init, optimizer and step
rule), a hand-computed EMA, trainwell's ``EarlyStopping`` fed the same values, and
Lightning runs that do the same thing another way (the penalty in the loss).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.integrations.lightning_models import (
    Regression,
    make_loader,
    make_net,
    quiet_trainer,
)
from trainwell import DropoutSchedule, EarlyStopping, GradMonitor, Regularizer
from trainwell.gradients import GradientTransform, chain, clip_by_norm, skip_nonfinite

L = pytest.importorskip("lightning")
tl = pytest.importorskip("trainwell.integrations.lightning")

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


class SkipCalls(GradientTransform):
    """Ask to skip the listed calls (0-based) with finite gradients."""

    def __init__(self, calls: set[int]) -> None:
        self.calls, self.n = calls, 0

    def apply_(self, params: Any) -> dict[str, Any]:
        n, self.n = self.n, self.n + 1
        return {"skip": n in self.calls}


def reference_run(
    optimizer: str,
    lr: float,
    epochs: int,
    *,
    accumulate: int = 1,
    clip: float | None = None,
    nan_batches: set[tuple[int, int]] = frozenset(),  # type: ignore[assignment]
    skip_windows: set[int] = frozenset(),  # type: ignore[assignment]
    autocast: torch.dtype | None = None,
    ema_decay: float | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer, list[list[torch.Tensor]]]:
    """The hand-written loop: mean-of-window gradients, skip non-finite or listed windows.

    Returns the net, the optimizer and the EMA after each epoch (hand-computed:
    a copy at the first step, then ``d * ema + (1 - d) * w``).
    """
    net = make_net()
    opt_cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam
    opt = opt_cls(net.parameters(), lr=lr)
    ema: list[torch.Tensor] | None = None
    ema_per_epoch: list[list[torch.Tensor]] = []
    window = 0
    ctx = (
        (lambda: torch.autocast("cpu", dtype=autocast, cache_enabled=False))
        if autocast
        else contextlib.nullcontext
    )
    for epoch in range(epochs):
        for i, (x, y) in enumerate(make_loader()):
            with ctx():
                loss = F.mse_loss(net(x), y)
            if (epoch, i) in nan_batches:
                loss = loss * float("nan")
            (loss / accumulate).backward()
            if (i + 1) % accumulate:
                continue
            finite = all(torch.isfinite(p.grad).all() for p in net.parameters())
            if finite and window not in skip_windows:
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
                opt.step()
                weights = [p.detach().clone() for p in net.parameters()]
                if ema_decay is not None:
                    ema = weights if ema is None else ema_step(ema, weights, ema_decay)
            opt.zero_grad(set_to_none=True)
            window += 1
        ema_per_epoch.append(list(ema or []))
    return net, opt, ema_per_epoch


def ema_step(ema: list[torch.Tensor], live: list[torch.Tensor], d: float) -> list[torch.Tensor]:
    """The EMA rule by hand: ``d * ema + (1 - d) * w``."""
    return [d * e + (1 - d) * w for e, w in zip(ema, live, strict=True)]


def weights(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def assert_close(a: list[torch.Tensor], b: list[torch.Tensor], **tol: float) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, **tol)


def adam_steps(trainer: Any) -> list[int]:
    opt = trainer.optimizers[0]
    return sorted({int(opt.state[p]["step"]) for g in opt.param_groups for p in g["params"]})


# ------------------------------------------------------------------ gradient transforms
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_nan_gradient_is_skipped_where_lightning_alone_applies_it(precision: str) -> None:
    """chain(skip_nonfinite(), clip_by_norm) skips the planted NaN step, leaves Adam's state
    as if it never happened and clips like clip_grad_norm_; Lightning's own
    gradient_clip_val turns the weights into NaN."""
    nan = [(0, 1)]
    guarded = Regression("adam", lr=0.05, nan_batches=nan)
    callback = tl.GradientTransformCallback(chain(skip_nonfinite(), clip_by_norm(1.0)))
    trainer = quiet_trainer(max_epochs=2, precision=precision, callbacks=[callback])
    trainer.fit(guarded, make_loader())

    dtype = torch.bfloat16 if precision == "bf16-mixed" else None
    ref, ref_opt, _ = reference_run("adam", 0.05, 2, clip=1.0, nan_batches=set(nan), autocast=dtype)
    assert all(torch.isfinite(w).all() for w in weights(guarded))
    assert_close(weights(guarded), weights(ref), rtol=1e-5, atol=1e-6)
    assert callback.skipped_steps == 1 and callback.skipped_step == 1
    assert trainer.global_step == 16 and adam_steps(trainer) == [15]  # 16 calls, one skipped
    assert callback.transforms.transforms[0].first_bad  # the guard named the bad parameters

    plain = Regression("adam", lr=0.05, nan_batches=nan)
    quiet_trainer(max_epochs=2, precision=precision, gradient_clip_val=1.0).fit(
        plain, make_loader()
    )
    assert all(torch.isnan(w).all() for w in weights(plain))


def test_a_skip_with_finite_gradients_leaves_weights_and_adam_state_untouched() -> None:
    """A transform's skip (finite gradients) under accumulate_grad_batches=2: the optimizer
    neither moves the weights nor counts the step, exactly like the loop that skips it."""
    module = Regression("adam", lr=0.05)
    callback = tl.GradientTransformCallback(SkipCalls({1, 4}))
    trainer = quiet_trainer(max_epochs=2, accumulate_grad_batches=2, callbacks=[callback])
    trainer.fit(module, make_loader())
    ref, _, _ = reference_run("adam", 0.05, 2, accumulate=2, skip_windows={1, 4})
    assert_close(weights(module), weights(ref), rtol=1e-5, atol=1e-6)
    assert trainer.global_step == 8 and adam_steps(trainer) == [6]
    assert callback.skipped_steps == 2 and callback.skipped_step == 4


def test_transforms_reject_what_is_not_a_transform() -> None:
    with pytest.raises(TypeError, match="transforms must be a trainwell gradient transform"):
        tl.GradientTransformCallback(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="stopper must be a trainwell EarlyStopping"):
        tl.EarlyStoppingCallback("val_loss")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="decay must be a number in"):
        tl.EMACallback(decay=1.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("optimizer", ["adam", "adam-fused"])
def test_16_mixed_skips_keep_the_scaler_and_adam_consistent(optimizer: str) -> None:
    """Under 16-mixed: a NaN step lowers the scale once (the scaler saw it at unscale) and a
    finite skip does not; Adam counts neither; the transforms see unscaled gradients (a
    fused Adam, which Lightning does not unscale for, included)."""
    module = Regression(optimizer, lr=0.05, nan_batches=[(0, 1)])
    callback = tl.GradientTransformCallback(chain(skip_nonfinite(), SkipCalls({2})))
    monitor = tl.GradMonitorCallback(GradMonitor(module, every=1))
    # a small initial scale: no fp16 overflow but the planted one (2**16 can overflow here)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**8)
    precision = L.pytorch.plugins.MixedPrecision("16-mixed", "cuda", scaler=scaler)
    trainer = L.Trainer(
        accelerator="gpu", devices=1, plugins=[precision], max_epochs=1, logger=False,
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[callback, monitor],
    )  # fmt: skip
    trainer.fit(module, make_loader())
    assert trainer.precision_plugin.scaler is scaler
    assert scaler.get_scale() == 2.0**7  # halved once, by the NaN step only
    assert callback.skipped_steps == 2 and adam_steps(trainer) == [6]
    assert all(torch.isfinite(w).all() for w in weights(module))
    norms = [row["grad_norm"] for row in monitor.monitor.history]
    assert norms and max(norms) < 20.0  # unscaled: a scaled norm is 2**8 times larger


# ------------------------------------------------------------------------ regularizer
def test_the_regularizer_callback_equals_the_penalty_in_the_loss() -> None:
    """SGD, accumulate_grad_batches=2: the penalty's gradient added once per optimizer step
    equals l2 * ||w||^2 added to every micro-batch's (averaged) loss."""
    reg = Regularizer(l2=0.05)
    with_callback = Regression("sgd", lr=0.1)
    quiet_trainer(
        max_epochs=2, accumulate_grad_batches=2, callbacks=[tl.RegularizerCallback(reg)]
    ).fit(with_callback, make_loader())
    in_loss = Regression("sgd", lr=0.1, penalty=reg.penalty)
    quiet_trainer(max_epochs=2, accumulate_grad_batches=2).fit(in_loss, make_loader())
    assert_close(weights(with_callback), weights(in_loss), rtol=1e-5, atol=1e-6)
    plain, _, _ = reference_run("sgd", 0.1, 2, accumulate=2)
    gap = max(
        float((a - b).abs().max()) for a, b in zip(weights(in_loss), weights(plain), strict=True)
    )
    assert gap > 1e-3  # the penalty changed the result: the comparison has teeth


@pytest.mark.parametrize("log", [False, True])
def test_the_skip_count_is_logged_only_when_asked(tmp_path: Path, log: bool) -> None:
    """Lightning gives every callback a ``log`` attribute (the module's ``log``): the
    option must not be read from it, or every step pays a ``pl_module.log`` call."""
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="run")
    callback = tl.GradientTransformCallback(chain(clip_by_norm(1.0)), log=log)
    trainer = quiet_trainer(max_epochs=1, callbacks=[callback], logger=logger, log_every_n_steps=1)
    trainer.fit(Regression("sgd", lr=0.1), make_loader())
    logged = Path(logger.log_dir) / "metrics.csv"  # written only when something was logged
    columns = set(next(csv.reader(logged.open()), [])) if logged.is_file() else set()
    assert ("skipped_steps" in columns) is log


# -------------------------------------------------------------------------- monitor
def test_the_monitor_sees_the_raw_gradients_and_its_rows_are_logged(tmp_path: Path) -> None:
    """Listed after the transforms, the monitor still measures before them (trainwell's
    loop order); every row reaches the logger through pl_module.log."""
    module = Regression("sgd", lr=0.1)
    monitor = GradMonitor(module, every=1)
    callbacks = [
        tl.GradientTransformCallback(chain(clip_by_norm(1e-3)), log=True),
        tl.GradMonitorCallback(monitor),
    ]
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="run")
    trainer = quiet_trainer(max_epochs=1, callbacks=callbacks, logger=logger, log_every_n_steps=1)
    trainer.fit(module, make_loader())

    recorded = [row["grad_norm"] for row in monitor.history]
    assert len(recorded) == 8
    assert recorded == pytest.approx(module.backward_norms, rel=1e-5)  # before the clipping
    assert min(recorded) > 1e-2  # ... which cuts every norm to 1e-3
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("grad_norm")]
    assert [float(r["grad_norm"]) for r in rows] == pytest.approx(recorded, rel=1e-6)
    assert {"grad_norm/net.0", "update_ratio/net.3", "skipped_steps"} <= set(rows[0])
    assert float(rows[0]["update_ratio/net.0"]) == pytest.approx(
        monitor.history[0]["update_ratio/net.0"], rel=1e-6
    )


# ------------------------------------------------------------------------------ EMA
def test_ema_equals_the_hand_computed_average_and_survives_a_resume(tmp_path: Path) -> None:
    """accumulate_grad_batches=2: one EMA update per optimizer step (8 in 2 epochs), equal
    to the hand-computed EMA; validation runs on the EMA weights and the live weights come
    back; a run resumed from a checkpoint (weights_only) ends with the same EMA."""
    decay = 0.8
    module = Regression("sgd", lr=0.1)
    ema_cb = tl.EMACallback(decay=decay, validate=True)
    trainer = quiet_trainer(max_epochs=2, accumulate_grad_batches=2, callbacks=[ema_cb])
    trainer.fit(module, make_loader(), make_loader(8))

    ref, _, ref_ema = reference_run("sgd", 0.1, 2, accumulate=2, ema_decay=decay)
    assert ema_cb.ema is not None and ema_cb.ema.n_averaged == 8
    assert_close(weights(ema_cb.ema.module.net), ref_ema[-1], rtol=1e-5, atol=1e-6)
    assert_close(weights(module), weights(ref), rtol=1e-5, atol=1e-6)  # live weights back
    for seen, expected in zip(module.val_weights, ref_ema, strict=True):
        torch.testing.assert_close(seen, expected[0], rtol=1e-5, atol=1e-6)  # validated EMA

    first = quiet_trainer(
        max_epochs=1, accumulate_grad_batches=2, callbacks=[tl.EMACallback(decay)]
    )
    first.fit(Regression("sgd", lr=0.1), make_loader())
    first.save_checkpoint(tmp_path / "epoch0.ckpt")
    resumed_cb = tl.EMACallback(decay=decay, validate=True)
    resumed = Regression("sgd", lr=0.1)
    quiet_trainer(max_epochs=2, accumulate_grad_batches=2, callbacks=[resumed_cb]).fit(
        resumed, make_loader(), make_loader(8), ckpt_path=tmp_path / "epoch0.ckpt",
        weights_only=True,
    )  # fmt: skip
    assert resumed_cb.ema is not None
    assert (resumed_cb.ema.step, resumed_cb.ema.n_averaged) == (8, 8)
    assert_close(weights(resumed_cb.ema.module), weights(ema_cb.ema.module), rtol=0, atol=0)
    assert_close(weights(resumed), weights(module), rtol=0, atol=0)


# ------------------------------------------------------------------- early stopping
VAL = [1.0, 0.9, 0.95, 0.92, 0.91, 0.97, 0.5, 0.4]


def stop_epoch(values: list[float], **options: Any) -> int | None:
    """The check at which trainwell's EarlyStopping, fed ``values`` by hand, says stop."""
    stopper = EarlyStopping("val_loss", **options)
    return next((i for i, v in enumerate(values) if stopper({"val_loss": v})), None)


def fit_stopping(max_epochs: int, values: list[float], ckpt: Path | None = None,
                 save: Path | None = None, **options: Any) -> tuple[Regression, Any]:  # fmt: skip
    module = Regression("sgd", lr=0.01, val_losses=values)
    callback = tl.EarlyStoppingCallback(EarlyStopping("val_loss", **options))
    trainer = quiet_trainer(max_epochs=max_epochs, callbacks=[callback])
    trainer.fit(module, make_loader(), make_loader(8), ckpt_path=ckpt)
    if save is not None:
        trainer.save_checkpoint(save)
    return module, callback


def test_early_stopping_resumed_stops_at_the_epoch_of_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    expected = stop_epoch(VAL, patience=3)
    assert expected == 4
    module, callback = fit_stopping(len(VAL), VAL, patience=3)
    assert module.epochs_seen[-1] == expected
    assert callback.stopper.reason == "val_loss did not improve for 3 checks"

    fit_stopping(3, VAL, save=tmp_path / "e2.ckpt", patience=3)  # epochs 0-2, then a "crash"
    resumed, resumed_cb = fit_stopping(len(VAL), VAL, ckpt=tmp_path / "e2.ckpt", patience=3)
    assert resumed.epochs_seen == [3, 4]
    assert resumed_cb.stopper.state_dict() == callback.stopper.state_dict()

    fit_stopping(len(VAL), VAL, save=tmp_path / "stopped.ckpt", patience=3)
    after_stop, _ = fit_stopping(len(VAL) + 2, VAL + [0.1, 0.1], ckpt=tmp_path / "stopped.ckpt",
                                 patience=3)  # fmt: skip
    assert after_stop.epochs_seen == []  # the stopper had stopped: nothing more is trained


@pytest.mark.parametrize("nan_policy", ["stop", "worst"])
def test_early_stopping_follows_trainwells_nan_policy(nan_policy: str) -> None:
    values = [1.0, float("nan"), 0.8, 0.9, 0.9, 0.9]
    expected = stop_epoch(values, patience=2, nan_policy=nan_policy)
    assert expected == (1 if nan_policy == "stop" else 4)
    module, callback = fit_stopping(len(values), values, patience=2, nan_policy=nan_policy)
    assert module.epochs_seen[-1] == expected
    if nan_policy == "worst":  # Lightning keeps logged values as float32 tensors
        assert (callback.stopper.best, callback.stopper.best_step) == (pytest.approx(0.8), 2)


# ------------------------------------------------------------------ dropout schedule
@pytest.mark.parametrize("unit", ["step", "epoch"])
def test_the_dropout_schedule_steps_per_optimizer_step_or_epoch(unit: str) -> None:
    module = Regression("sgd", lr=0.1, dropout=0.5)
    total = 8 if unit == "step" else 2  # 2 epochs of 4 optimizer steps (accumulating 2)
    schedule = DropoutSchedule(module, "linear", p=0.0, p_start=0.5, total=total, unit=unit)
    callback = tl.DropoutScheduleCallback(schedule)
    quiet_trainer(max_epochs=2, accumulate_grad_batches=2, callbacks=[callback]).fit(
        module, make_loader()
    )
    assert schedule.t == total and module.net[2].p == 0.0 == schedule.rate


# ------------------------------------------------------------------------------ DDP
def test_ddp_two_processes_take_the_same_decisions(tmp_path: Path) -> None:
    """strategy="ddp", 2 CPU processes (gloo), every callback: the NaN planted on rank 1 is
    skipped on both ranks; both ranks end with the same weights and EMA and stop at the
    epoch that the mean of the ranks' val_loss gives (rank 0 alone would stop earlier)."""
    from tests.integrations import lightning_ddp

    out = tmp_path / "ddp"
    failures = []
    for _ in range(2):  # once more after a failure: a deterministic bug fails both times
        done = subprocess.run(
            [sys.executable, str(HERE / "lightning_ddp.py"), str(out)],
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )  # fmt: skip
        if done.returncode == 0:
            break
        failures.append(f"rc={done.returncode}\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}")
    assert done.returncode == 0, "\n---\n".join(failures)
    if failures:  # the first attempt's failure, kept visible in the test report
        warnings.warn(f"the DDP run failed once, then passed: {failures[0][-1500:]}", stacklevel=1)
    ranks = [json.loads((tmp_path / f"ddp.rank{r}.json").read_text()) for r in (0, 1)]
    mean = [(a + b) / 2 for a, b in zip(*lightning_ddp.VAL_LOSSES, strict=True)]
    expected = stop_epoch(mean, patience=2)
    assert expected == 4 and stop_epoch(lightning_ddp.VAL_LOSSES[0], patience=2) == 3
    for r in ranks:
        assert r["world_size"] == 2 and r["last_epoch"] == expected
        assert r["skipped_steps"] == 1 and r["adam_steps"] == [r["global_step"] - 1]
        assert all(math.isfinite(v) for v in r["weights"])
        assert r["monitor_rows"] == r["global_step"] - 1
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["ema"] == ranks[1]["ema"] and ranks[0]["ema"] != ranks[0]["weights"]
    assert ranks[0]["rank"] == 0 and ranks[1]["rank"] == 1


# ------------------------------------------------------------------------ docs, extra
def docs_example() -> str:
    text = (ROOT / "docs" / "sections" / "integrations_lightning.md").read_text()
    assert text.startswith("## Lightning")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_the_docs_example_runs(tmp_path: Path) -> None:
    (tmp_path / "example.py").write_text(docs_example())
    done = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ema val_loss" in done.stdout
    assert (tmp_path / "ema.safetensors").is_file()


def test_without_lightning_the_import_names_the_extra() -> None:
    code = (
        "import sys\n"
        "sys.modules['lightning'] = None; sys.modules['lightning.pytorch'] = None\n"
        "from trainwell.integrations import MissingExtra\n"
        "try:\n"
        "    import trainwell.integrations.lightning\n"
        "except MissingExtra as err:\n"
        "    print(err)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install 'trainwell[lightning]'" in done.stdout, done.stderr
