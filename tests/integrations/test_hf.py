"""trainwell's Hugging Face ``Trainer`` callbacks, run in the real Trainer on a tiny BERT."""

from __future__ import annotations

import importlib
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer, TrainerCallback  # noqa: E402

from tests.integrations.hf_tiny import TokenData, arguments, tiny_bert  # noqa: E402
from trainwell import EarlyStopping  # noqa: E402
from trainwell.gradients import chain, clip_by_norm, skip_nonfinite  # noqa: E402
from trainwell.integrations import MissingExtra  # noqa: E402
from trainwell.integrations.hf import (  # noqa: E402
    EMACallback,
    GradientTransformCallback,
    GradMonitorCallback,
    StoppingCallback,
)

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def trainer(
    out: Path, callbacks: list[TrainerCallback], seed: int = 0, flip: bool = False, **overrides: Any
) -> Trainer:
    return Trainer(
        model=tiny_bert(seed),
        args=arguments(out, **overrides),
        train_dataset=TokenData(64, 0),
        eval_dataset=TokenData(32, 1, flip=flip),
        callbacks=callbacks,
    )


class AfterStep(TrainerCallback):
    """Records the live weights (and the EMA's) after every optimizer step."""

    def __init__(self, ema: EMACallback | None = None) -> None:
        self.ema, self.live, self.averages, self.resumed = ema, [], [], None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.ema is not None and state.global_step > 0:
            self.resumed = weights(self.ema.ema.module)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.live.append(weights(model))
        if self.ema is not None:
            self.averages.append(weights(self.ema.ema.module))


class CrashAt(TrainerCallback):
    """Simulates a crash at the start of optimizer step ``step + 1``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"crash at step {self.step}")


# --------------------------------------------------------------------------------- EMA
def test_ema_equals_a_hand_computed_ema_of_each_optimizer_steps_weights(tmp_path):
    ema = EMACallback(decay=0.8)
    seen = AfterStep()
    t = trainer(tmp_path, [ema, seen], max_steps=4, gradient_accumulation_steps=2)
    t.train()
    assert len(seen.live) == 4 and ema.ema.step == 4  # once per accumulated batch
    expected = dict(seen.live[0])
    for w in seen.live[1:]:
        expected = {n: 0.8 * expected[n] + 0.2 * w[n] for n in w}
    for name, p in ema.ema.module.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=1e-5, atol=1e-6)


def test_evaluation_uses_the_ema_weights_and_restores_the_live_ones(tmp_path):
    ema = EMACallback(decay=0.9)
    seen = AfterStep()
    t = trainer(tmp_path, [ema, seen], max_steps=4, eval_strategy="steps", eval_steps=4)
    t.train()
    during = [h["eval_loss"] for h in t.state.log_history if "eval_loss" in h]
    for name, p in t.model.named_parameters():  # the live weights came back
        assert torch.equal(p, seen.live[-1][name])
    live = t.evaluate()["eval_loss"]
    with ema.swapped(t.model):
        averaged = t.evaluate()["eval_loss"]
    assert len(during) == 1 and during[0] == pytest.approx(averaged, rel=1e-6)
    assert abs(live - averaged) > 1e-4


def test_ema_is_restored_on_resume_exactly(tmp_path):
    steps = {"max_steps": 6, "save_strategy": "steps", "save_steps": 2}
    full_ema = EMACallback(decay=0.7)
    full = AfterStep(full_ema)
    trainer(tmp_path / "full", [full_ema, full], **steps).train()

    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path / "cut", [EMACallback(decay=0.7), CrashAt(4)], **steps).train()
    assert (tmp_path / "cut" / "checkpoint-4" / "trainwell_ema.safetensors").is_file()
    ema = EMACallback(decay=0.7)
    resumed = AfterStep(ema)
    trainer(tmp_path / "cut", [ema, resumed], seed=1, **steps).train(resume_from_checkpoint=True)

    for name, p in resumed.resumed.items():  # right after the restore: the average at step 4
        assert torch.equal(p, full.averages[3][name]), name
    assert ema.ema.step == 6
    for name, p in ema.ema.module.named_parameters():
        torch.testing.assert_close(p, full.averages[5][name], rtol=1e-5, atol=1e-7)


def test_copy_at_end_puts_the_ema_into_the_model(tmp_path):
    ema = EMACallback(decay=0.9, copy_at_end=True)
    t = trainer(tmp_path, [ema], max_steps=3)
    t.train()
    for (name, p), q in zip(t.model.named_parameters(), ema.ema.module.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_resume_without_the_state_file_raises(tmp_path):
    steps = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path, [CrashAt(2)], **steps).train()
    with pytest.raises(FileNotFoundError, match="checkpoint-2.*resume_from"):
        trainer(tmp_path, [EMACallback()], **steps).train(resume_from_checkpoint=True)


# ---------------------------------------------------------------------- early stopping
class Forgetful(StoppingCallback):
    """A stopping callback whose state is reset on resume (what the test must catch)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stopper.reset()


def stop_run(out: Path, callback: StoppingCallback, crash: int | None = None) -> Trainer:
    """Eval every step on flipped labels: eval_loss gets worse at every step after the first."""
    callbacks = [callback] if crash is None else [callback, CrashAt(crash)]
    return trainer(
        out, callbacks, max_steps=12, eval_strategy="steps", eval_steps=1,
        save_strategy="steps", save_steps=2, learning_rate=3e-3, flip=True,
    )  # fmt: skip


def test_early_stopping_reads_eval_metrics_and_stops_the_trainer(tmp_path):
    cb = StoppingCallback(EarlyStopping(patience=3))  # monitors val_loss -> eval_loss
    t = stop_run(tmp_path, cb)
    t.train()
    losses = [h["eval_loss"] for h in t.state.log_history if "eval_loss" in h]
    assert cb.keys == {"val_loss": "eval_loss"}
    assert losses == sorted(losses) and len(losses) == 4  # worse every time: best at step 1
    assert t.state.global_step == 4 and cb.stopper.best_step == 1
    assert cb.reason == "val_loss did not improve for 3 checks"


@pytest.mark.parametrize("callback_class", [StoppingCallback, Forgetful])
def test_early_stopping_patience_survives_a_resume(tmp_path, callback_class):
    full = stop_run(tmp_path / "full", StoppingCallback(EarlyStopping(patience=3)))
    full.train()
    with pytest.raises(KeyboardInterrupt):
        stop_run(tmp_path / "cut", StoppingCallback(EarlyStopping(patience=3)), crash=2).train()
    cb = callback_class(EarlyStopping(patience=3))
    resumed = stop_run(tmp_path / "cut", cb)
    resumed.train(resume_from_checkpoint=True)
    if callback_class is StoppingCallback:
        assert resumed.state.global_step == full.state.global_step == 4
        assert cb.stopper.best_step == 1 and cb.stopper.wait == 3
    else:  # a reset stopper takes step 3 as its best and stops 2 steps late
        assert resumed.state.global_step == 6 and cb.stopper.best_step == 3


def test_early_stopping_names_a_missing_metric(tmp_path):
    cb = StoppingCallback(EarlyStopping(monitor="val_acc"))
    t = trainer(tmp_path, [cb], max_steps=1, eval_strategy="steps", eval_steps=1)
    with pytest.raises(ValueError, match=r"\['eval_acc'\].*metric_names"):
        t.train()


# ----------------------------------------------------------------- gradient transforms
class PlantNonFinite(TrainerCallback):
    """Makes optimizer step ``step``'s (1-based) gradient NaN in one weight, inf in another."""

    def __init__(self, step: int) -> None:
        self.step, self.armed = step, False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        bad = {"classifier.weight": math.nan, "classifier.bias": math.inf}
        for name, p in model.named_parameters():
            if name in bad:
                p.register_hook(lambda g, v=bad[name]: g * v if self.armed else g)

    def on_step_begin(self, args, state, control, **kwargs):
        self.armed = state.global_step + 1 == self.step


class WatchStep(TrainerCallback):
    """Snapshots weights and optimizer state around optimizer step ``step`` (1-based)."""

    def __init__(self, step: int) -> None:
        self.step, self.before, self.after = step, None, None

    def _snap(self, model, optimizer):
        states = [{k: v.clone() for k, v in s.items()} for s in optimizer.state.values()]
        return weights(model), states

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step + 1 == self.step:
            self.before = self._snap(model, optimizer)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step + 1 == self.step:
            self.after = self._snap(model, optimizer)


def test_transform_skips_a_nonfinite_step_without_touching_weights_or_optimizer(tmp_path):
    guard = GradientTransformCallback(chain(skip_nonfinite(), clip_by_norm(1.0)))
    watch, seen, ema = WatchStep(3), AfterStep(), EMACallback(decay=0.5)
    t = trainer(
        tmp_path, [PlantNonFinite(3), guard, watch, seen, ema],
        max_steps=5, gradient_accumulation_steps=2, max_grad_norm=0.0,
    )  # fmt: skip
    t.train()
    assert guard.skipped_steps == [3] and ema.ema.step == 4  # the EMA skips it too
    (w0, opt0), (w1, opt1) = watch.before, watch.after
    assert all(torch.equal(w0[n], w1[n]) for n in w0)
    assert len(opt0) == len(opt1) and opt0  # Adam has state from steps 1-2
    for s0, s1 in zip(opt0, opt1, strict=True):
        assert all(torch.equal(s0[k], s1[k]) for k in s0)
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    assert not torch.equal(seen.live[4]["classifier.weight"], seen.live[2]["classifier.weight"])


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_the_trainer_alone_applies_a_nonfinite_gradient(tmp_path, max_grad_norm):
    t = trainer(tmp_path, [PlantNonFinite(3)], max_steps=4, max_grad_norm=max_grad_norm)
    t.train()
    assert not torch.isfinite(t.model.classifier.weight).all()


def test_transform_warns_about_the_trainers_own_clipping(tmp_path):
    t = trainer(tmp_path, [GradientTransformCallback(clip_by_norm(0.5))], max_steps=1)
    with pytest.warns(UserWarning, match="max_grad_norm=1 before the transform"):
        t.train()


# ------------------------------------------------------------------------ grad monitor
def test_monitor_records_a_row_per_step_matching_the_trainers_grad_norm(tmp_path):
    monitor = GradMonitorCallback(every=1)
    t = trainer(
        tmp_path, [monitor], max_steps=4, max_grad_norm=0.0,
        logging_strategy="steps", logging_steps=1,
    )  # fmt: skip
    t.train()
    logged = {h["step"]: h["grad_norm"] for h in t.state.log_history if "grad_norm" in h}
    assert [row["step"] for row in monitor.history] == [1, 2, 3, 4] == sorted(logged)
    for row in monitor.history:
        assert row["grad_norm"] == pytest.approx(logged[row["step"]], rel=1e-4)
        assert row["update_ratio/classifier"] > 0 and "grad_norm/bert.pooler.dense" in row


# ----------------------------------------------------------------------- input, extras
def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="decay"):
        EMACallback(decay=2.0)
    with pytest.raises(ValueError, match="filename must be a plain file name"):
        EMACallback(filename="a/b.safetensors")
    with pytest.raises(TypeError, match="stopper must be a trainwell EarlyStopping"):
        StoppingCallback(object())
    with pytest.raises(ValueError, match="not monitored"):
        StoppingCallback(EarlyStopping(), metric_names={"val_acc": "eval_accuracy"})
    with pytest.raises(TypeError, match="gradient transform"):
        GradientTransformCallback(lambda params: {})
    with pytest.raises(ValueError, match="every"):
        GradMonitorCallback(every=0)


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "trainwell.integrations.hf")
    with pytest.raises(MissingExtra, match=r"pip install 'trainwell\[hf\]'"):
        importlib.import_module("trainwell.integrations.hf")
    monkeypatch.undo()
    importlib.import_module("trainwell.integrations.hf")


def test_readme_section_example_runs(tmp_path):
    text = (ROOT / "docs" / "sections" / "integrations_hf.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, re.S)
    (tmp_path / "example.py").write_text(code)
    done = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ema eval_loss" in done.stdout
