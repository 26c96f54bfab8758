"""The failed runs of a study: their one-line errors, ``failures.txt``, and the summary line.

A run that raises is stored as failed with one line (:func:`error_line`: the exception's
type and the first line of its message, never a traceback) and the study goes on. When
the study ends, :func:`failure_summary` writes ``failures.txt`` into the study's
directory (one block per failed run: variant, data size, seed, error) and returns the
line to tell the user; a study with no failures left removes an old ``failures.txt``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainwell.study.store import Store

MAX_CHARS = 500  # of a stored error line; torch appends C++ stacks to its messages
FILE_NAME = "failures.txt"


@dataclass(frozen=True)
class FailedRun:
    """One failed run of a study and its one-line error."""

    variant: str
    data: str
    seed: int
    error: str


def one_line(text: str) -> str:
    """The line that says what went wrong: a traceback's last line, else the first line.

    Example:
        >>> one_line("Traceback (most recent call last):\\n  File ...\\nValueError: bad lr")
        'ValueError: bad lr'
        >>> one_line("RuntimeError: shapes differ\\nException raised from mm at ...")
        'RuntimeError: shapes differ'
    """
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    if not lines:
        return "failed"
    line = lines[-1] if lines[0].startswith("Traceback (most recent call last)") else lines[0]
    return line if len(line) <= MAX_CHARS else line[: MAX_CHARS - 3] + "..."


def error_line(err: BaseException) -> str:
    """What a failed run stores: ``"TypeName: message"`` in one line.

    A message of several lines that each name a problem (a ``ConfigError``) is joined
    with ``"; "``; of any other message only the first line is kept.

    Example:
        >>> error_line(FloatingPointError("training diverged"))
        'FloatingPointError: training diverged'
    """
    from trainwell.app.config import ConfigError

    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if isinstance(err, ConfigError):
        lines = ["; ".join(lines)] if lines else []
    if not lines:
        return type(err).__name__
    return one_line(f"{type(err).__name__}: {lines[0]}")


def failed_runs(store: Store, study_id: int) -> list[FailedRun]:
    """The failed runs of a study in plan order, each with its one-line error."""
    return [
        FailedRun(r["variant"], r["data"], int(r["seed"]), one_line(r["error"] or "failed"))
        for r in store.failed(study_id)
    ]


def write_failures(out_dir: str | Path, failed: list[FailedRun], total: int) -> Path:
    """Write ``out_dir/failures.txt``: one block per failed run; its path."""
    lines = [f"# {len(failed)} of {total} runs failed; rerun with --retry-failed to train them"]
    lines.append("# again (retry_failed=True in Python) once the cause is fixed.")
    for run in failed:
        lines += ["", f"variant: {run.variant}", f"data:    {run.data}", f"seed:    {run.seed}"]
        lines.append(f"error:   {run.error}")
    path = Path(out_dir) / FILE_NAME
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def failure_summary(store: Store, study_id: int, out_dir: str | Path) -> str | None:
    """The line to tell the user when runs failed (after writing ``failures.txt``), or None.

    Example:
        >>> import tempfile
        >>> store = Store("sqlite://")
        >>> sid = store.study("demo", {})
        >>> ok, bad = (store.plan(sid, v, "all data", 0, i, {}, "{}") for i, v in enumerate("ab"))
        >>> store.fail(bad, "ValueError: lr must be positive")
        True
        >>> out = tempfile.mkdtemp()
        >>> failure_summary(store, sid, out).replace(out, "DIR")
        '1 of 2 runs failed; their messages are in DIR/failures.txt (rerun with --retry-failed)'
    """
    failed = failed_runs(store, study_id)
    path = Path(out_dir) / FILE_NAME
    if not failed:
        path.unlink(missing_ok=True)  # from an earlier attempt whose failures were retried
        return None
    total = sum(store.counts(study_id).values())
    path = write_failures(out_dir, failed, total)
    return (
        f"{len(failed)} of {total} runs failed; their messages are in {path} "
        "(rerun with --retry-failed)"
    )
