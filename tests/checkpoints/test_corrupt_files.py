"""Corrupt checkpoints of every kind: errors that name the field, and the consumers (the
manager's listing, ``latest()``, rotation) that must survive them (``trainwell soup``:
tests/app/test_soup_runner.py)."""

from __future__ import annotations

import contextlib
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.checkpoints.test_fuzz import (
    join,
    manifest_of,
    split,
    state_of,
    training_state,
    with_manifest,
    with_state_text,
)
from trainwell import CheckpointError, CheckpointManager, load, save
from trainwell.checkpoints.format import _MAX_DEPTH, read_metadata, verify


def edited_state(data: bytes, edit) -> bytes:
    """``data`` with its JSON state edited by ``edit(doc)`` and re-checksummed."""
    header, body = split(data)
    doc = state_of(header)
    edit(doc)
    return join(with_state_text(header, json.dumps(doc, separators=(",", ":"))), body)


def edited_manifest(data: bytes, edit) -> bytes:
    header, body = split(data)
    manifest = manifest_of(header)
    edit(manifest)
    return join(with_manifest(header, manifest), body)


def nasty_files(data: bytes) -> dict[str, bytes]:
    """Damaged versions of ``data`` (a checkpoint of ``{"w": tensor, "opt": {0: ...}}``)
    that each used to escape as something other than CheckpointError, or crash a caller."""
    header, body = split(data)
    text = json.dumps(header, separators=(",", ":"))
    state_text = header["__metadata__"]["trainwell_state"]
    key_of_w = next(k for k in header if k.startswith("/w"))
    return {
        "state nested 100000 deep": join(with_state_text(header, "[" * 100_000), body),
        "header nested 100000 deep": join('{"x":' + "[" * 100_000 + "," + text[1:], body),
        "lone surrogate in the state text": join(
            with_state_text(header, state_text[:5] + "\ud800" + state_text[5:]), body
        ),
        "invalid UTF-8 in the header": join(text.encode().replace(b"dtype", b"\xffype", 1), body),
        "manifest metadata a list": edited_manifest(data, lambda m: m.update(metadata=[1])),
        "manifest tensors missing": edited_manifest(data, lambda m: m.pop("tensors")),
        "manifest state checksum a number": edited_manifest(
            data, lambda m: m.update(state_xxh3_64=7)
        ),
        "__metadata__ a list": join({**header, "__metadata__": [1]}, body),
        "shape of strings": join({**header, key_of_w: {**header[key_of_w], "shape": ["4"]}}, body),
        "unhashable dict key": edited_state(
            data, lambda d: d["opt"]["items"][0].__setitem__(0, [1, 2])
        ),
        "tagged entry without key": edited_state(data, lambda d: d["w"].pop("key")),
        "unknown tag": edited_state(data, lambda d: d["w"].update(__tw__="pickle")),
        "key names no tensor": edited_state(data, lambda d: d["w"].update(key="/nothing")),
        "items not pairs": edited_state(data, lambda d: d["opt"].update(items=[[1, 2, 3]])),
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "length prefix past the end": struct.pack("<Q", 2**64 - 1) + data[8:],
        "pickle": pickle.dumps({"w": [1.0]}, protocol=4),
    }


def small_checkpoint(tmp_path: Path) -> bytes:
    state = {"w": torch.arange(4.0), "opt": {0: {"step": torch.tensor(3.0)}}}
    return save(tmp_path / "small.safetensors", state, metadata={"step": 0}).read_bytes()


def test_nasty_files_raise_checkpoint_error_naming_file_and_field(tmp_path: Path) -> None:
    expected = {
        "state nested 100000 deep": "JSON state is nested deeper than 200",
        "header nested 100000 deep": "header is nested deeper than 200",
        "lone surrogate in the state text": "trainwell_state is not valid Unicode",
        "invalid UTF-8 in the header": "header is not valid UTF-8",
        "manifest metadata a list": "manifest metadata must be a JSON object",
        "manifest tensors missing": r"manifest must hold .*missing \['tensors'\]",
        "manifest state checksum a number": "state_xxh3_64 must be 16 lowercase hex digits",
        "__metadata__ a list": "__metadata__ must map names to strings",
        "shape of strings": "shape must be a list of non-negative ints",
        "unhashable dict key": "state entry /opt item 0 has a key that cannot be a dict key",
        "tagged entry without key": r"state entry /w must hold exactly \['__tw__', 'key'\]",
        "unknown tag": "state entry /w has an unknown type 'pickle'",
        "key names no tensor": "state entry /w key names no tensor of the file: '/nothing'",
        "items not pairs": r"state entry /opt item 0 must be a \[key, value\] pair",
        "truncated": "truncated",
        "empty": "truncated or not a trainwell checkpoint",
        "length prefix past the end": "truncated or not a trainwell checkpoint",
        "pickle": "never unpickles",
    }
    files = nasty_files(small_checkpoint(tmp_path))
    assert files.keys() == expected.keys()
    for name, data in files.items():
        path = tmp_path / "bad.safetensors"
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=expected[name]) as caught:
            load(path)
        assert str(path) in str(caught.value), name
        assert verify(path) is False
        with contextlib.suppress(CheckpointError):
            assert isinstance(read_metadata(path), dict)


def test_manager_survives_a_directory_of_corrupt_files(tmp_path: Path) -> None:
    good = small_checkpoint(tmp_path)
    folder = tmp_path / "checkpoints"
    manager = CheckpointManager(folder, keep_last=2, keep_best=1)
    for step in range(3):
        manager.save({"w": torch.full((3,), float(step))}, step, {"val_loss": 1.0 - step / 10})
    nasty = nasty_files(good)
    for step, data in enumerate(nasty.values(), start=10):
        manager.path_for(step).write_bytes(data)
    (folder / "ckpt-00000100.safetensors").mkdir()  # not even a file
    weird_metrics = edited_manifest(
        good, lambda m: m["metadata"].update(metrics={"val_loss": 10**400, "acc": "high"})
    )
    manager.path_for(101).write_bytes(weird_metrics)  # a valid file with unusable metrics

    listed = {c.step for c in manager.checkpoints()}
    assert {1, 2, 101} <= listed and 100 not in listed  # step 0 was rotated away
    assert manager.checkpoints()[-1].metrics == {}  # nothing from the metrics could rank
    assert manager.latest() == manager.path_for(101)
    assert manager.best() == manager.path_for(2)
    manager.path_for(101).unlink()
    assert manager.latest() == manager.path_for(2)  # every corrupt newer file is skipped

    manager.save({"w": torch.zeros(3)}, 200, {"val_loss": 2.0})  # rotation, corrupt files around
    assert manager.latest() == manager.path_for(200)
    assert manager.best() == manager.path_for(2)
    assert torch.equal(load(manager.best())["w"], torch.full((3,), 2.0))
    for step in range(10, 10 + len(nasty)):
        if step not in listed:  # a file whose header is unreadable is kept for inspection
            assert manager.path_for(step).exists()


# ------------------------------------------------------------------- legitimate nesting
def json_depth(path: Path) -> int:
    header, _ = split(path.read_bytes())
    depth, deepest = 0, 0
    for c in header["__metadata__"]["trainwell_state"]:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(c, 0)
        deepest = max(deepest, depth)
    return deepest


def test_deep_legitimate_states_load_and_too_deep_ones_are_refused_by_save(tmp_path) -> None:
    path = save(tmp_path / "t", training_state())
    assert json_depth(path) <= 10  # model, optimizer, scheduler, RNG: far below the limit
    nested: object = {"leaf": torch.ones(1)}
    for i in range(60):  # 60 int-keyed dicts: three JSON levels each
        nested = {i: nested}
    path = save(tmp_path / "n", {"user": nested})
    assert json_depth(path) > 150
    loaded = load(path)["user"]
    for i in reversed(range(60)):
        loaded = loaded[i]
    assert torch.equal(loaded["leaf"], torch.ones(1))
    deepest: object = 0
    for _ in range(_MAX_DEPTH - 1):  # the root dict plus 199 lists: exactly the limit
        deepest = [deepest]
    path = save(tmp_path / "d", {"x": deepest})
    assert json_depth(path) == _MAX_DEPTH and load(path) == {"x": deepest}
    with pytest.raises(ValueError, match="nested too deeply: more than 200 levels"):
        save(tmp_path / "e", {"x": [deepest]})
    with pytest.raises(ValueError, match="metadata is nested too deeply"):
        save(tmp_path / "e", {}, metadata={"x": deepest})
    assert not (tmp_path / "e").exists()


def test_numpy_zero_dim_array_round_trips(tmp_path: Path) -> None:
    loaded = load(save(tmp_path / "c", {"a": np.array(2.5), "b": np.arange(6).reshape(2, 3).T}))
    assert loaded["a"].shape == () and loaded["a"] == 2.5
    assert np.array_equal(loaded["b"], np.arange(6).reshape(2, 3).T)


def test_verify_never_raises(tmp_path: Path) -> None:
    (tmp_path / "dir.safetensors").mkdir()
    assert verify(tmp_path / "dir.safetensors") is False
    assert verify(tmp_path / "missing") is False
    with pytest.raises(OSError):
        load(tmp_path / "missing")
