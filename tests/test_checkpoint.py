"""Checkpoints: exact round trips, atomic writes, corruption detection, no pickle, rotation."""

from __future__ import annotations

import math
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import trainwell
from trainwell import CheckpointError, CheckpointManager, load, rng_state, save, set_rng_state
from trainwell.checkpoint import read_metadata, verify


def assert_same(a: object, b: object, where: str = "") -> None:
    """Exact equality including types, int dict keys, dtypes and NaN bit patterns."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def rich_state() -> dict:
    g = torch.Generator().manual_seed(0)
    tensors = {
        str(dt).split(".")[1]: (torch.randn(3, 4, generator=g) * 50).to(dt)
        for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64)
    }
    tensors.update(
        flag=torch.tensor([True, False, True]),
        byte=torch.arange(7, dtype=torch.uint8),
        i8=torch.tensor([-128, 0, 127], dtype=torch.int8),
        i32=torch.tensor([-(2**31), 2**31 - 1], dtype=torch.int32),
        scalar=torch.tensor(3.5),
        empty=torch.empty(0, 5),
        nanbits=torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0]),
        strided=torch.arange(12.0).reshape(3, 4).t(),  # non-contiguous
    )
    return {
        "tensors": tensors,
        0: {1: "int", (2, 3): "tuple", None: "none", False: "bool", 2.5: "float"},
        "numbers": [1, -(2**70), 0.1, float("nan"), float("inf"), -float("inf"), True, None],
        "tuple": (1, (2.5, "x"), []),
        "text": 'ünïcödé \n "quoted" __tw__',
        "tag_lookalike": {"__tw__": "tensor", "key": "not a tensor"},
        "bytes": b"\x00\x01binary",
        "empty_bytes": b"",
        "numpy": np.arange(6, dtype=np.float32).reshape(2, 3),
        "np_scalar": np.float64(0.25),
    }


def test_round_trip_exact(tmp_path: Path) -> None:
    state = rich_state()
    path = save(tmp_path / "c.safetensors", state)
    loaded = load(path)
    expected = dict(state)
    expected["tensors"] = {k: v.contiguous() for k, v in state["tensors"].items()}
    expected["np_scalar"] = 0.25  # numpy scalars come back as Python scalars
    assert_same(expected, loaded)


def test_same_state_same_bytes_and_standard_safetensors(tmp_path: Path) -> None:
    state = {"w": torch.randn(4, 3), "step": 3}
    a, b = save(tmp_path / "a", state), save(tmp_path / "b", state)
    assert a.read_bytes() == b.read_bytes()
    # any safetensors reader can open it; the JSON state lives in the header metadata
    assert torch.equal(load_file(a)["/w"], state["w"])
    with safe_open(a, "pt") as f:
        assert "trainwell_manifest" in f.metadata()


def test_shared_and_tied_tensors(tmp_path: Path) -> None:
    t = torch.arange(10.0)
    state = {"a": t, "b": t, "view": t[2:5], "view2": t[2:5]}
    loaded = load(save(tmp_path / "c", state))
    for k in state:
        assert torch.equal(loaded[k], state[k])
    assert loaded["a"] is loaded["b"]  # identical tensors are stored once


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 5, generator=g), torch.randn(8, 2, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
        lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.8, 0.95), amsgrad=True),
    ],
    ids=["sgd_momentum", "adamw"],
)
def test_optimizer_resumes_bit_identically(tmp_path: Path, make) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
    opt = make(model.parameters())
    _train(model, opt, 3, seed=1)
    path = save(tmp_path / "c", {"model": model.state_dict(), "optimizer": opt.state_dict()})
    _train(model, opt, 4, seed=2)  # the uninterrupted run

    resumed = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
    opt2 = make(resumed.parameters())
    state = load(path)
    assert all(isinstance(k, int) for k in state["optimizer"]["state"])
    resumed.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    _train(resumed, opt2, 4, seed=2)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert_same(opt.state_dict(), opt2.state_dict())


def test_rng_state_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    random.gauss(0, 1)  # a cached gaussian is part of the state
    np.random.standard_normal()
    path = save(tmp_path / "rng", {"rng": rng_state(), "torch": torch.get_rng_state()})
    first = (torch.rand(3), random.random(), random.gauss(0, 1), np.random.standard_normal(3))
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    state = load(path)
    assert torch.equal(state["torch"], state["rng"]["torch"])
    set_rng_state(state["rng"])
    second = (torch.rand(3), random.random(), random.gauss(0, 1), np.random.standard_normal(3))
    assert torch.equal(first[0], second[0]) and first[1:3] == second[1:3]
    assert np.array_equal(first[3], second[3])


# ------------------------------------------------------------------ corruption and pickle
def test_truncation_raises(tmp_path: Path) -> None:
    path = save(tmp_path / "c", {"w": torch.randn(50), "meta": {"epoch": 3}})
    data = path.read_bytes()
    for size in sorted({0, 4, 8, 9, 30, len(data) // 2, len(data) - 200, len(data) - 1}):
        path.write_bytes(data[:size])
        with pytest.raises(CheckpointError, match="truncated|corrupt"):
            load(path)
    path.write_bytes(data + b"\0")  # trailing garbage is corruption too
    with pytest.raises(CheckpointError):
        load(path)


def test_every_single_byte_flip_is_caught_or_harmless(tmp_path: Path) -> None:
    state = {"w": torch.randn(6), 1: [0.5, "x"], "n": torch.arange(3)}
    path = save(tmp_path / "c", state)
    data = bytearray(path.read_bytes())
    caught = 0
    for i in range(len(data)):
        data[i] ^= 0x01
        path.write_bytes(data)
        data[i] ^= 0x01
        try:
            loaded = load(path)
        except CheckpointError:
            caught += 1
            continue
        assert_same(state, loaded)  # only header whitespace may change harmlessly
    assert caught > 0.8 * len(data)


def test_pickle_files_are_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(Evil(), protocol=4))
    torch.save({"w": torch.ones(2)}, tmp_path / "zip.pt")
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("evil.pkl", "zip.pt", "legacy.pt"):
        with pytest.raises(CheckpointError, match="never unpickles"):
            load(tmp_path / name)
    assert not marker.exists()
    (tmp_path / "text").write_text("hello")
    with pytest.raises(CheckpointError, match="not a trainwell checkpoint"):
        load(tmp_path / "text")


def test_unsupported_values_raise_type_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"'/opt/bad'.*cannot store a set"):
        save(tmp_path / "c", {"opt": {"bad": {1, 2}}})
    with pytest.raises(TypeError, match="only dense tensors"):
        save(tmp_path / "c", {"s": torch.eye(2).to_sparse()})
    assert not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------- atomicity
def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path: Path, monkeypatch) -> None:
    path = save(tmp_path / "c", {"v": 1})

    def crash(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        save(path, {"v": 2, "w": torch.ones(1000)})
    monkeypatch.undo()
    assert load(path) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


WRITER = textwrap.dedent(
    """
    import sys, torch
    from trainwell.checkpoint import save
    path, i = sys.argv[1], 0
    big = {"w": torch.randn(2_000_000)}
    print("ready", flush=True)
    while True:
        i += 1
        save(path, {"i": i, "w": big["w"] + i, "check": float(i)})
    """
)


def test_sigkill_during_saves_leaves_a_complete_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    rnd = random.Random(0)
    for _ in range(2):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(rnd.uniform(0.3, 1.0))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        state = load(path)  # the last published checkpoint, complete and consistent
        assert torch.equal(state["w"][:3] - state["i"], load(path)["w"][:3] - state["check"])
    temporaries = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    CheckpointManager(tmp_path, prefix="c")  # a manager would clean those up ...
    assert all(not p.exists() for p in temporaries if p.name.startswith(".c-"))


# -------------------------------------------------------------------------------- manager
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
    monkeypatch.setattr("trainwell.checkpoint_manager.is_main_process", lambda: False)
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


def test_public_names() -> None:
    assert trainwell.save is save and trainwell.load is load
    assert trainwell.CheckpointManager is CheckpointManager
