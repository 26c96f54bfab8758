"""Crash-safe checkpoints that are data, never code: safetensors for tensors, JSON for the rest.

A checkpoint is one standard safetensors file. Every tensor of the nested state is a
safetensors entry; everything else (dict structure, int dict keys, tuples, numbers
including NaN/Inf, strings, None) is a JSON document stored in the file's
``__metadata__``, next to a manifest of checksums (one per tensor, one for the JSON) that
is itself checksummed, with every tensor's dtype and shape. The checksums catch truncation
and bit rot (not deliberate tampering: but a checkpoint is data, so a tampered one can
change numbers, never run code). Loading never unpickles: a ``torch.save`` / pickle file is
refused with a clear error.

Versions: ``save`` writes version 2, whose checksums are XXH3-64 (``xxh3_64`` fields);
version 1 files (CRC-32, ``crc32`` fields, all files written before version 2) load as
they always did, with the same validation. See ``_SUMS`` for why XXH3-64.

Writes are atomic (the pattern of e.g. ``orbax`` and ``safetensors``-based trainers):
write a temporary file in the same directory, ``fsync`` it, ``os.replace`` it over the
target, ``fsync`` the directory. A crash at any instant leaves the old or the new complete
file, never a truncated one; truncation or bit rot of a stored file raises
``CheckpointError`` on ``load``.

Reading validates every part of the file before using it, because a damaged file must
fail the same way wherever the damage is: the length prefix; the header as UTF-8 JSON;
every header entry (``dtype`` a known name, ``shape`` a list of non-negative ints,
``data_offsets`` two ints spanning exactly its bytes, the entries tiling the data section
with no gap, overlap or tail); ``__metadata__`` a dict of strings; the manifest (its
checksum, ``format``, ``version`` (1 or 2, the one its checksum fields name),
``state_xxh3_64`` (``state_crc32``), ``tensors`` describing exactly the header's tensors,
``metadata`` a dict); text that UTF-8 can encode (a ``"\\ud800"``
escape decodes to a lone surrogate, which it cannot); every JSON document at most
``_MAX_DEPTH`` levels deep (checked by a scan before parsing, as ``json.loads`` recurses);
and the decoded state (known tags, keys that name tensors, ``[key, value]`` pairs with
hashable keys). So ``load``, ``read_metadata`` and ``verify`` fail only with
``CheckpointError`` (or ``OSError`` when the file cannot be read), naming the file and
the field; ``verify`` returns False for them. A seeded fuzzer in the test suite holds
them to it (tests/checkpoints/test_fuzz.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import re
import reprlib
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import torch
import xxhash

from trainwell.checkpoints.atomic import atomic_write

FORMAT = "trainwell-checkpoint"
VERSION = 2  # the version ``save`` writes; ``load`` reads 1 and 2 (see _SUMS)
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
_ITEMSIZE = {dtype: torch.empty(0, dtype=dtype).element_size() for dtype in _DTYPES}
_NOT_IN_NUMPY = {torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2}
#: The deepest nesting of JSON arrays and objects in a checkpoint (header, manifest, state).
#: ``json.loads`` and the decoder recurse once per level (Python's limit: 1000 frames), so
#: deeper text is refused before it is parsed. A str-keyed dict or a list is one level, a
#: tuple two, a dict with other keys three; {model, optimizer, scheduler, RNG} states need 7.
_MAX_DEPTH = 200
_MAX_INT64 = 2**63 - 1
_CHUNK = 1 << 20  # bytes that save checksums and writes at a time: they stay in the CPU cache
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_DEPTH_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 60
_ENTRY_FIELDS = frozenset({"dtype", "shape", "data_offsets"})
_METADATA_FIELDS = ("trainwell_manifest", "trainwell_state")  # + the manifest's checksum
_KEY_ENTRY_FIELDS = frozenset({_TAG, "key"})
_ITEMS_ENTRY_FIELDS = frozenset({_TAG, "items"})


class CheckpointError(RuntimeError):
    """A checkpoint file is truncated, corrupt, or not a trainwell checkpoint."""


class _Entry(NamedTuple):
    """One tensor of the safetensors header: its dtype, shape and byte range."""

    dtype: torch.dtype
    shape: list[int]
    begin: int
    end: int


@dataclass
class _Header:
    """A validated header: tensor entries, manifest, JSON state text, where the data starts."""

    entries: dict[str, _Entry]
    manifest: dict[str, Any]
    state: str
    data_start: int
    size: int
    sums: _Sum


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
            array = torch.from_numpy(np.ascontiguousarray(obj).reshape(obj.shape))  # 0-d too
            return {_TAG: "ndarray", "key": tensors.add(array, where)}
    raise TypeError(
        f"checkpoint state at {where!r}: cannot store a {type(obj).__name__}; accepted: dict, "
        "list, tuple, torch.Tensor, numpy array, int, float, str, bool, None, bytes"
    )


def _u8(buf: bytearray) -> torch.Tensor:
    """A uint8 tensor sharing memory with ``buf`` (``torch.frombuffer`` rejects empty ones)."""
    return torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)


def _byte_view(t: torch.Tensor) -> Any:
    """The raw little-endian bytes of a contiguous CPU tensor, without a copy."""
    return t.reshape(-1).view(torch.uint8).numpy()


def _crc32(data: Any) -> str:
    """CRC-32 (as in zip and PNG), 8 hex digits: the checksum of version 1 files."""
    return f"{zlib.crc32(data):08x}"


def _xxh3_64(data: Any) -> str:
    """XXH3-64 (xxHash 3, 64 bits, seed 0), 16 hex digits: the checksum of version 2 files."""
    return xxhash.xxh3_64_hexdigest(data)


class _Sum(NamedTuple):
    """A checksum of one format version: its name (in field names) and its hex digest."""

    name: str
    digits: int
    digest: Callable[[Any], str]
    hex: re.Pattern[str]

    def field(self, value: Any, path: Path, field: str) -> str:
        """``value`` if it is a digest of this checksum: ``digits`` lowercase hex digits."""
        if not isinstance(value, str) or not self.hex.fullmatch(value):
            problem = f"must be {self.digits} lowercase hex digits, got {_show(value)}"
            raise _corrupt(path, field, problem)
        return value


#: The checksum of each format version; ``save`` writes ``VERSION``. Version 2 takes
#: XXH3-64 from the ``xxhash`` package (the reference xxHash, SIMD-vectorized): ~30 GB/s
#: on one core, against ~4-7 GB/s for ``zlib.crc32`` (measured in benchmarks/checkpoint.py),
#: which made the checksum a quarter of ``load`` and ``save``. Like CRC-32 it is not a
#: cryptographic hash (nor meant to be: a checkpoint is data, a tampered one can change
#: numbers but never run code); it catches truncation, misplaced bytes and bit rot, a
#: random corruption passing with probability 2**-64 (CRC-32: 2**-32, but every burst of
#: up to 32 bits is caught). A hardware CRC-32C was the other candidate; the ``value()`` of
#: its well-kept binding (``google-crc32c``) refused a memoryview: a copy of every tensor.
_SUMS: dict[int, _Sum] = {
    1: _Sum("crc32", 8, _crc32, re.compile("[0-9a-f]{8}")),
    2: _Sum("xxh3_64", 16, _xxh3_64, re.compile("[0-9a-f]{16}")),
}
CHECKSUM = _SUMS[VERSION].name
_checksum = _SUMS[VERSION].digest


# --------------------------------------------------------------------------- save/load
def _check_nesting(data: bytes, argument: str) -> None:
    """Refuse to write what ``load`` would refuse: JSON nested deeper than _MAX_DEPTH."""
    if _nesting(data) > _MAX_DEPTH:
        raise ValueError(
            f"checkpoint {argument} is nested too deeply: more than {_MAX_DEPTH} levels of JSON "
            "(a list or str-keyed dict is one level, a tuple two, any other dict three)"
        )


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
    sums = _SUMS[VERSION]
    tensors = _Tensors()
    doc = json.dumps(_encode(state, tensors, ""), separators=(",", ":"), allow_nan=True)
    doc_bytes = doc.encode()
    _check_nesting(doc_bytes, "state")
    header: dict[str, Any] = {}
    order = sorted(tensors.items, key=lambda k: -tensors.items[k].element_size())  # aligned
    entries, offset = {}, 0
    for key in order:
        t = tensors.items[key]
        end = offset + t.numel() * t.element_size()
        desc = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape)}
        header[key] = {**desc, "data_offsets": [offset, end]}
        entries[key] = {**desc, sums.name: "0" * sums.digits}  # the digest: while writing
        offset = end
    described = {
        "format": FORMAT,
        "version": VERSION,
        f"state_{sums.name}": sums.digest(doc_bytes),
        "tensors": entries,
        "metadata": dict(metadata or {}),
    }

    def header_bytes(check: bool) -> bytes:
        manifest = json.dumps(described, separators=(",", ":"), allow_nan=True)
        manifest_bytes = manifest.encode()
        if check:
            _check_nesting(manifest_bytes, "metadata")
        header["__metadata__"] = {
            "trainwell_manifest": manifest,
            f"trainwell_manifest_{sums.name}": sums.digest(manifest_bytes),
            "trainwell_state": doc,
        }
        raw = json.dumps(header, separators=(",", ":")).encode()
        return raw + b" " * (-len(raw) % 8)

    # Checked before any file is made; as long as the final header (a digest has a fixed
    # number of hex digits), so the tensors can be written, and checksummed, behind it.
    raw = header_bytes(check=True)

    def write(f: BinaryIO) -> None:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key in order:
            entries[key][sums.name] = _write_summed(f, _byte_view(tensors.items[key]))
        final = header_bytes(check=False)
        if len(final) != len(raw):  # cannot happen: hex digits need no JSON escapes
            raise RuntimeError("trainwell.save: the header changed length")
        f.seek(8)
        f.write(final)

    return atomic_write(path, write)


def _write_summed(f: BinaryIO, data: Any) -> str:
    """Write the bytes ``data`` to ``f``; return their XXH3-64 (the checksum of VERSION 2).

    Chunk by chunk, each chunk checksummed just before it is written: the write then copies
    it from the CPU cache, so checksumming costs no pass over memory of its own.
    """
    if len(data) <= _CHUNK:
        digest = _xxh3_64(data)
        f.write(data)
        return digest
    h, view = xxhash.xxh3_64(), memoryview(data)
    for i in range(0, len(view), _CHUNK):
        chunk = view[i : i + _CHUNK]
        h.update(chunk)
        f.write(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------ validation
# A checkpoint is data from disk: every byte of it may be damaged. Each rule below checks
# one part of the file; any violation is a CheckpointError that names the file and the
# part, so ``load``, ``read_metadata`` and ``verify`` never fail with anything else.
def _corrupt(path: Path, field: str, problem: str) -> CheckpointError:
    """The error for a ``field`` of the file at ``path`` that breaks a rule."""
    return CheckpointError(f"{path} is corrupt: {field} {problem}")


def _show(value: Any) -> str:
    """A short repr of a value read from a damaged file (it may be huge)."""
    return _SHOW.repr(value)


def _nesting(data: bytes) -> int:
    """How deeply the JSON text ``data`` (UTF-8) nests arrays and objects.

    A linear scan that cannot recurse, so it can run before ``json.loads`` (which recurses
    once per level and raises ``RecursionError`` on deep input): drop the string literals,
    keep the brackets, take the deepest running count. Exact for text that ``json.loads``
    accepts (in UTF-8, a byte below 128 is always that ASCII character). The string
    literals go in three C-speed passes: escaped backslashes, then escaped quotes (a run of
    backslashes pairs up from its left end, as JSON reads it), then every other piece
    between the quotes that remain, which delimit the strings.
    """
    unescaped = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = b"".join(unescaped.split(b'"')[::2]).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


def _parse_json(text: str, data: bytes, path: Path, field: str) -> Any:
    """JSON ``text`` (``data`` in UTF-8), refused when malformed or deeper than _MAX_DEPTH."""
    if _nesting(data) > _MAX_DEPTH:
        raise _corrupt(path, field, f"is nested deeper than {_MAX_DEPTH} levels")
    try:
        return json.loads(text)
    except ValueError as e:  # JSONDecodeError, or an integer with too many digits
        raise _corrupt(path, field, f"is not valid JSON ({e})") from e


def _utf8(text: str, path: Path, field: str) -> bytes:
    """``text`` encoded as UTF-8; a lone surrogate (a ``"\\ud800"`` JSON escape) cannot be."""
    try:
        return text.encode()
    except UnicodeEncodeError as e:
        raise _corrupt(path, field, f"is not valid Unicode text ({e.reason} at {e.start})") from e


def _header_text(f: BinaryIO, size: int, path: Path) -> tuple[str, bytes]:
    """The JSON header (text and bytes) after its 8-byte little-endian length."""
    head = f.read(8)
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
    first = f.read(1) if 0 < n <= min(size - 8, _MAX_HEADER) else b""
    if first != b"{":
        _refuse(head, path)
        raise CheckpointError(
            f"{path} is truncated or not a trainwell checkpoint ({size} bytes, no valid header)"
        )
    raw = first + f.read(n - 1)
    try:
        return raw.decode("utf-8"), raw
    except UnicodeDecodeError as e:
        raise _corrupt(path, "the header", f"is not valid UTF-8 ({e.reason} at {e.start})") from e


def _dtype(name: Any, path: Path, field: str) -> torch.dtype:
    """A dtype given by its safetensors name (``"F32"``, ``"BF16"``, ...)."""
    if not isinstance(name, str) or name not in _NAMES:
        raise _corrupt(path, field, f"must be a dtype name such as 'F32', got {_show(name)}")
    return _NAMES[name]


def _shape(shape: Any, path: Path, field: str) -> list[int]:
    """A list of non-negative ints whose product fits torch's int64 sizes."""
    if not isinstance(shape, list):
        raise _corrupt(path, field, f"must be a list of non-negative ints, got {_show(shape)}")
    numel = 1
    for d in shape:
        if type(d) is not int or d < 0:
            problem = f"must be a list of non-negative ints, got {_show(shape)}"
            raise _corrupt(path, field, problem)
        numel *= d or 1  # torch multiplies every size, so even an empty tensor must fit
        if numel > _MAX_INT64:
            raise _corrupt(path, field, f"is too large for a tensor: {_show(shape)}")
    return shape


def _exact_fields(obj: Any, fields: frozenset[str], path: Path, field: str) -> dict:
    """A JSON object with exactly ``fields``."""
    if not isinstance(obj, dict):
        raise _corrupt(path, field, f"must be a JSON object, got {_show(obj)}")
    if obj.keys() != fields:
        missing, extra = sorted(fields - obj.keys()), sorted(obj.keys() - fields)
        raise _corrupt(
            path, field, f"must hold {sorted(fields)} (missing {missing}, extra {extra})"
        )
    return obj


def _header_entry(key: str, entry: Any, path: Path) -> _Entry:
    """A safetensors header entry: dtype, shape, and data_offsets that span its bytes."""
    field = f"header entry {key!r:.60}"
    entry = _exact_fields(entry, _ENTRY_FIELDS, path, field)
    dtype = _dtype(entry["dtype"], path, f"{field} dtype")
    shape = _shape(entry["shape"], path, f"{field} shape")
    offsets = entry["data_offsets"]
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and type(offsets[0]) is int
        and type(offsets[1]) is int
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise _corrupt(path, f"{field} data_offsets", f"must be [begin, end], got {_show(offsets)}")
    begin, end = offsets
    nbytes = math.prod(shape) * _ITEMSIZE[dtype]
    if end - begin != nbytes:
        raise _corrupt(
            path, f"{field} data_offsets", f"span {end - begin} bytes, its dtype and shape {nbytes}"
        )
    return _Entry(dtype, shape, begin, end)


def _check_layout(entries: Mapping[str, _Entry], data_size: int, size: int, path: Path) -> None:
    """The tensors' byte ranges tile the data section: in order, no gap, no overlap, no tail."""
    end = 0
    for key, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != end:
            problem = "overlaps another tensor" if entry.begin < end else "leaves a gap"
            raise _corrupt(path, f"header entry {_show(key)} data_offsets", problem)
        end = entry.end
    if end != data_size:
        raise CheckpointError(
            f"{path} is truncated or corrupt: {size} bytes on disk, the header describes "
            f"{size - data_size + end}"
        )


def _trainwell_metadata(meta: Any, path: Path) -> dict[str, str]:
    """The header's ``__metadata__``: strings (as in safetensors), the trainwell ones present."""
    if meta is None:
        raise CheckpointError(
            f"{path} is not a trainwell checkpoint: its header has no trainwell manifest"
        )
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _corrupt(path, "__metadata__", f"must map names to strings, got {_show(meta)}")
    for name in _METADATA_FIELDS:
        if name not in meta:
            raise _corrupt(path, f"__metadata__ {name}", "is missing")
    return meta


def _manifest_sum(meta: dict[str, str], path: Path) -> _Sum:
    """The checksum whose ``trainwell_manifest_<name>`` field ``__metadata__`` holds."""
    for version in sorted(_SUMS, reverse=True):
        if f"trainwell_manifest_{_SUMS[version].name}" in meta:
            return _SUMS[version]
    # None that this trainwell knows: a newer version gets the clear error, if it says so.
    text, manifest = meta["trainwell_manifest"], None
    with contextlib.suppress(CheckpointError):  # unverified: only its version is used
        manifest = _parse_json(text, _utf8(text, path, "the manifest"), path, "the manifest")
    if isinstance(manifest, dict):
        _check_version(manifest, path)
    names = " or ".join(f"trainwell_manifest_{s.name}" for s in _SUMS.values())
    raise _corrupt(path, "__metadata__", f"holds no manifest checksum ({names})")


def _check_version(manifest: dict, path: Path) -> int:
    """The manifest's version, one this trainwell reads; else a clear error."""
    fmt, version = manifest.get("format"), manifest.get("version")
    if fmt != FORMAT or type(version) is not int or version not in _SUMS:
        known = " and ".join(map(str, sorted(_SUMS)))
        raise CheckpointError(
            f"{path}: unsupported checkpoint format {_show(fmt)} version {_show(version)} "
            f"(this trainwell reads {FORMAT!r} versions {known})"
        )
    return version


def _check_manifest(manifest: Any, sums: _Sum, path: Path) -> None:
    """Format and version first (a newer file gets a clear error), then every field's type.

    The version must be the one whose checksum (``sums``) verified the manifest.
    """
    if not isinstance(manifest, dict):
        raise _corrupt(path, "the manifest", f"must be a JSON object, got {_show(manifest)}")
    version = _check_version(manifest, path)
    if _SUMS[version] != sums:
        raise _corrupt(
            path, "manifest version", f"{version} does not match its {sums.name} checksum"
        )
    state_sum = f"state_{sums.name}"
    fields = frozenset({"format", "version", state_sum, "tensors", "metadata"})
    _exact_fields(manifest, fields, path, "the manifest")
    sums.field(manifest[state_sum], path, f"manifest {state_sum}")
    tensors = manifest["tensors"]
    if not isinstance(tensors, dict):
        raise _corrupt(path, "manifest tensors", f"must be a JSON object, got {_show(tensors)}")
    description_fields = frozenset({"dtype", "shape", sums.name})
    for key, description in tensors.items():
        field = f"manifest tensor {key!r:.60}"
        _exact_fields(description, description_fields, path, field)
        _dtype(description["dtype"], path, f"{field} dtype")
        _shape(description["shape"], path, f"{field} shape")
        sums.field(description[sums.name], path, f"{field} {sums.name}")
    if not isinstance(manifest["metadata"], dict):
        raise _corrupt(
            path, "manifest metadata", f"must be a JSON object, got {_show(manifest['metadata'])}"
        )


def _check_descriptions(entries: Mapping[str, _Entry], manifest: dict, path: Path) -> None:
    """The manifest describes exactly the header's tensors, with the same dtypes and shapes."""
    described = manifest["tensors"]
    if entries.keys() != described.keys():
        missing = sorted(described.keys() - entries.keys())[:3]
        extra = sorted(entries.keys() - described.keys())[:3]
        raise _corrupt(
            path, "the header", f"names other tensors than the manifest ({missing=}, {extra=})"
        )
    for key, entry in entries.items():
        expect = described[key]
        if (_DTYPES[entry.dtype], entry.shape) != (expect["dtype"], expect["shape"]):
            raise _corrupt(path, f"header entry {_show(key)}", "disagrees with the manifest")


def _read_header(f: BinaryIO, path: Path) -> _Header:
    """The validated header: tensor entries, manifest (checksum verified) and JSON state."""
    size = os.fstat(f.fileno()).st_size
    text, raw = _header_text(f, size, path)
    header = _parse_json(text, raw, path, "the header")
    if not isinstance(header, dict):
        raise _corrupt(path, "the header", f"must be a JSON object, got {_show(header)}")
    meta = _trainwell_metadata(header.pop("__metadata__", None), path)
    sums = _manifest_sum(meta, path)
    manifest_text = meta["trainwell_manifest"]
    manifest_bytes = _utf8(manifest_text, path, "__metadata__ trainwell_manifest")
    if sums.digest(manifest_bytes) != meta[f"trainwell_manifest_{sums.name}"]:
        raise CheckpointError(f"{path}: manifest checksum mismatch (the file is corrupt)")
    manifest = _parse_json(manifest_text, manifest_bytes, path, "the manifest")
    _check_manifest(manifest, sums, path)
    entries = {key: _header_entry(key, entry, path) for key, entry in header.items()}
    start = 8 + len(raw)
    _check_layout(entries, size - start, size, path)
    _check_descriptions(entries, manifest, path)
    return _Header(entries, manifest, meta["trainwell_state"], start, size, sums)


# ---------------------------------------------------------------------------- decoding
# Where a value sits in the state, for error messages: () for the root, else
# (parent, key). Built in O(1) per container and rendered only when something is wrong.
_Where = tuple


def _entry(where: _Where) -> str:
    """``where`` as a field name, e.g. ``state entry /optimizer/state/0``."""
    keys = []
    while where:
        where, key = where
        keys.append(key[:40] if isinstance(key, str) else _show(key))
    return "state entry /" + "/".join(reversed(keys))


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor], path: Path, where: _Where) -> Any:
    """The value that ``_encode`` wrote as the JSON ``obj`` (at ``where`` in the state).

    JSON scalars, lists and str-keyed objects stand for themselves; an object with the
    ``"__tw__"`` tag is a tensor, bytes or numpy array (``{"__tw__": tag, "key": name}``,
    naming a tensor of the file) or a tuple or a dict with any hashable keys
    (``{"__tw__": tag, "items": [...]}``). Anything else is a CheckpointError.
    """
    if isinstance(obj, list):  # (scalars stand for themselves, without a call)
        return [
            _decode(v, tensors, path, (where, i)) if isinstance(v, (list, dict)) else v
            for i, v in enumerate(obj)
        ]
    if not isinstance(obj, dict):
        return obj
    if _TAG not in obj:
        return {
            k: _decode(v, tensors, path, (where, k)) if isinstance(v, (list, dict)) else v
            for k, v in obj.items()
        }
    tag = obj[_TAG]
    if tag in ("tensor", "bytes", "ndarray"):
        return _tagged_tensor(obj, tensors, path, where)
    if tag == "tuple":
        items = _tagged_items(obj, path, where)
        return tuple(
            _decode(v, tensors, path, (where, i)) if isinstance(v, (list, dict)) else v
            for i, v in enumerate(items)
        )
    if tag == "dict":
        return _decode_dict(_tagged_items(obj, path, where), tensors, path, where)
    raise _corrupt(path, _entry(where), f"has an unknown type {_show(tag)}")


def _tagged_tensor(
    obj: dict, tensors: Mapping[str, torch.Tensor], path: Path, where: _Where
) -> Any:
    """``{"__tw__": "tensor" | "bytes" | "ndarray", "key": name}``: the tensor ``name``.

    Bytes are stored as a 1-D uint8 tensor; a numpy array needs a dtype numpy has.
    """
    tag = obj[_TAG]
    if obj.keys() != _KEY_ENTRY_FIELDS:
        raise _corrupt(path, _entry(where), f"must hold exactly {sorted(_KEY_ENTRY_FIELDS)}")
    key = obj["key"]
    if not isinstance(key, str) or key not in tensors:
        raise _corrupt(path, f"{_entry(where)} key", f"names no tensor of the file: {_show(key)}")
    t = tensors[key]
    if tag == "tensor":
        return t
    if tag == "bytes":
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise _corrupt(path, _entry(where), f"holds bytes, but {_show(key)} is not 1-D uint8")
        return t.cpu().numpy().tobytes()
    if t.dtype in _NOT_IN_NUMPY:
        raise _corrupt(path, _entry(where), f"holds a numpy array, but numpy has no {t.dtype}")
    return t.cpu().numpy()


def _tagged_items(obj: dict, path: Path, where: _Where) -> list:
    """``{"__tw__": "dict" | "tuple", "items": [...]}``: the list of items."""
    if obj.keys() != _ITEMS_ENTRY_FIELDS:
        raise _corrupt(path, _entry(where), f"must hold exactly {sorted(_ITEMS_ENTRY_FIELDS)}")
    items = obj["items"]
    if not isinstance(items, list):
        raise _corrupt(path, f"{_entry(where)} items", f"must be a list, got {_show(items)}")
    return items


def _decode_dict(
    items: list, tensors: Mapping[str, torch.Tensor], path: Path, where: _Where
) -> dict[Any, Any]:
    """A dict from ``[key, value]`` pairs; each key hashable and different from the others."""
    decoded: dict[Any, Any] = {}
    for i, item in enumerate(items):
        if not isinstance(item, list) or len(item) != 2:
            problem = f"must be a [key, value] pair, got {_show(item)}"
            raise _corrupt(path, f"{_entry(where)} item {i}", problem)
        key = _decode(item[0], tensors, path, (where, f"[key {i}]"))
        if not _hashable(key):
            problem = f"has a key that cannot be a dict key: {_show(key)}"
            raise _corrupt(path, f"{_entry(where)} item {i}", problem)
        if key in decoded:
            raise _corrupt(path, f"{_entry(where)} item {i}", f"repeats the key {_show(key)}")
        decoded[key] = _decode(item[1], tensors, path, (where, key))
    return decoded


def _hashable(value: Any) -> bool:
    """Whether ``value`` can be a dict key (a tuple holding a list cannot)."""
    try:
        hash(value)
    except TypeError:
        return False
    return True


# ------------------------------------------------------------------------------ reading
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


def _map(f: BinaryIO, header: _Header) -> mmap.mmap | None:
    """A private copy-on-write mapping of the open file ``f``, or None where there is none.

    None on Windows (a mapped file can be neither replaced nor deleted, which would break
    the next ``save`` to its path), for a file without tensor data, and where the file
    cannot be mapped (then it is read).
    """
    if os.name == "nt" or header.size == header.data_start:
        return None
    try:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError):
        return None
    if len(m) != header.size:  # changed since its header was read: verify nothing else
        m.close()
        return None
    return m


def _read_tensors(
    f: BinaryIO, header: _Header, path: Path, use_mmap: bool
) -> dict[str, torch.Tensor]:
    """Every tensor of the file, each one's bytes checksummed before it is made a tensor.

    Mapped (``use_mmap``): each tensor is a copy-on-write view of the file's pages, so the
    one pass over its bytes is the checksum (no allocation, no copy; the pages are shared
    with the page cache until a tensor is written to). Otherwise each tensor's bytes are
    read into a tensor of its own. In file order, so the reads are sequential.
    """
    m = _map(f, header) if use_mmap else None
    view = memoryview(m) if m is not None else None
    described, name, digest = header.manifest["tensors"], header.sums.name, header.sums.digest
    tensors: dict[str, torch.Tensor] = {}
    f.seek(header.data_start)
    try:
        for key, entry in sorted(header.entries.items(), key=lambda item: item[1].begin):
            begin, n = header.data_start + entry.begin, entry.end - entry.begin
            if view is not None:
                ok = digest(view[begin : begin + n]) == described[key][name]
            else:
                data = torch.empty(n, dtype=torch.uint8)
                ok = f.readinto(data.numpy()) == n and digest(data.numpy()) == described[key][name]
            if not ok:
                raise CheckpointError(f"{path}: checksum mismatch in tensor {_show(key)} (corrupt)")
            if view is None:
                t = data.view(entry.dtype)
            elif n == 0:
                t = torch.empty(0, dtype=entry.dtype)
            else:
                size = _ITEMSIZE[entry.dtype]
                t = torch.frombuffer(m, dtype=entry.dtype, count=n // size, offset=begin)
                if begin % size:  # misaligned (save never writes that): a copy of its own
                    t = t.clone()
            tensors[key] = t.reshape(entry.shape)
    finally:
        if view is not None:
            view.release()
    return tensors


def _state_document(header: _Header, path: Path) -> Any:
    """The JSON state, its checksum verified, parsed (not yet decoded)."""
    data = _utf8(header.state, path, "__metadata__ trainwell_state")
    if header.sums.digest(data) != header.manifest[f"state_{header.sums.name}"]:
        raise CheckpointError(f"{path}: checksum mismatch in the JSON state (corrupt)")
    return _parse_json(header.state, data, path, "the JSON state")


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``metadata`` given to ``save``, read from the header only (no tensor data).

    Raises ``CheckpointError`` when the header is unreadable, corrupt or the file is
    truncated (``OSError`` when the file cannot be opened); it does not verify the tensor
    checksums (``verify`` does).

    Example:
        >>> import tempfile, trainwell
        >>> p = trainwell.save(f"{tempfile.mkdtemp()}/c", {}, metadata={"step": 3})
        >>> read_metadata(p)
        {'step': 3}
    """
    path = Path(path)
    with open(path, "rb") as f:
        return _read_header(f, path).manifest["metadata"]


def load(
    path: str | os.PathLike, *, device: str | torch.device | None = None, mmap: bool = True
) -> Any:
    """Read a checkpoint written by ``save``, verifying every checksum; never unpickles.

    Tensors come back on the CPU (or ``device``), dict keys with their original type
    (int keys stay int), tuples as tuples, numpy arrays as numpy arrays. Every part of the
    file is validated before it is used (see the module docstring), so a damaged file
    raises ``CheckpointError`` and nothing else: every tensor's bytes and the JSON state
    are checksummed before anything is returned.

    With ``mmap=True`` (the default, as in ``safetensors.torch.load_file``) the CPU
    tensors are private copy-on-write mappings of the file: checksumming them is the only
    pass over their bytes, and writing to one never touches the file. ``save`` never
    rewrites a file in place (it replaces it), so they stay the verified bytes; a file that
    another program truncates or rewrites in place while its tensors are alive changes
    them (or, truncated, faults on access). ``mmap=False`` reads every tensor into memory
    of its own instead (always so on Windows, where a mapped file cannot be replaced).

    Raises:
        CheckpointError: the file is truncated, corrupt, a pickle/``torch.save`` file, or
            not a trainwell checkpoint.
        OSError: the file cannot be opened or read.

    Example:
        >>> import tempfile, torch, trainwell
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1, momentum=0.9)
        >>> p = trainwell.save(f"{tempfile.mkdtemp()}/c", {"optimizer": opt.state_dict()})
        >>> opt.load_state_dict(trainwell.load(p)["optimizer"])
    """
    path = Path(path)
    with open(path, "rb") as f:
        header = _read_header(f, path)
        doc = _state_document(header, path)
        tensors = _read_tensors(f, header, path, mmap)
    if device is not None:
        tensors = {key: t.to(device) for key, t in tensors.items()}
    return _decode(doc, tensors, path, ())


def verify(path: str | os.PathLike) -> bool:
    """True when ``path`` is a complete, uncorrupted trainwell checkpoint; never raises.

    Example:
        >>> verify("/nonexistent/checkpoint")
        False
    """
    try:
        load(path)
    except (CheckpointError, OSError):
        return False
    return True
