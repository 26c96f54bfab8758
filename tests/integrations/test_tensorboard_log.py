"""TensorBoardLogger in a hand-written fit(), read back with TensorBoard's own reader."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from trainwell import GradMonitor, fit  # noqa: E402
from trainwell.checkpoints import CheckpointManager  # noqa: E402
from trainwell.integrations.tensorboard_log import TensorBoardLogger  # noqa: E402


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    x, y = torch.randn(48, 4), torch.randn(48, 1)
    data = DataLoader(TensorDataset(x, y), batch_size=8)  # 6 optimizer steps per epoch
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    return net, data, torch.optim.SGD(net.parameters(), lr=0.05)


def _read(folder) -> EventAccumulator:
    events = EventAccumulator(str(folder))
    events.Reload()
    return events


def _scalars(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


def _same(events: EventAccumulator, tag: str, expected: list[tuple[int, float]]) -> None:
    """The tag's steps equal, its values equal as float32 (what event files keep)."""
    found = _scalars(events, tag)
    assert [s for s, _ in found] == [s for s, _ in expected], tag
    assert [v for _, v in found] == pytest.approx([v for _, v in expected], rel=1e-6), tag


def test_epochs_steps_monitor_rows_and_test_metrics_are_logged(tmp_path):
    net, data, opt = _problem()
    monitor = GradMonitor(net, every=4)
    logger = TensorBoardLogger(
        tmp_path / "tb", every_n_steps=5, monitor=monitor, params={"optimizer": {"lr": 0.05}}
    )
    result = fit(net, data, data, opt, F.mse_loss, epochs=3, monitor=monitor, callbacks=[logger])
    logger.log_test({"test_mse": 0.25})
    logger.close()
    events = _read(tmp_path / "tb")
    for key in ("train_loss", "val_loss", "lr"):
        expected = [(row["epoch"], row[key]) for row in result.history]
        _same(events, f"epoch/{key}", expected)
    assert [s for s, _ in _scalars(events, "step/loss")] == [5, 10, 15]  # every 5 of 18 steps
    _same(events, "step/lr", [(5, 0.05), (10, 0.05), (15, 0.05)])
    rows = result.grad_history
    assert len(rows) == 5  # monitor steps 0, 4, 8, 12, 16
    expected = [(row["step"] + 1, row["grad_norm"]) for row in rows]
    _same(events, "grad/grad_norm", expected)
    layer = next(k for k in rows[0] if k.startswith("update_ratio/"))
    _same(events, f"grad/{layer}", [(row["step"] + 1, row[layer]) for row in rows])
    _same(events, "test/test_mse", [(2, 0.25)])
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")


def test_a_resumed_fit_appends_and_drops_what_the_killed_run_wrote_past_its_checkpoint(tmp_path):
    """Epochs 0-1 checkpointed, then 'killed' in epoch 2 after logging some of its steps;
    the resumed fit continues at step 13 and TensorBoard shows each step and epoch once."""
    net, data, opt = _problem()
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=5)
    first = TensorBoardLogger(tmp_path / "tb", every_n_steps=1)
    fit(net, data, data, opt, F.mse_loss, epochs=2, checkpoints=manager, callbacks=[first])
    first.on_step_end(13, {"loss": torch.tensor(99.0)})  # what the kill left behind
    first.close()
    net, data, opt = _problem()
    again = TensorBoardLogger(tmp_path / "tb", every_n_steps=1)
    result = fit(net, data, data, opt, F.mse_loss, epochs=4, checkpoints=manager,
                 resume=True, callbacks=[again])  # fmt: skip
    again.close()
    events = _read(tmp_path / "tb")
    steps = _scalars(events, "step/loss")
    assert [s for s, _ in steps] == list(range(1, 25))
    assert 99.0 not in [v for _, v in steps]
    expected = [(row["epoch"], row["val_loss"]) for row in result.history]
    _same(events, "epoch/val_loss", expected)
    assert len(expected) == 4


def test_a_fresh_fit_in_a_used_folder_replaces_what_was_there(tmp_path):
    for seed in (0, 1):
        net, data, opt = _problem(seed)
        logger = TensorBoardLogger(tmp_path / "tb", every_n_steps=3)
        result = fit(net, data, data, opt, F.mse_loss, epochs=2, callbacks=[logger])
        logger.close()
    events = _read(tmp_path / "tb")
    _same(events, "epoch/train_loss", [(r["epoch"], r["train_loss"]) for r in result.history])


def test_every_n_steps_is_checked():
    with pytest.raises(ValueError, match="every_n_steps"):
        TensorBoardLogger("unused", every_n_steps=-1)
    with pytest.raises(TypeError, match="every_n_steps"):
        TensorBoardLogger("unused", every_n_steps=2.5)
