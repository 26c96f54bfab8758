import pytest

from trainwell import (
    EMA,
    SWA,
    Accumulator,
    CheckpointManager,
    DropoutSchedule,
    EarlyStopping,
    GradMonitor,
    Regularizer,
)
from trainwell.app.config_files import load_config
from trainwell.app.runner import train

EVERYTHING = [
    "epochs=4", "data.source=wine", "model.hidden=[16, 16]", "model.norm=batch",
    "model.dropout=0.1", "regularization.l1=1e-5", "regularization.l2=1e-4",
    "regularization.max_norm=3.0", "dropout.schedule=late", "gradients.accumulate=2",
    "gradients.monitor=true", "gradients.monitor_every=1", "early_stopping.enabled=true",
    "checkpoint.enabled=true", "ema.enabled=true", "swa.enabled=true", "swa.start=0.5",
]  # fmt: skip


def test_every_section_builds_its_technique_and_trains(tmp_path):
    from trainwell.app.models import build_model
    from trainwell.app.runner import build_optimizer, load_data
    from trainwell.app.techniques import build_techniques

    cfg = load_config(None, EVERYTHING)
    splits = load_data(cfg)
    model = build_model("mlp", splits.n_features, splits.n_classes, hidden=[16, 16], norm="batch")
    kwargs = build_techniques(cfg, model, build_optimizer(cfg, model), 5, tmp_path)
    expected = {
        "regularizer": Regularizer, "dropout_schedule": DropoutSchedule,
        "accumulator": Accumulator, "monitor": GradMonitor, "early_stopping": EarlyStopping,
        "checkpoints": CheckpointManager, "ema": EMA, "swa": SWA,
    }  # fmt: skip
    for name, kind in expected.items():
        assert isinstance(kwargs[name], kind), name
    result, _ = train(cfg, out_dir=tmp_path)
    assert result.grad_history and "swa_test_acc" in result.extra
    assert result.steps == 4 * -(-len(splits.loader("train", 64)) // 2)


@pytest.mark.parametrize("mode", ["value", "norm", "adaptive", "auto", "zscore"])
def test_each_clip_mode_trains(mode):
    cfg = load_config(None, ["epochs=2", "data.source=wine", "model.hidden=[8]",
                             f"gradients.clip.mode={mode}"])  # fmt: skip
    result, _ = train(cfg)
    assert result.epochs_run == 2


def test_off_means_nothing_is_built():
    from trainwell.app.techniques import build_techniques

    cfg = load_config(None, ["gradients.skip_nonfinite=false"])
    import torch

    model = torch.nn.Linear(2, 2)
    kwargs = build_techniques(cfg, model, torch.optim.SGD(model.parameters(), lr=0.1), 3)
    assert all(v is None for v in kwargs.values())
