"""CheckpointManager: rotation of last and best, corrupt-newest fallback, rank-0 writes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from trainwell import CheckpointManager, load
from trainwell.checkpoints.format import read_metadata, verify


def test_manager_keeps_last_and_best_and_never_nan(tmp_path: Path) -> None:
    losses = [0.9, 0.4, float("nan"), 0.6, 0.5, 0.7, float("nan")]
    manager = CheckpointManager(tmp_path, keep_last=2, keep_best=2, monitor="val_loss")
    for step, loss in enumerate(losses):
        manager.save({"step": step}, step, {"val_loss": loss, "note": "ignored"})
    finite = sorted((v, s) for s, v in enumerate(losses) if not math.isnan(v))
    expected = {len(losses) - 2, len(losses) - 1} | {s for _, s in finite[:2]}
    assert {c.step for c in manager.checkpoints()} == expected
    assert load(manager.best()) == {"step": finite[0][1]}
    assert load(manager.latest()) == {"step": len(losses) - 1}


def test_manager_mode_max_and_no_best_when_all_nan(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "a", keep_last=1, keep_best=1, monitor="acc", mode="max")
    for step, acc in enumerate([0.5, 0.8, 0.6]):
        manager.save({}, step, {"acc": acc})
    assert read_metadata(manager.best())["step"] == 1
    nan_manager = CheckpointManager(tmp_path / "b", keep_last=1, keep_best=1)
    nan_manager.save({}, 0, {"val_loss": float("nan")})
    assert nan_manager.best() is None and nan_manager.latest() is not None


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_latest_falls_back_when_newest_is_corrupt(tmp_path: Path, damage: str) -> None:
    manager = CheckpointManager(tmp_path, keep_last=3, keep_best=0)
    for step in range(3):
        manager.save({"w": torch.full((100,), float(step))}, step, {"val_loss": 1.0 - step})
    newest = manager.path_for(2)
    data = bytearray(newest.read_bytes())
    if damage == "flip":
        data[-10] ^= 0xFF
    else:
        data = data[: len(data) - 50]
    newest.write_bytes(data)
    assert not verify(newest)
    assert manager.latest() == manager.path_for(1)
    assert load(manager.latest())["w"][0].item() == 1.0
    assert manager.best() == manager.path_for(1)  # best (step 2) is corrupt: next best


def test_manager_bookkeeping_recovered_by_scanning(tmp_path: Path) -> None:
    first = CheckpointManager(tmp_path, keep_last=1, keep_best=1)
    for step, loss in enumerate([0.3, 0.5, 0.6]):
        first.save({"s": step}, step, {"val_loss": loss})
    (tmp_path / ".ckpt-00000003.safetensors.x1.tmp").write_bytes(b"half a checkpoint")
    # "crash": a new process builds a new manager on the same directory
    second = CheckpointManager(tmp_path, keep_last=1, keep_best=1)
    assert not (tmp_path / ".ckpt-00000003.safetensors.x1.tmp").exists()
    assert [c.step for c in second.checkpoints()] == [0, 2]
    second.save({"s": 3}, 3, {"val_loss": 0.2})
    assert [c.step for c in second.checkpoints()] == [3]
    assert second.best() == second.latest() == second.path_for(3)


def test_manager_only_rank_zero_writes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("trainwell.checkpoints.manager.is_main_process", lambda: False)
    manager = CheckpointManager(tmp_path, keep_last=1)
    path = manager.save({"x": 1}, 5)
    assert path == manager.path_for(5) and not path.exists()


def test_manager_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep_last must be an integer >= 1"):
        CheckpointManager(tmp_path, keep_last=0)
    with pytest.raises(ValueError, match="keep_best must be an integer >= 0"):
        CheckpointManager(tmp_path, keep_best=-1)
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        CheckpointManager(tmp_path, mode="lower")
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        CheckpointManager(tmp_path).save({}, -1)


def test_rotation_never_lets_a_corrupt_file_take_a_good_ones_place(tmp_path: Path) -> None:
    """keep_last=2 with the newest file's data damaged (header intact): the rotation on the
    next save keeps two *valid* checkpoints; counting the corrupt one would delete step 0."""
    m = CheckpointManager(tmp_path, keep_last=2, keep_best=0)
    for step in range(2):
        m.save({"w": torch.full((64,), float(step))}, step)
    newest = m.path_for(1)
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in the tensor data: read_metadata still works
    newest.write_bytes(bytes(data))
    assert not verify(newest) and read_metadata(newest)["step"] == 1
    m2 = CheckpointManager(tmp_path, keep_last=2, keep_best=0)  # a resumed process
    m2.save({"w": torch.full((64,), 2.0)}, 2)
    assert m2.latest() == m2.path_for(2)
    m2.path_for(2).unlink()  # the next newest good one is still there
    assert m2.latest() == m2.path_for(0) and float(load(m2.path_for(0))["w"][0]) == 0.0
    assert newest.exists()  # a corrupt file is kept for inspection, never deleted
