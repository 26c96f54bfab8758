"""A seeded mutation fuzzer: every damaged checkpoint raises CheckpointError, nothing else.

Real checkpoints (a model + optimizer + scheduler + RNG state, and a state with int keys,
tuples, bytes, numpy arrays and NaN) are mutated in every way a disk, a copy or a hand edit
can damage them: bit flips anywhere, truncation, appended bytes, edits of the length prefix,
of the tensor offsets and of every header and manifest field (deleted, or replaced by a
value of the wrong type), malformed tagged entries in the JSON state, deep nesting, invalid
UTF-8 and lone surrogates. Edits of checksummed text are re-checksummed (with the file's own
checksum: XXH3-64 in version 2 files, CRC-32 in version 1), so that they reach the deep
validation instead of stopping at a checksum. Version 1 files (tests/checkpoints/data/
v1.safetensors, written by trainwell 0.1) get the same mutations.

For each mutated file: ``load`` raises ``CheckpointError`` or returns the original state
exactly (or, for a re-checksummed edit of the JSON state, a well-formed state that saves
and loads back the same); ``verify`` returns a bool that says whether ``load`` succeeded;
``read_metadata`` raises ``CheckpointError`` or returns a dict.
"""

from __future__ import annotations

import copy
import json
import random
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xxhash

from tests.checkpoints.test_format import V1_FILE, assert_same, rich_state
from trainwell import CheckpointError, load, rng_state, save, set_rng_state
from trainwell.checkpoints.format import read_metadata, verify

SEED = 20240615
#: Values of the wrong type (or range) that replace a field.
WRONG = [None, [], [1, 2, 3], "text", 2**80, -1, 1.5, {"a": {"b": [1]}}, True, ""]
DEEP = 100_000

Mutation = tuple[str, bytes, str]  # (label, file bytes, oracle: "same" or "state")


# ------------------------------------------------------------------------- real files
def training_state() -> dict[str, Any]:
    """A model + AdamW + OneCycleLR + RNG state after two steps, the same in every process."""
    before = rng_state()
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(5, 6)).pow(2).mean().backward()
        opt.step()
        sched.step()
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": rng_state(),
        "epoch": 2,
    }
    set_rng_state(before)
    return state


def source_files(tmp_path: Path) -> list[tuple[str, bytes]]:
    metadata = {"step": 2, "metrics": {"val_loss": 0.25}, "trainwell_config_hash": "ab12"}
    files = []
    for name, state in (("training", training_state()), ("rich", rich_state())):
        path = save(tmp_path / f"{name}.safetensors", state, metadata=metadata)
        files.append((name, path.read_bytes()))
    return files


# -------------------------------------------------------------------- file surgery
#: The checksum of each format version, by its field name, computed here independently.
DIGESTS: dict[str, Callable[[bytes], str]] = {
    "xxh3_64": xxhash.xxh3_64_hexdigest,  # version 2
    "crc32": lambda data: f"{zlib.crc32(data):08x}",  # version 1
}
DIGITS = {"xxh3_64": 16, "crc32": 8}


def sum_of(header: dict[str, Any]) -> str:
    """The checksum a file's header uses: ``xxh3_64`` (version 2) or ``crc32`` (version 1)."""
    return next(name for name in DIGESTS if f"trainwell_manifest_{name}" in header["__metadata__"])


def checksum(text: str, name: str) -> str:
    """The checksum an editor would write (lone surrogates kept, so they reach the parser)."""
    return DIGESTS[name](text.encode("utf-8", "surrogatepass"))


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict[str, Any] | str | bytes, body: bytes) -> bytes:
    """A file from a header (a dict, JSON text, or raw bytes) and the data section."""
    if isinstance(header, bytes):
        raw = header
    else:
        text = header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))
        raw = text.encode("utf-8", "surrogatepass")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def with_manifest_text(header: dict[str, Any], text: str) -> dict[str, Any]:
    name = sum_of(header)
    header = copy.deepcopy(header)
    header["__metadata__"]["trainwell_manifest"] = text
    header["__metadata__"][f"trainwell_manifest_{name}"] = checksum(text, name)
    return header


def with_manifest(header: dict[str, Any], manifest: Any) -> dict[str, Any]:
    return with_manifest_text(header, json.dumps(manifest, separators=(",", ":")))


def with_state_text(header: dict[str, Any], text: str) -> dict[str, Any]:
    manifest = json.loads(header["__metadata__"]["trainwell_manifest"])
    name = sum_of(header)
    manifest[f"state_{name}"] = checksum(text, name)
    header = with_manifest(header, manifest)
    header["__metadata__"]["trainwell_state"] = text
    return header


def manifest_of(header: dict[str, Any]) -> dict[str, Any]:
    return json.loads(header["__metadata__"]["trainwell_manifest"])


def state_of(header: dict[str, Any]) -> Any:
    return json.loads(header["__metadata__"]["trainwell_state"])


def field_edits(container: dict[str, Any], key: str, rnd: random.Random, k: int = 4):
    """(what, edited copy) pairs: ``key`` deleted, and replaced by ``k`` wrong values."""
    deleted = copy.deepcopy(container)
    deleted.pop(key, None)
    yield f"delete {key}", deleted
    for value in rnd.sample(WRONG, k):
        edited = copy.deepcopy(container)
        edited[key] = copy.deepcopy(value)
        yield f"{key}={value!r:.20}", edited


def nodes(obj: Any) -> Iterator[Any]:
    """Every dict and list of a JSON document, depth first."""
    if isinstance(obj, (dict, list)):
        yield obj
        for value in obj.values() if isinstance(obj, dict) else obj:
            yield from nodes(value)


# ----------------------------------------------------------------------- mutations
def bit_flips(data: bytes, rnd: random.Random) -> Iterator[Mutation]:
    n = struct.unpack("<Q", data[:8])[0]
    regions = [(0, 8 + n, 90), (8 + n, len(data), 50)]  # header (prefix included) and data
    for begin, end, count in regions:
        for _ in range(count):
            i, bit = rnd.randrange(begin, end), 1 << rnd.randrange(8)
            mutated = bytearray(data)
            mutated[i] ^= bit
            yield f"flip bit {bit:#x} of byte {i}", bytes(mutated), "same"


def truncations_and_appends(data: bytes, rnd: random.Random) -> Iterator[Mutation]:
    n = struct.unpack("<Q", data[:8])[0]
    sizes = (
        set(range(0, 17))
        | {8 + n + d for d in (-1, 0, 1, 2)}
        | {len(data) - d for d in (1, 2, 4, 8)}
    )
    sizes |= {rnd.randrange(len(data)) for _ in range(25)}
    for size in sorted(s for s in sizes if 0 <= s < len(data)):
        yield f"truncate to {size}", data[:size], "same"
    tails = [b"\0", b" ", b" " * 8, b"{}", data, bytes(rnd.randrange(256) for _ in range(37))]
    for tail in tails:
        yield f"append {len(tail)} bytes", data + tail, "same"


def length_prefix_edits(data: bytes, rnd: random.Random) -> Iterator[Mutation]:
    n = struct.unpack("<Q", data[:8])[0]
    values = {0, 1, 7, n - 8, n - 1, n + 1, n + 8, len(data) - 8, len(data), 2**63, 2**64 - 1}
    values |= {rnd.randrange(2**64) for _ in range(3)}
    for value in sorted(v for v in values if 0 <= v < 2**64 and v != n):
        yield f"length prefix {value}", struct.pack("<Q", value) + data[8:], "same"


def offset_edits(data: bytes, rnd: random.Random) -> Iterator[Mutation]:
    header, body = split(data)
    keys = [k for k in header if k != "__metadata__"]
    for key in rnd.sample(keys, min(6, len(keys))):
        begin, end = header[key]["data_offsets"]
        other = header[rnd.choice(keys)]["data_offsets"]
        for offsets in (
            [begin + 1, end + 1], [begin - 1, end - 1], [begin + 8, end + 8], [end, begin],
            list(other), [len(body), len(body) + end - begin], [begin, end + 2**40],
            [-8, end - begin - 8], [begin, begin], [0, len(body)],
        ):  # fmt: skip
            edited = copy.deepcopy(header)
            edited[key]["data_offsets"] = offsets
            yield f"{key} data_offsets={offsets}", join(edited, body), "same"
    same_size: dict[int, list[str]] = {}
    for key in keys:
        begin, end = header[key]["data_offsets"]
        same_size.setdefault(end - begin, []).append(key)
    for group in same_size.values():
        if len(group) >= 2:  # swapped ranges: caught by the checksums unless the bytes agree
            a, b = rnd.sample(group, 2)
            edited = copy.deepcopy(header)
            edited[a]["data_offsets"], edited[b]["data_offsets"] = (
                header[b]["data_offsets"],
                header[a]["data_offsets"],
            )
            yield f"swap offsets of {a} and {b}", join(edited, body), "same"
    shifted = copy.deepcopy(header)
    for key in keys:
        shifted[key]["data_offsets"] = [o + 8 for o in shifted[key]["data_offsets"]]
    yield "every offset shifted by 8", join(shifted, bytes(8) + body), "same"


def header_field_edits(data: bytes, rnd: random.Random) -> Iterator[Mutation]:
    header, body = split(data)
    keys = [k for k in header if k != "__metadata__"]
    for key in rnd.sample(keys, min(6, len(keys))):
        for field in ("dtype", "shape", "data_offsets"):
            for what, entry in field_edits(header[key], field, rnd, k=3):
                yield f"header {key} {what}", join({**header, key: entry}, body), "same"
        for value in rnd.sample(WRONG, 3):
            yield f"header {key}={value!r:.20}", join({**header, key: value}, body), "same"
        extra = copy.deepcopy(header)
        extra[key]["extra"] = 1
        yield f"header {key} extra field", join(extra, body), "same"
    for dtype in ("F32", "I64", "U8", "BOOL", "F8_E5M2", "f32", "Q4"):
        edited = copy.deepcopy(header)
        edited[keys[0]]["dtype"] = dtype
        yield f"header {keys[0]} dtype={dtype}", join(edited, body), "same"
    for shape in ([-1], [2**63, 0], [2**62, 2**62, 0], [1.0], ["2"], [[2]], [True], [0]):
        edited = copy.deepcopy(header)
        edited[keys[1]]["shape"] = shape
        yield f"header {keys[1]} shape={shape}", join(edited, body), "same"
    for what, edited in field_edits(header, "__metadata__", rnd, k=5):
        yield f"header {what}", join(edited, body), "same"
    meta = header["__metadata__"]
    for field in list(meta):
        for what, new_meta in field_edits(meta, field, rnd, k=4):
            yield f"__metadata__ {what}", join({**header, "__metadata__": new_meta}, body), "same"
    for value in rnd.sample(WRONG, 4):
        edited = copy.deepcopy(header)
        edited["__metadata__"]["other"] = value
        yield f"__metadata__ other={value!r:.20}", join(edited, body), "same"
    for value in WRONG[1:5]:
        yield f"header is {value!r:.20}", join(json.dumps(value), body), "same"


def manifest_field_edits(data: bytes, rnd: random.Random) -> Iterator[Mutation]:
    header, body = split(data)
    manifest = manifest_of(header)
    name = sum_of(header)
    state_sum, digits = f"state_{name}", DIGITS[name]
    for field in ("format", "version", state_sum, "tensors", "metadata"):
        for what, edited in field_edits(manifest, field, rnd, k=5):
            yield f"manifest {what}", join(with_manifest(header, edited), body), "same"
    bad_digests = (  # one digit short, upper case, not hex, one digit long
        "0" * (digits - 1), "ABCDEF01" * (digits // 8), ("xyz" * digits)[:digits],
        "deadbeef" * (digits // 8) + "0",
    )  # fmt: skip
    for digest in bad_digests:
        edited = {**manifest, state_sum: digest}
        yield f"manifest {state_sum}={digest}", join(with_manifest(header, edited), body), "same"
    extra = {**manifest, "extra": 1}
    yield "manifest extra field", join(with_manifest(header, extra), body), "same"
    for value in ("trainwell-checkpoint2", 1, 2, 1.0, True):
        edited = {**manifest, "version" if not isinstance(value, str) else "format": value}
        yield (
            f"manifest format/version {value!r}",
            join(with_manifest(header, edited), body),
            "same",
        )
    tensors = manifest["tensors"]
    for key in rnd.sample(sorted(tensors), min(6, len(tensors))):
        for field in ("dtype", "shape", name):
            for what, entry in field_edits(tensors[key], field, rnd, k=3):
                edited = {**manifest, "tensors": {**tensors, key: entry}}
                yield (
                    f"manifest tensor {key} {what}",
                    join(with_manifest(header, edited), body),
                    "same",
                )
        for what, edited_tensors in field_edits(tensors, key, rnd, k=3):
            edited = {**manifest, "tensors": edited_tensors}
            yield f"manifest tensors {what}", join(with_manifest(header, edited), body), "same"
    edited = {
        **manifest,
        "tensors": {**tensors, "/ghost": {"dtype": "F32", "shape": [], name: "0" * digits}},
    }
    yield "manifest tensor that the header lacks", join(with_manifest(header, edited), body), "same"
    for value in ({"nested": {"metadata": [1, {"x": None}]}}, {"step": "3", "metrics": [1]}):
        edited = {**manifest, "metadata": value}  # other metadata: the state is the same
        yield f"manifest metadata={value!r:.20}", join(with_manifest(header, edited), body), "same"


def state_edits(data: bytes, rnd: random.Random) -> Iterator[Mutation]:
    """Malformed tagged entries and wrong values in the JSON state, re-checksummed."""
    header, body = split(data)
    doc = state_of(header)
    tensor_names = [k for k in header if k != "__metadata__"]

    def emit(what: str, edit: Callable[[Any], Any]) -> Mutation:
        """The file whose state is ``doc`` edited in place by ``edit``, re-checksummed."""
        edited = copy.deepcopy(doc)
        edit(edited)
        text = json.dumps(edited, separators=(",", ":"), allow_nan=True)
        return f"state {what}", join(with_state_text(header, text), body), "state"

    def tagged(tags: tuple[str, ...]) -> list[tuple[int, Any]]:
        found = [
            node for node in nodes(doc) if isinstance(node, dict) and node.get("__tw__") in tags
        ]
        return [(i, found[i]) for i in rnd.sample(range(len(found)), min(3, len(found)))]

    def at(i: int, tags: tuple[str, ...]) -> Callable[[Any], dict]:
        return lambda d: [n for n in nodes(d) if isinstance(n, dict) and n.get("__tw__") in tags][i]

    key_tags, item_tags = ("tensor", "bytes", "ndarray"), ("dict", "tuple")
    for i, node in tagged(key_tags):
        get = at(i, key_tags)
        yield emit(f"{node['__tw__']} entry without key", lambda d, g=get: g(d).pop("key"))
        for value in [*rnd.sample(WRONG, 4), "/no such tensor", rnd.choice(tensor_names)]:
            yield emit(
                f"{node['__tw__']} key={value!r:.20}", lambda d, g=get, v=value: g(d).update(key=v)
            )
        for tag in ("tensor", "bytes", "ndarray", "dict", "tuple", "pickle", None, 5, ["tensor"]):
            yield emit(
                f"{node['__tw__']} tagged {tag!r}", lambda d, g=get, t=tag: g(d).update(__tw__=t)
            )
        yield emit(f"{node['__tw__']} entry extra field", lambda d, g=get: g(d).update(extra=1))
    for i, node in tagged(item_tags):
        get = at(i, item_tags)
        yield emit(f"{node['__tw__']} entry without items", lambda d, g=get: g(d).pop("items"))
        for value in [
            *rnd.sample(WRONG, 4),
            [[1]],
            [[1, 2, 3]],
            ["ab"],
            [[[1, 2], "v"]],
            [[{"a": 1}, "v"]],
            [[1, "a"], [1, "b"]],
            [[[[]], 0]],
        ]:
            yield emit(
                f"{node['__tw__']} items={value!r:.20}",
                lambda d, g=get, v=value: g(d).update(items=v),
            )
        yield emit(
            f"{node['__tw__']} tagged 'tensor'", lambda d, g=get: g(d).update(__tw__="tensor")
        )
    keys = [k for k in (doc if isinstance(doc, dict) else {})]
    for key in rnd.sample(keys, min(3, len(keys))):
        for value in rnd.sample(WRONG, 3):
            yield emit(f"/{key}={value!r:.20}", lambda d, k=key, v=value: d.update({k: v}))
    for value in rnd.sample(WRONG, 4):
        text = json.dumps(value)
        yield f"state document={text:.20}", join(with_state_text(header, text), body), "state"


def nesting_and_encoding_edits(data: bytes, rnd: random.Random) -> Iterator[Mutation]:
    header, body = split(data)
    doc = header["__metadata__"]["trainwell_state"]
    manifest = manifest_of(header)
    for depth in (DEEP, 1000, 201, 199, 150):
        deep_list = "[" * depth + "]" * depth
        deep_dict = '{"a":' * depth + "1" + "}" * depth
        for text in (deep_list, deep_dict, "[" * depth, f'{{"x":{deep_list}}}'):
            yield f"state nested {depth} deep", join(with_state_text(header, text), body), "state"
        edited = {**manifest, "metadata": {"deep": json.loads(deep_list) if depth < 900 else 0}}
        text = (
            json.dumps(edited) if depth < 900 else json.dumps(edited).replace("0}", deep_list + "}")
        )
        yield (
            f"manifest metadata nested {depth} deep",
            join(with_manifest_text(header, text), body),
            "same",
        )
        text = json.dumps(header, separators=(",", ":"))
        for inserted in ('{"deep":' + deep_list + ",", '{"deep":' + "[" * depth + ","):
            yield f"header nested {depth} deep", join(inserted + text[1:], body), "same"
        key = next(k for k in header if k != "__metadata__")
        shaped = text.replace(f'"{key}":{{"dtype"', f'"{key}":{{"shape":{deep_list},"dtype"', 1)
        yield f"header shape nested {depth} deep", join(shaped, body), "same"
    # invalid UTF-8 in the header, the length kept
    text = json.dumps(header, separators=(",", ":")).encode()
    for bad in (b"\xff", b"\x80", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80"):
        for _ in range(3):
            i = rnd.randrange(1, len(text) - len(bad))
            raw = text[:i] + bad + text[i + len(bad) :]
            yield (
                f"header bytes {bad!r} at {i}",
                join(raw, body),
                "same",
            )
    # lone surrogates: as JSON escapes in the header (the text they decode to cannot be encoded)
    for cut in (1, len(doc) // 2, len(doc) - 1):
        surrogate = doc[:cut] + "\ud800" + doc[cut:]
        yield (
            "header: lone surrogate in the state text",
            join(with_state_text(header, surrogate), body),
            "state",
        )
    manifest_text = header["__metadata__"]["trainwell_manifest"]
    for cut in (1, len(manifest_text) // 2):
        surrogate = manifest_text[:cut] + "\udfff" + manifest_text[cut:]
        yield (
            "header: lone surrogate in the manifest text",
            join(with_manifest_text(header, surrogate), body),
            "same",
        )
    key = next(k for k in header if k != "__metadata__")
    renamed = {(k + "\ud800" if k == key else k): v for k, v in header.items()}
    yield "header: lone surrogate in a tensor name", join(renamed, body), "same"
    edited = copy.deepcopy(header)
    edited["__metadata__"]["\udc80"] = "x"
    edited["__metadata__"][f"trainwell_manifest_{sum_of(header)}"] += "\ud800"
    yield "header: lone surrogates in __metadata__", join(edited, body), "same"
    # ... and as escapes inside the JSON state and the manifest: well-formed strings
    escaped = doc.replace('"', '"\\ud800', 1) if doc.startswith('{"') else doc
    yield (
        "state: lone surrogate escape in a key",
        join(with_state_text(header, escaped), body),
        "state",
    )
    edited = {**manifest, "metadata": {"note": "\ud800 \udfff"}}
    yield (
        "manifest: lone surrogate escapes in metadata",
        join(with_manifest(header, edited), body),
        "same",
    )
    raw_utf8 = json.dumps({**manifest, "metadata": {"ünï": "cödé"}}, ensure_ascii=False)
    yield "manifest: raw non-ASCII UTF-8", join(with_manifest_text(header, raw_utf8), body), "same"


def mutations(files: list[tuple[str, bytes]], seed: int) -> Iterator[tuple[str, Mutation]]:
    kinds = (
        bit_flips, truncations_and_appends, length_prefix_edits, offset_edits,
        header_field_edits, manifest_field_edits, state_edits, nesting_and_encoding_edits,
    )  # fmt: skip
    for name, data in files:
        for kind in kinds:
            rnd = random.Random(f"{seed}/{name}/{kind.__name__}")
            for mutation in kind(data, rnd):
                yield name, mutation


# -------------------------------------------------------------------------- oracles
def assert_well_formed(state: Any, where: str = "") -> None:
    """Only the types ``save`` stores, with hashable dict keys."""
    if isinstance(state, dict):
        for key, value in state.items():
            hash(key)
            assert_well_formed(key, f"{where}[key]")
            assert_well_formed(value, f"{where}/{key}")
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            assert_well_formed(value, f"{where}/{i}")
    elif isinstance(state, torch.Tensor):
        assert state.device.type == "cpu" and state.is_contiguous(), where
    else:
        types = (np.ndarray, bytes, str, int, float, type(None))
        assert isinstance(state, types), (where, type(state))


def check(path: Path, data: bytes, oracle: str, original: Any, spare: Path) -> str:
    """Apply the oracle to one mutated file; return "refused" or "loaded"."""
    path.write_bytes(data)
    try:
        loaded = load(path)
        outcome = "loaded"
    except CheckpointError as err:
        assert str(path) in str(err), err  # the error names the file
        outcome = "refused"
    if outcome == "loaded":
        if oracle == "same":
            assert_same(original, loaded)
        else:  # a re-checksummed edit of the state: a different, well-formed state
            assert_well_formed(loaded)
            assert_same(loaded, load(save(spare, loaded)))
    assert verify(path) is (outcome == "loaded")
    try:
        meta = read_metadata(path)
    except CheckpointError:
        pass
    else:
        assert isinstance(meta, dict)
    return outcome


def fuzz(tmp_path: Path, files: list[tuple[str, bytes]]) -> None:
    """Every mutation of ``files`` through ``check``; fails with every mutation that failed."""
    start = time.perf_counter()
    originals = {}
    for name, data in files:
        (tmp_path / f"original-{name}.safetensors").write_bytes(data)
        originals[name] = load(tmp_path / f"original-{name}.safetensors")
    path, spare = tmp_path / "mutated.safetensors", tmp_path / "spare.safetensors"
    counts: dict[str, int] = {"refused": 0, "loaded": 0}
    failures = []
    for name, (label, data, oracle) in mutations(files, SEED):
        try:
            counts[check(path, data, oracle, originals[name], spare)] += 1
        except Exception as err:  # collect every failure, with the mutation that caused it
            failures.append(f"{name}: {label}: {type(err).__name__}: {str(err)[:200]}")
    total = sum(counts.values()) + len(failures)
    elapsed = time.perf_counter() - start
    print(f"{total} mutations in {elapsed:.1f} s: {counts}, {len(failures)} failures")
    assert not failures, f"{len(failures)} of {total} mutations failed:\n" + "\n".join(
        failures[:40]
    )
    assert total >= 500
    assert counts["refused"] > 0.9 * total


@pytest.mark.timeout(120)  # about 3 s on a laptop core
def test_mutated_checkpoints_raise_only_checkpoint_error(tmp_path: Path) -> None:
    fuzz(tmp_path, source_files(tmp_path))


@pytest.mark.timeout(120)
def test_mutated_version_1_checkpoints_raise_only_checkpoint_error(tmp_path: Path) -> None:
    """A version 1 file (CRC-32) is held to the same rules: its damage is caught the same way."""
    header, _ = split(V1_FILE.read_bytes())
    assert sum_of(header) == "crc32" and manifest_of(header)["version"] == 1
    fuzz(tmp_path, [("v1", V1_FILE.read_bytes())])
