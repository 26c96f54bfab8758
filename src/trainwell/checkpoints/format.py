"""Crash-safe checkpoints that are data, never code: safetensors for tensors, JSON for the rest.

A checkpoint is one standard safetensors file. Every tensor of the nested state is a
safetensors entry; everything else (dict structure, int dict keys, tuples, numbers
including NaN/Inf, strings, None) is a JSON document stored in the file's
``__metadata__``, next to a manifest of CRC-32 checksums (one per tensor, one for the
JSON) that is itself checksummed, with every tensor's dtype and shape. The checksums catch
truncation and bit rot (not deliberate tampering: but a checkpoint is data, so a tampered
one can change numbers, never run code). Loading never unpickles: a ``torch.save`` /
pickle file is refused with a clear error.

Writes are atomic (the pattern of e.g. ``orbax`` and ``safetensors``-based trainers):
write a temporary file in the same directory, ``fsync`` it, ``os.replace`` it over the
target, ``fsync`` the directory. A crash at any instant leaves the old or the new complete
file, never a truncated one; truncation or bit rot of a stored file raises
``CheckpointError`` on ``load``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import tempfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

FORMAT = "trainwell-checkpoint"
VERSION = 1
_TAG = "__tw__"
_MAX_HEADER = 100_000_000  # the safetensors limit
_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
for _name in ("uint16", "uint32", "uint64"):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = "U" + _name[4:]
_NAMES = {v: k for k, v in _DTYPES.items()}


class CheckpointError(RuntimeError):
    """A checkpoint file is truncated, corrupt, or not a trainwell checkpoint."""


# ----------------------------------------------------------------------------- encoding
class _Tensors:
    """The tensors of one state, named by their path in it (identical views stored once)."""

    def __init__(self) -> None:
        self.items: dict[str, torch.Tensor] = {}
        self._seen: dict[tuple, str] = {}

    def add(self, t: torch.Tensor, where: str) -> str:
        if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
            raise TypeError(f"checkpoint state at {where!r}: only dense tensors can be stored")
        if t.dtype not in _DTYPES:
            raise TypeError(f"checkpoint state at {where!r}: dtype {t.dtype} is not supported")
        ident = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        if t.numel() and ident in self._seen:
            return self._seen[ident]
        key, n = where or "tensor", 1
        while key in self.items:
            key, n = f"{where}#{n}", n + 1
        self.items[key] = t.detach().resolve_conj().resolve_neg().cpu().contiguous()
        self._seen[ident] = key
        return key


def _encode(obj: Any, tensors: _Tensors, where: str) -> Any:
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, torch.Tensor):
        return {_TAG: "tensor", "key": tensors.add(obj, where)}
    if isinstance(obj, Mapping):
        if _TAG not in obj and all(isinstance(k, str) for k in obj):
            return {k: _encode(v, tensors, f"{where}/{k}") for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if isinstance(k, (torch.Tensor, Mapping, list, bytes)):
                raise TypeError(f"checkpoint state at {where!r}: unsupported dict key {k!r}")
            items.append([_encode(k, tensors, where), _encode(v, tensors, f"{where}/{k}")])
        return {_TAG: "dict", "items": items}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {
            _TAG: "tuple",
            "items": [_encode(v, tensors, f"{where}/{i}") for i, v in enumerate(obj)],
        }
    if isinstance(obj, (bytes, bytearray)):
        data = _u8(bytearray(obj))
        return {_TAG: "bytes", "key": tensors.add(data, where)}
    if type(obj).__module__ == "numpy":
        import numpy as np

        if isinstance(obj, np.generic):
            return _encode(obj.item(), tensors, where)
        if isinstance(obj, np.ndarray) and obj.dtype != object:
            array = torch.from_numpy(np.ascontiguousarray(obj))
            return {_TAG: "ndarray", "key": tensors.add(array, where)}
    raise TypeError(
        f"checkpoint state at {where!r}: cannot store a {type(obj).__name__}; accepted: dict, "
        "list, tuple, torch.Tensor, numpy array, int, float, str, bool, None, bytes"
    )


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    tag = obj.get(_TAG)
    if tag is None:
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if tag == "tensor":
        return tensors[obj["key"]]
    if tag == "dict":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["items"]}
    if tag == "tuple":
        return tuple(_decode(v, tensors) for v in obj["items"])
    if tag == "bytes":
        return tensors[obj["key"]].numpy().tobytes()
    if tag == "ndarray":
        return tensors[obj["key"]].numpy()
    raise CheckpointError(f"unknown entry type {tag!r} in the checkpoint state")


def _u8(buf: bytearray) -> torch.Tensor:
    """A uint8 tensor sharing memory with ``buf`` (``torch.frombuffer`` rejects empty ones)."""
    return torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)


def _byte_view(t: torch.Tensor) -> Any:
    """The raw little-endian bytes of a contiguous CPU tensor, without a copy."""
    return t.reshape(-1).view(torch.uint8).numpy()


def _crc(data: Any) -> str:
    """CRC-32 (as in zip and PNG): catches truncation and bit rot at ~4 GB/s (SHA-256: ~1.4)."""
    return f"{zlib.crc32(data):08x}"


# ---------------------------------------------------------------------- atomic write
def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, write: Any) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, then atomically publish it.

    temp file in the same directory -> flush + fsync -> ``os.replace`` -> fsync(directory).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


# --------------------------------------------------------------------------- save/load
def save(path: str | os.PathLike, state: Any, *, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``state`` atomically to ``path`` as a checksummed safetensors file.

    ``state`` is a nested structure of dicts (str or int keys), lists, tuples, tensors
    (any dtype, any device; stored from CPU), numpy arrays, Python scalars (NaN/Inf kept),
    strings, None and bytes, e.g. model/optimizer/scheduler ``state_dict()`` s and
    ``rng_state()``. ``metadata`` (JSON-able, small) can be read back cheaply with
    ``read_metadata`` without loading the tensors.

    Example:
        >>> import tempfile, torch, trainwell
        >>> d = tempfile.mkdtemp()
        >>> p = trainwell.save(f"{d}/ckpt.safetensors", {"w": torch.ones(2), 0: (1.5, None)})
        >>> trainwell.load(p)
        {'w': tensor([1., 1.]), 0: (1.5, None)}
    """
    tensors = _Tensors()
    doc = json.dumps(_encode(state, tensors, ""), separators=(",", ":"), allow_nan=True)
    header: dict[str, Any] = {}
    order = sorted(tensors.items, key=lambda k: -tensors.items[k].element_size())  # aligned
    entries, offset = {}, 0
    for key in order:
        t = tensors.items[key]
        end = offset + t.numel() * t.element_size()
        desc = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape)}
        header[key] = {**desc, "data_offsets": [offset, end]}
        entries[key] = {**desc, "crc32": _crc(_byte_view(t))}
        offset = end
    manifest = json.dumps(
        {
            "format": FORMAT,
            "version": VERSION,
            "state_crc32": _crc(doc.encode()),
            "tensors": entries,
            "metadata": dict(metadata or {}),
        },
        separators=(",", ":"),
        allow_nan=True,
    )
    header["__metadata__"] = {
        "trainwell_manifest": manifest,
        "trainwell_manifest_crc32": _crc(manifest.encode()),
        "trainwell_state": doc,
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    def write(f: BinaryIO) -> None:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key in order:
            f.write(_byte_view(tensors.items[key]))

    return atomic_write(path, write)


def _refuse(head: bytes, path: Path) -> None:
    if head[:4] == b"PK\x03\x04":
        kind = "a zip archive (the torch.save format, which holds a pickle)"
    elif head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        kind = "a pickle file (e.g. a legacy torch.save or pickle.dump)"
    else:
        return
    raise CheckpointError(
        f"{path} is {kind}; trainwell never unpickles because unpickling runs arbitrary code. "
        "If you trust the file, open it with torch.load(path, weights_only=True) and re-save "
        "it with trainwell.save()."
    )


def _offsets(entry: Any) -> tuple[int, int]:
    """The (begin, end) byte range of a well-formed header entry, else (-1, -1)."""
    try:
        begin, end = entry["data_offsets"]
        shape, dtype = entry["shape"], _NAMES[entry["dtype"]]
        numel = math.prod(shape) if all(type(d) is int and d >= 0 for d in shape) else -1
        itemsize = torch.empty(0, dtype=dtype).element_size()
        ok = type(begin) is type(end) is int and begin >= 0 and end - begin == numel * itemsize
    except (KeyError, TypeError, ValueError):
        ok = False
    return (begin, end) if ok else (-1, -1)


def _read_header(f: BinaryIO, path: Path) -> tuple[dict, dict, int]:
    """(tensor header, manifest, data start), checking size, format and manifest checksum."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
    first = f.read(1) if 0 < n <= min(size - 8, _MAX_HEADER) else b""
    if first != b"{":
        _refuse(head, path)
        raise CheckpointError(
            f"{path} is truncated or not a trainwell checkpoint ({size} bytes, no valid header)"
        )
    try:
        header = json.loads(first + f.read(n - 1))
        meta = header.pop("__metadata__")
        text = meta["trainwell_manifest"]
        manifest = json.loads(text)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} has a corrupt or missing trainwell manifest: {e}") from e
    if _crc(text.encode()) != meta.get("trainwell_manifest_crc32"):
        raise CheckpointError(f"{path}: manifest checksum mismatch (the file is corrupt)")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format {manifest.get('format')}")
    end = 0
    for key, entry in sorted(header.items(), key=lambda kv: _offsets(kv[1])):
        expect = manifest["tensors"].get(key) if isinstance(manifest.get("tensors"), dict) else 0
        if not isinstance(expect, dict) or _offsets(entry)[0] != end:
            raise CheckpointError(f"{path}: corrupt header entry for tensor {key!r}")
        if (entry["dtype"], entry["shape"]) != (expect.get("dtype"), expect.get("shape")):
            raise CheckpointError(f"{path}: tensor {key!r} has a corrupt description")
        end = _offsets(entry)[1]
    if 8 + n + end != size or set(header) != set(manifest["tensors"]):
        raise CheckpointError(
            f"{path} is truncated or corrupt: {size} bytes on disk, the header describes "
            f"{8 + n + end}"
        )
    header["__metadata__"] = meta
    return header, manifest, 8 + n


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``metadata`` given to ``save``, read from the header only (no tensor data).

    Raises ``CheckpointError`` when the header is unreadable or the file is truncated;
    it does not verify the tensor checksums (``verify`` does).

    Example:
        >>> import tempfile, trainwell
        >>> p = trainwell.save(f"{tempfile.mkdtemp()}/c", {}, metadata={"step": 3})
        >>> read_metadata(p)
        {'step': 3}
    """
    path = Path(path)
    with open(path, "rb") as f:
        return _read_header(f, path)[1]["metadata"]


def load(path: str | os.PathLike, *, device: str | torch.device | None = None) -> Any:
    """Read a checkpoint written by ``save``, verifying every checksum; never unpickles.

    Tensors come back on the CPU (or ``device``), dict keys with their original type
    (int keys stay int), tuples as tuples, numpy arrays as numpy arrays.

    Raises:
        CheckpointError: the file is truncated, corrupt, a pickle/``torch.save`` file, or
            not a trainwell checkpoint.

    Example:
        >>> import tempfile, torch, trainwell
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1, momentum=0.9)
        >>> p = trainwell.save(f"{tempfile.mkdtemp()}/c", {"optimizer": opt.state_dict()})
        >>> opt.load_state_dict(trainwell.load(p)["optimizer"])
    """
    path = Path(path)
    with open(path, "rb") as f:
        header, manifest, start = _read_header(f, path)
        meta = header.pop("__metadata__")
        tensors: dict[str, torch.Tensor] = {}
        for key, entry in header.items():
            begin, end = entry["data_offsets"]
            expect, dtype = manifest["tensors"][key], _NAMES[entry["dtype"]]
            buf = bytearray(end - begin)
            f.seek(start + begin)
            if f.readinto(buf) != len(buf) or _crc(buf) != expect["crc32"]:
                raise CheckpointError(f"{path}: checksum mismatch in tensor {key!r} (corrupt)")
            flat = _u8(buf)
            try:
                t = flat.view(dtype).reshape(entry["shape"])
            except RuntimeError as e:
                raise CheckpointError(f"{path}: tensor {key!r} has a corrupt shape") from e
            tensors[key] = t.to(device) if device is not None else t
    doc = meta.get("trainwell_state", "")
    if _crc(doc.encode()) != manifest["state_crc32"]:
        raise CheckpointError(f"{path}: checksum mismatch in the JSON state (corrupt)")
    try:
        return _decode(json.loads(doc), tensors)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: corrupt JSON state: {e}") from e


def verify(path: str | os.PathLike) -> bool:
    """True when ``path`` is a complete, uncorrupted trainwell checkpoint.

    Example:
        >>> verify("/nonexistent/checkpoint")
        False
    """
    try:
        load(path)
    except (CheckpointError, OSError):
        return False
    return True
