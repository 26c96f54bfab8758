"""Publishing a file atomically: a kill at any moment leaves the old complete file or the
new complete one, never a truncated one. Every checkpoint and run-directory file goes
through :func:`atomic_write`."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any


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
    Only a regular file (or nothing) is ever replaced: a device such as ``/dev/null``, a
    FIFO or a socket at ``path`` is refused with a ``ValueError`` (``os.replace`` would
    delete it and leave a regular file in its place).
    """
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():
        raise ValueError(
            f"{path} is not a regular file (a device, FIFO or socket); trainwell only replaces "
            "regular files: choose another path"
        )
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
