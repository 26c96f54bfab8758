"""The user's own model, data, loss, metrics, optimizer and scheduler through a run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from trainwell.app.config import ConfigError
from trainwell.app.config_files import load_config
from trainwell.app.optim import build_optimizer, build_scheduler
from trainwell.app.runner import load_data, model_for, train

ROOT = Path(__file__).resolve().parents[2]
USER = ["model.target='tests.app.user_code:Net'", "data.target='tests.app.user_code:blobs'"]


def test_user_model_data_loss_and_metric_train_and_report_the_task_metrics():
    cfg = load_config(None, [*USER, "epochs=3", "task.loss='tests.app.user_code:smoothed_ce'",
                             "task.metrics=['tests.app.user_code:top2']"])  # fmt: skip
    result, _ = train(cfg)
    assert set(result.test) == {"test_acc", "test_nll", "test_ece", "test_brier", "test_top2"}
    assert result.test["test_top2"] >= result.test["test_acc"]
    assert {"val_loss", "val_acc", "val_top2"} <= set(result.history[0])
    assert result.test["test_acc"] > 0.6  # well-separated blobs: far above chance (1/3)


def test_missing_val_and_test_are_carved_stratified_and_subsampled():
    cfg = load_config(None, [*USER, "data.train_size=60"])
    splits = load_data(cfg)
    sizes = [len(splits.train), len(splits.val), len(splits.test)]
    assert sizes == [60, 36, 48]  # 240 items: 20% test, 15% val, then 60 of the rest
    for split in ("train", "val", "test"):
        labels = splits.tensors(split)[1]
        counts = torch.bincount(labels, minlength=3)
        assert counts.max() - counts.min() <= 1, (split, counts)  # stratified
    again = load_data(cfg)
    assert torch.equal(splits.tensors("train")[0], again.tensors("train")[0])  # seeded


def test_dict_items_need_the_step_hook_and_train_with_it():
    base = ["model.target='tests.app.user_code:Net'", "model.args.n_features=5",
            "data.target='tests.app.user_code:dict_blobs'", "epochs=2"]  # fmt: skip
    with pytest.raises(TypeError, match="step"):
        train(load_config(None, base))
    result, _ = train(load_config(None, [*base, "task.step='tests.app.user_code:dict_step'"]))
    assert 0.0 <= result.test["test_acc"] <= 1.0


def test_regression_on_diabetes_matches_sklearn_metrics(tmp_path):
    (tmp_path / "r.toml").write_text(
        'epochs = 40\n[task]\nkind = "regression"\n[data]\nsource = "diabetes"\n'
        "[model]\nhidden = [32]\n[optimizer]\nlr = 0.01\n"
    )
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "trainwell", "run", str(tmp_path / "r.toml"),
                           "--out", str(out), "-q"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    test = json.loads((out / "summary.json").read_text())["test"]
    assert set(test) == {"test_mse", "test_mae", "test_r2"}
    cfg = load_config(out / "config.toml")
    splits = load_data(cfg)
    model = model_for(cfg, splits)
    model.load_state_dict(load_file(out / "model.safetensors"))
    x, y = splits.tensors("test")
    with torch.no_grad():
        pred = model.eval()(x).squeeze(-1).numpy()
    assert test["test_mse"] == pytest.approx(mean_squared_error(y.numpy(), pred), rel=1e-5)
    assert test["test_mae"] == pytest.approx(mean_absolute_error(y.numpy(), pred), rel=1e-5)
    assert test["test_r2"] == pytest.approx(r2_score(y.numpy(), pred), rel=1e-4, abs=1e-5)
    assert test["test_r2"] > 0.2  # it learned something (sklearn's linear model gets ~0.45)


def test_user_regression_model_with_outputs_n_by_1_is_not_broadcast():
    cfg = load_config(None, ["task.kind=regression", "model.target='tests.app.user_code:Regressor'",
                             "data.target='tests.app.user_code:line'", "epochs=30",
                             "optimizer.lr=0.02"])  # fmt: skip
    result, model = train(cfg)
    splits = load_data(cfg)
    x, y = splits.tensors("test")
    with torch.no_grad():
        pred = model.eval()(x)
    assert pred.shape == (len(y), 1)
    assert result.test["test_mse"] == pytest.approx(float(((pred[:, 0] - y) ** 2).mean()), rel=1e-5)
    assert result.test["test_r2"] > 0.9


def test_continuous_targets_under_classification_are_refused():
    with pytest.raises(ValueError, match='kind = "regression"'):
        load_data(load_config(None, ["data.source=diabetes"]))
    with pytest.raises(ValueError, match='kind = "regression"'):
        load_data(load_config(None, ["data.target='tests.app.user_code:continuous_labels'"]))


@pytest.mark.parametrize(
    ("name", "cls"),
    [("adamw", torch.optim.AdamW), ("RMSprop", torch.optim.RMSprop),
     ("torch.optim:Adagrad", torch.optim.Adagrad), ("sgd", torch.optim.SGD)],
)  # fmt: skip
def test_any_torch_optimizer_by_name_with_its_args(name, cls):
    cfg = load_config(None, [f"optimizer.name='{name}'", "optimizer.lr=0.05"])
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(cfg, model)
    assert type(opt) is cls and opt.param_groups[0]["lr"] == 0.05
    if cls is torch.optim.RMSprop:
        cfg = load_config(None, ["optimizer.name=RMSprop", "optimizer.args.alpha=0.5"])
        assert build_optimizer(cfg, model).param_groups[0]["alpha"] == 0.5


def test_onecycle_gets_its_length_and_steps_per_step():
    cfg = load_config(None, [*USER, "epochs=3", "scheduler.name=OneCycleLR",
                             "scheduler.interval=step", "scheduler.args.max_lr=0.01"])  # fmt: skip
    model = torch.nn.Linear(5, 3)
    opt = build_optimizer(cfg, model)
    scheduler, interval = build_scheduler(cfg, opt, steps_per_epoch=4)
    assert interval == "step" and scheduler.total_steps == 12
    result, _ = train(cfg)  # would raise if stepped past total_steps
    steps = result.steps
    expected = torch.optim.lr_scheduler.OneCycleLR(
        torch.optim.AdamW(torch.nn.Linear(1, 1).parameters()), max_lr=0.01, total_steps=steps
    )
    for _ in range(steps):
        expected.optimizer.step()
        expected.step()
    assert result.history[-1]["lr"] == pytest.approx(expected.get_last_lr()[0])


def test_plateau_scheduler_and_the_old_cosine_spelling():
    cfg = load_config(None, [*USER, "epochs=6", "scheduler.name=ReduceLROnPlateau",
                             "scheduler.args.patience=0", "scheduler.args.factor=0.5",
                             "optimizer.lr=0.5"])  # fmt: skip
    result, _ = train(cfg)
    lrs = [row["lr"] for row in result.history]
    assert min(lrs) < 0.5 and all(b <= a for a, b in zip(lrs, lrs[1:], strict=False))
    cfg = load_config(None, [*USER, "epochs=4", "optimizer.scheduler=cosine"])
    result, _ = train(cfg)
    assert result.history[-1]["lr"] == pytest.approx(1e-3 * (1 + math.cos(math.pi)) / 2, abs=1e-9)
    with pytest.raises(ConfigError, match="both set"):
        load_config(None, ["optimizer.scheduler=cosine", "scheduler.name=StepLR"])


def test_device_auto_and_precision_on_cpu():
    cfg = load_config(None, [*USER, "epochs=2"])
    assert cfg.device == "auto"
    result, model = train(cfg)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(model.parameters()).device.type == expected
    for precision in ("bf16", "16-mixed"):
        cfg = load_config(None, [*USER, "epochs=2", f"precision='{precision}'", "device=cpu"])
        result, _ = train(cfg)
        assert np.isfinite(result.history[-1]["train_loss"]), precision


def test_unknown_device_and_precision_are_config_errors():
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        load_config(None, ["device=gpu"])
    with pytest.raises(ConfigError, match="precision"):
        load_config(None, ["precision=fp8"])
