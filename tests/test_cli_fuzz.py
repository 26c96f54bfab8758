"""A seeded fuzz of the CLI: random ``--set`` values and mutated config files.

For every case the real CLI (in-process) must exit 0, or exit 1 / 2 with at most two
``trainwell: error:`` lines and no traceback -- and finish quickly (a config that would
train for 10^23 epochs must be refused, not started). The cases are drawn with a fixed
seed, so a failure names a case that can be replayed: ``CASES[i]``.
"""

from __future__ import annotations

import random
import time
import typing

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from trainwell.app.config import RunConfig
from trainwell.cli import app

runner = CliRunner()
SEED = 15
BASE = """seed = 0
epochs = 1
batch_size = 32
[data]
source = "digits"
train_size = 64
[model]
hidden = [8]
"""
#: Values a user (or a typo) can give to any key: edge cases of every TOML type.
VALUES = ["0", "1", "-1", "2", "0.5", "-0.0", "1e-300", "1e400", "nan", "inf", "-inf",
          "10000000", "99999999999999999999999", "1" + "0" * 5000, "[]", "[0]", "[-1]", "[1, 2]",
          "[[1]]", '"x"', '""', '"auto"', '"cuda:7"', '"min"', '"max"', '"none"', "true",
          "false", "{}", "{a = 1}", "1979-05-27", '"\\u00e9t\\u00e9"', "[" * 200 + "]" * 200,
          "'", '"', "=", "x y", '"a:b"', '"os:system"', '"no_such_module:f"', "1_000",
          "0x10", "+5", "1e3"]  # fmt: skip
#: Keys that are not in the schema, or not where they are given.
BAD_KEYS = ["nope", "optimizer.nope", "epochs.x", "", ".", "a..b", "model.hidden.0", "é",
            "data", "[data]", "ablation.seeds", "model..kind", "x" * 300]  # fmt: skip


def schema_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the config schema (sections recursed)."""
    keys = []
    for name, info in model.model_fields.items():
        inner = [a for a in typing.get_args(info.annotation) or (info.annotation,)]
        sections = [a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)]
        if sections:
            keys += schema_keys(sections[0], f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


#: Values that are valid but would make one case slow (not a defect): kept small.
SLOW = {"epochs", "data.num_workers", "ensemble.members", "distributed.timeout_s", "compile"}


def set_case(rng: random.Random, keys: list[str]) -> tuple[str, list[str]]:
    """One random ``--set key=value`` on the base config (one problem: at most two lines)."""
    sets = []
    for _ in range(1):
        key = rng.choice(BAD_KEYS) if rng.random() < 0.15 else rng.choice(keys)
        value = rng.choice(VALUES)
        if key in SLOW and value not in ("0", "-1", "99999999999999999999999", "1" + "0" * 5000):
            value = rng.choice(["1", "-1", "0", "nan", '"x"', "[]"])
        sets.append("=".join([key, value]) if rng.random() > 0.05 else key)
    return BASE, [f"--set={s}" for s in sets]


def file_case(rng: random.Random, keys: list[str]) -> tuple[str, list[str]]:
    """The base config with one line added, removed or garbled."""
    lines = BASE.splitlines()
    for _ in range(1):
        kind, where = rng.randrange(5), rng.randrange(len(lines) + 1)
        if kind in (0, 3):  # at the end: a table would otherwise capture the keys after it
            where = len(lines)
        if kind == 0:
            section, _, key = rng.choice(keys).rpartition(".")
            lines.insert(where, f"[{section}]" if section else "")
            lines.insert(where + 1, f"{key} = {rng.choice(VALUES)}")
        elif kind == 1 and lines:
            del lines[min(where, len(lines) - 1)]
        elif kind == 2 and lines:
            line = lines[min(where, len(lines) - 1)]
            cut = rng.randrange(len(line) + 1)
            lines[min(where, len(lines) - 1)] = (
                line[:cut] + rng.choice("[]=\"'{}\\#\x00é") + line[cut:]
            )
        elif kind == 3:
            lines.insert(where, rng.choice(["[data]", "[model]", "[[x]]", "[a.b.c]", "x = 1"]))
        else:
            lines.insert(where, "# " + "".join(chr(rng.randrange(1, 0x3000)) for _ in range(8)))
    return "\n".join(lines) + "\n", []


#: Data files a user can point ``data.source`` at, each with one thing wrong (or nothing).
DATA = {
    "fine.csv": "a,b,y\n" + "".join(f"{i % 7},{i % 3},{i % 2}\n" for i in range(80)),
    "ragged.csv": "a,b,y\n1,2,0\n3,1\n" + "1,2,1\n" * 60,
    "text.csv": "a,b,y\n" + "x,1,0\n" * 60,
    "blank.csv": "a,b,y\n" + "1,,0\n" * 60,
    "nan.csv": "a,b,y\n" + "nan,1,0\ninf,2,1\n" * 30,
    "header.csv": "a,b,y\n",
    "empty.csv": "",
    "one_class.csv": "a,b,y\n" + "1,2,0\n" * 60,
    "continuous.csv": "a,b,y\n" + "".join(f"{i},{i % 3},{i / 7:.4f}\n" for i in range(80)),
    "huge.csv": "a,b,y\n" + "1e400,1,0\n2,3,1\n" * 30,
    "not_csv.csv": "\x00\x01\x02 binary",
    "bom.csv": "\ufeffa,b,y\n" + "1,2,0\n2,1,1\n" * 30,
    "labels.csv": "a,b,y\n" + "1,2,cat\n2,1,dog\n" * 30,
    "negative.csv": "a,b,y\n" + "1,2,-1\n2,1,1\n" * 30,
}
TARGETS = ["y", "a", "nope", "", "Y"]


def data_case(rng: random.Random) -> tuple[str, list[str]]:
    """The base config pointed at one of :data:`DATA` (written next to the config)."""
    name, target = rng.choice(sorted(DATA)), rng.choice(TARGETS)
    kind = rng.choice(["classification", "regression"])
    data = f'source = "{name}"\ntarget = "{target}"'
    text = BASE.replace('source = "digits"\ntrain_size = 64', data)
    return text + f'[task]\nkind = "{kind}"\n', []


def cases(n_set: int = 160, n_file: int = 90, n_data: int = 40) -> list[tuple[str, list[str]]]:
    rng, keys = random.Random(SEED), [k for k in schema_keys() if k not in ("device",)]
    keys.append("device")
    return (
        [set_case(rng, keys) for _ in range(n_set)]
        + [file_case(rng, keys) for _ in range(n_file)]
        + [data_case(rng) for _ in range(n_data)]
    )


CASES = cases()


def test_the_fuzz_covers_at_least_200_cases():
    assert len(CASES) >= 250 and len(set(map(str, CASES))) >= 200


@pytest.mark.parametrize("chunk", range(4))
def test_every_fuzzed_input_exits_cleanly(tmp_path, monkeypatch, chunk):
    monkeypatch.chdir(tmp_path)
    for name, text in DATA.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    failures = []
    for index in range(chunk, len(CASES), 4):
        text, sets = CASES[index]
        path = tmp_path / f"case{index}.toml"
        path.write_text(text, encoding="utf-8")
        started = time.perf_counter()
        result = runner.invoke(app, ["run", str(path), "-q", "--out", f"out{index}", *sets])
        seconds = time.perf_counter() - started
        text_out = result.output
        errors = [line for line in text_out.splitlines() if line.startswith("trainwell: error:")]
        ok = result.exit_code == 0 or (result.exit_code in (1, 2) and 1 <= len(errors) <= 2)
        if (
            not ok
            or "Traceback" in text_out
            or seconds > 30
            or isinstance(result.exception, Exception)
            and not isinstance(result.exception, SystemExit)
        ):
            failures.append((index, sets, result.exit_code, seconds, text_out[-400:]))
    assert not failures, failures[:5]
