"""Checkpoint files: exact round trips, atomic writes, corruption detection, no pickle."""

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
from trainwell import CheckpointError, CheckpointManager, load, save


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


#: A version 1 checkpoint (CRC-32 checksums) written by trainwell 0.1, before version 2:
#: ``save(V1_FILE, rich_state(), metadata=V1_METADATA)``. It must always load.
V1_FILE = Path(__file__).parent / "data" / "v1.safetensors"
V1_METADATA = {"step": 7, "metrics": {"val_loss": 0.5}}


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


def loaded_rich_state() -> dict:
    """What ``load`` returns for a saved ``rich_state()``."""
    expected = rich_state()
    expected["tensors"] = {k: v.contiguous() for k, v in expected["tensors"].items()}
    expected["np_scalar"] = 0.25  # numpy scalars come back as Python scalars
    return expected


@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "read"])
def test_round_trip_exact(tmp_path: Path, mmap: bool) -> None:
    path = save(tmp_path / "c.safetensors", rich_state())
    assert_same(loaded_rich_state(), load(path, mmap=mmap))


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
    from trainwell.checkpoints.format import save
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
def test_public_names() -> None:
    assert trainwell.save is save and trainwell.load is load
    assert trainwell.CheckpointManager is CheckpointManager


def test_atomic_write_never_replaces_a_device_or_fifo(tmp_path):
    """os.replace over /dev/null (e.g. `trainwell soup --out /dev/null` as root) would
    delete the device and leave a regular file: refused, and the FIFO is still there."""
    import os
    import stat

    from trainwell.checkpoints.atomic import atomic_write

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        atomic_write(fifo, lambda f: f.write(b"x"))
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
