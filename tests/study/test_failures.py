"""Failed runs: one-line stored errors, failures.txt and the summary line."""

from __future__ import annotations

import pytest

from trainwell.app.config import ConfigError
from trainwell.study.failures import (
    MAX_CHARS,
    FailedRun,
    error_line,
    failed_runs,
    failure_summary,
    one_line,
)
from trainwell.study.store import Store


@pytest.mark.parametrize(
    ("err", "expected"),
    [
        (FloatingPointError("training diverged at epoch 3"),
         "FloatingPointError: training diverged at epoch 3"),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x2)\n"
                      "Exception raised from mm at aten/src/ATen/native/Linear.cpp:42\n"
                      "frame #0: c10::Error::Error(...)"),
         "RuntimeError: mat1 and mat2 shapes cannot be multiplied (4x3 and 5x2)"),
        (ConfigError("model.dropout: bad\nepochs: bad"),
         "ConfigError: model.dropout: bad; epochs: bad"),
        (KeyError("val_loss"), "KeyError: 'val_loss'"),
        (MemoryError(), "MemoryError"),
    ],
)  # fmt: skip
def test_a_failed_run_stores_one_line(err, expected):
    assert error_line(err) == expected


def test_long_messages_and_old_tracebacks_are_cut_to_one_line():
    assert len(error_line(ValueError("x" * 5000))) == MAX_CHARS
    traceback = 'Traceback (most recent call last):\n  File "a.py", line 1\nValueError: lr < 0\n'
    assert one_line(traceback) == "ValueError: lr < 0"
    assert one_line("") == "failed"


def test_failure_summary_writes_failures_txt_and_removes_a_stale_one(tmp_path):
    store = Store("sqlite://")
    sid = store.study("s", {})
    ids = [store.plan(sid, v, "all data", s, i, {}, "{}") for i, (v, s) in
           enumerate([("base", 0), ("l2=0.1", 0), ("base", 1), ("l2=0.1", 1)])]  # fmt: skip
    store.fail(ids[1], "FloatingPointError: training diverged")
    store.fail(ids[3], "Traceback (most recent call last):\n  ...\nValueError: old style")
    assert failed_runs(store, sid) == [
        FailedRun("l2=0.1", "all data", 0, "FloatingPointError: training diverged"),
        FailedRun("l2=0.1", "all data", 1, "ValueError: old style"),
    ]
    path = tmp_path / "failures.txt"
    assert failure_summary(store, sid, tmp_path) == (
        f"2 of 4 runs failed; their messages are in {path} (rerun with --retry-failed)"
    )
    blocks = path.read_text(encoding="utf-8").split("\n\n")
    assert blocks[0].startswith("# 2 of 4 runs failed")
    assert blocks[2].splitlines() == [
        "variant: l2=0.1", "data:    all data", "seed:    1", "error:   ValueError: old style"
    ]  # fmt: skip
    for run_id in ids:  # retried and finished
        store.start(run_id)
        store.finish(run_id, {"test": {"test_acc": 0.5}})
    assert failure_summary(store, sid, tmp_path) is None
    assert not path.exists()
