"""Format versions: version 2 (XXH3-64) is written, version 1 files (CRC-32) still load and
their damage is still caught; and how ``load`` hands out the verified bytes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import xxhash

from tests.checkpoints.test_format import (
    V1_FILE,
    V1_METADATA,
    assert_same,
    loaded_rich_state,
    rich_state,
)
from tests.checkpoints.test_fuzz import join, manifest_of, split, with_manifest
from trainwell import CheckpointError, load, save
from trainwell.checkpoints import format as format_module
from trainwell.checkpoints.format import VERSION, read_metadata, verify


def tensor_bytes(data: bytes, header: dict, key: str) -> bytes:
    begin, end = header[key]["data_offsets"]
    start = 8 + struct.unpack("<Q", data[:8])[0]
    return data[start + begin : start + end]


# ------------------------------------------------------------------------------ version 1
@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "read"])
def test_version_1_file_still_loads(mmap: bool) -> None:
    header, _ = split(V1_FILE.read_bytes())
    manifest = manifest_of(header)
    assert manifest["version"] == 1 and "trainwell_manifest_crc32" in header["__metadata__"]
    assert all("crc32" in d for d in manifest["tensors"].values()) and "state_crc32" in manifest
    assert_same(loaded_rich_state(), load(V1_FILE, mmap=mmap))
    assert read_metadata(V1_FILE) == V1_METADATA
    assert verify(V1_FILE)


def test_version_1_state_resaves_as_version_2(tmp_path: Path) -> None:
    path = save(tmp_path / "c", load(V1_FILE), metadata=read_metadata(V1_FILE))
    header, _ = split(path.read_bytes())
    assert manifest_of(header)["version"] == VERSION == 2
    assert "trainwell_manifest_xxh3_64" in header["__metadata__"]
    assert_same(load(V1_FILE), load(path))
    assert read_metadata(path) == V1_METADATA


def test_version_1_damage_is_still_caught(tmp_path: Path) -> None:
    data = V1_FILE.read_bytes()
    header, body = split(data)
    path = tmp_path / "v1.safetensors"
    start = len(data) - len(body)
    for key, entry in header.items():  # a flipped bit in any tensor
        begin, end = entry["data_offsets"] if key != "__metadata__" else (0, 0)
        if end > begin:
            damaged = bytearray(data)
            damaged[start + (begin + end) // 2] ^= 0x10
            path.write_bytes(damaged)
            with pytest.raises(CheckpointError, match="checksum mismatch in tensor"):
                load(path)
    meta = header["__metadata__"]
    state = meta["trainwell_state"].replace('"text"', '"txet"', 1)
    assert state != meta["trainwell_state"]
    path.write_bytes(join({**header, "__metadata__": {**meta, "trainwell_state": state}}, body))
    with pytest.raises(CheckpointError, match="checksum mismatch in the JSON state"):
        load(path)
    manifest = meta["trainwell_manifest"].replace('"step":7', '"step":8')
    assert manifest != meta["trainwell_manifest"]
    edited = {**header, "__metadata__": {**meta, "trainwell_manifest": manifest}}
    path.write_bytes(join(edited, body))
    with pytest.raises(CheckpointError, match="manifest checksum mismatch"):
        load(path)
    path.write_bytes(data[:-1])
    with pytest.raises(CheckpointError, match="truncated"):
        load(path)
    # a version 1 manifest under a version 2 checksum (or the reverse) is refused
    meta2 = {k: v for k, v in meta.items() if k != "trainwell_manifest_crc32"}
    meta2["trainwell_manifest_xxh3_64"] = xxhash.xxh3_64_hexdigest(
        meta["trainwell_manifest"].encode()
    )
    path.write_bytes(join({**header, "__metadata__": meta2}, body))
    with pytest.raises(CheckpointError, match="manifest version 1 does not match its xxh3_64"):
        load(path)


# ------------------------------------------------------------------------------ version 2
def test_version_2_checksums_are_xxh3_64_of_the_bytes(tmp_path: Path) -> None:
    big = torch.randn(3 * 2**18 + 5)  # more than one 1 MiB chunk: checksummed while written
    state = {"big": big, "small": torch.arange(3), "empty": torch.empty(0, 2), "n": 1}
    data = save(tmp_path / "c", state).read_bytes()
    header, _ = split(data)
    meta = header["__metadata__"]
    manifest = manifest_of(header)
    assert manifest["version"] == 2 and set(meta) == {
        "trainwell_manifest",
        "trainwell_manifest_xxh3_64",
        "trainwell_state",
    }
    assert meta["trainwell_manifest_xxh3_64"] == xxhash.xxh3_64_hexdigest(
        meta["trainwell_manifest"].encode()
    )
    assert manifest["state_xxh3_64"] == xxhash.xxh3_64_hexdigest(meta["trainwell_state"].encode())
    for key, description in manifest["tensors"].items():
        expected = xxhash.xxh3_64_hexdigest(tensor_bytes(data, header, key))
        assert description["xxh3_64"] == expected, key
    assert torch.equal(load(tmp_path / "c")["big"], big)


def test_newer_version_gets_a_clear_error(tmp_path: Path) -> None:
    header, body = split(save(tmp_path / "c", {"w": torch.ones(2)}).read_bytes())
    manifest = {**manifest_of(header), "version": 3}
    meta = dict(with_manifest(header, manifest)["__metadata__"])
    meta["trainwell_manifest_blake3"] = meta.pop("trainwell_manifest_xxh3_64")
    path = tmp_path / "v3"
    path.write_bytes(join({**header, "__metadata__": meta}, body))
    with pytest.raises(CheckpointError, match="unsupported checkpoint format .* version 3"):
        load(path)
    meta = dict(header["__metadata__"])  # version 2, its checksum gone: corrupt
    del meta["trainwell_manifest_xxh3_64"]
    path.write_bytes(join({**header, "__metadata__": meta}, body))
    with pytest.raises(CheckpointError, match="holds no manifest checksum"):
        load(path)


# ------------------------------------------------------------------------------ loading
def test_loaded_tensors_are_private_copies_on_write(tmp_path: Path) -> None:
    path = save(tmp_path / "c", {"w": torch.arange(6.0), "v": torch.ones(3)})
    before = path.read_bytes()
    first = load(path)
    first["w"] += 1  # writes to the tensor, never to the file
    assert path.read_bytes() == before
    assert torch.equal(load(path)["w"], torch.arange(6.0))
    assert torch.equal(first["w"], torch.arange(6.0) + 1)
    (tmp_path / "c").unlink()  # the tensors outlive the file's name
    assert torch.equal(first["v"], torch.ones(3))
    save(path, {"w": torch.zeros(6)})  # a new file at that path is a new file
    assert torch.equal(first["w"], torch.arange(6.0) + 1)


@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "read"])
def test_unaligned_tensors_from_another_writer_load(tmp_path: Path, mmap: bool) -> None:
    """A file whose float tensor starts at an odd offset (save never writes one) loads."""
    state = {"a": torch.arange(3, dtype=torch.uint8), "b": torch.randn(4, dtype=torch.float64)}
    data = save(tmp_path / "c", state).read_bytes()
    header, _ = split(data)
    a, b = tensor_bytes(data, header, "/a"), tensor_bytes(data, header, "/b")
    header["/a"]["data_offsets"], header["/b"]["data_offsets"] = [0, 3], [3, 35]
    path = tmp_path / "odd"
    path.write_bytes(join(header, a + b))
    loaded = load(path, mmap=mmap)
    assert_same({"a": state["a"], "b": state["b"]}, loaded)


def test_device_argument(tmp_path: Path) -> None:
    path = save(tmp_path / "c", rich_state())
    assert_same(loaded_rich_state(), load(path, device="cpu"))
    path = save(tmp_path / "w", {"w": torch.ones(2), "n": [torch.zeros(1)]})
    loaded = load(path, device=torch.device("meta"))
    assert loaded["w"].device.type == loaded["n"][0].device.type == "meta"


def test_load_without_tensor_data(tmp_path: Path) -> None:
    for state in ({}, {"e": torch.empty(0)}, {"x": [1, "a"]}):
        for mmap in (True, False):
            assert_same(state, load(save(tmp_path / "c", state), mmap=mmap))


def test_manifest_is_json_with_fixed_width_digests(tmp_path: Path) -> None:
    """The header is written before the tensors' digests are known: it must not change size."""
    for state in ({"w": torch.zeros(1)}, {"w": torch.randn(2**19), "x": torch.ones(2**18 + 1)}):
        data = save(tmp_path / "c", state).read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8 : 8 + n])
        assert "0" * 16 not in header["__metadata__"]["trainwell_manifest"]
        assert verify(tmp_path / "c")


def test_a_file_that_cannot_be_mapped_is_read(tmp_path: Path, monkeypatch) -> None:
    path = save(tmp_path / "c", rich_state())

    def refuse(*args, **kwargs):
        raise OSError("this file system cannot map files")

    monkeypatch.setattr(format_module.mmap, "mmap", refuse)
    assert_same(loaded_rich_state(), load(path))
    data = bytearray(path.read_bytes())
    data[-3] ^= 1
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="checksum mismatch in tensor"):
        load(path)
