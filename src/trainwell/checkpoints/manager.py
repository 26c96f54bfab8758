"""A run's checkpoint directory: rotating, crash-safe checkpoints (last k + best k).

The manager keeps no bookkeeping file: each checkpoint carries its step and metrics in its
own header (``read_metadata``), so the directory listing *is* the bookkeeping and survives
any crash. Rotation happens only after the new checkpoint is durably published, so at every
instant at least the previous complete checkpoint exists.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainwell.checkpoints.format import CheckpointError, read_metadata, save, verify
from trainwell.distributed import is_main_process

_SUFFIX = ".safetensors"


def _identity(path: Path) -> tuple[int, int]:
    """(size, mtime in ns): changes whenever the file is replaced or rewritten."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _metrics_of(meta: Mapping[str, Any]) -> dict[str, float]:
    """The numeric metrics in a checkpoint's header as floats (NaN kept); others are dropped.

    ``save`` writes floats only, so another value (a string, a list, an int too large for a
    float) comes from a damaged or hand-edited header: it is never ranked.
    """
    metrics = meta.get("metrics")
    if not isinstance(metrics, dict):
        return {}
    found = {}
    for name, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            with contextlib.suppress(OverflowError):
                found[name] = float(value)
    return found


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint on disk: its path, step and the metrics it was saved with."""

    path: Path
    step: int
    metrics: dict[str, float] = field(default_factory=dict)


class CheckpointManager:
    """Save checkpoints into ``directory`` and keep the last ``keep_last`` and best ``keep_best``.

    "Best" ranks checkpoints by ``metrics[monitor]`` (smaller is better for ``mode="min"``,
    ties go to the earlier step); a NaN/Inf or missing metric never ranks. Under
    ``torch.distributed`` only rank 0 writes or deletes; every rank gets the same path back.
    The directory must be shared by the ranks (or only rank 0 reads it back).

    Args:
        directory: where the checkpoints live (created on first save).
        keep_last: how many of the most recent checkpoints to keep (>= 1).
        keep_best: how many of the best checkpoints to keep as well (>= 0).
        monitor: the metric that ranks checkpoints for ``keep_best`` / ``best()``.
        mode: ``"min"`` or ``"max"``: which direction of ``monitor`` is better.
        prefix: file names are ``{prefix}-{step:08d}.safetensors``.
        header: JSON data (str keys) written into every checkpoint's header beside ``step`` and
            ``metrics``, read back with ``read_metadata`` (a run's config and its hash).

    Example:
        >>> import tempfile, torch
        >>> m = CheckpointManager(tempfile.mkdtemp(), keep_last=1, keep_best=1)
        >>> for step, loss in enumerate([0.9, 0.5, 0.7, 0.8]):
        ...     _ = m.save({"w": torch.full((2,), float(step))}, step, {"val_loss": loss})
        >>> [c.step for c in m.checkpoints()], m.latest().name, m.best().name
        ([1, 3], 'ckpt-00000003.safetensors', 'ckpt-00000001.safetensors')
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        keep_last: int = 2,
        keep_best: int = 1,
        monitor: str = "val_loss",
        mode: str = "min",
        prefix: str = "ckpt",
        header: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an integer >= 1, got {keep_last!r}")
        if isinstance(keep_best, bool) or not isinstance(keep_best, int) or keep_best < 0:
            raise ValueError(f"keep_best must be an integer >= 0, got {keep_best!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(f"monitor must be a metric name (a non-empty str), got {monitor!r}")
        if not re.fullmatch(r"[A-Za-z0-9_.]+", prefix):
            raise ValueError(f"prefix must use letters, digits, '_' or '.', got {prefix!r}")
        self.directory = Path(directory)
        self.keep_last, self.keep_best = keep_last, keep_best
        self.monitor, self.mode, self.prefix = monitor, mode, prefix
        #: JSON data written into every checkpoint's header (e.g. the run's config and hash)
        self.header: dict[str, Any] = dict(header or {})
        self._pattern = re.compile(rf"{re.escape(prefix)}-(\d+){re.escape(_SUFFIX)}")
        #: files known to verify, by (size, mtime): each is read in full at most once
        self._verified: dict[Path, tuple[int, int]] = {}
        if is_main_process():
            self._remove_stale_temporaries()

    def path_for(self, step: int) -> Path:
        """The file that holds the checkpoint of ``step``."""
        return self.directory / f"{self.prefix}-{step:08d}{_SUFFIX}"

    def save(self, state: Any, step: int, metrics: Mapping[str, Any] | None = None) -> Path:
        """Atomically write ``state`` as the checkpoint of ``step``, then rotate old ones.

        ``metrics`` (numbers) are stored in the header so ``best()`` and the rotation can
        rank checkpoints after a crash without loading them. Returns the checkpoint path
        (on every rank; only rank 0 writes).
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        path = self.path_for(step)
        if not is_main_process():
            return path
        numbers = {}
        for k, v in (metrics or {}).items():
            with contextlib.suppress(TypeError, ValueError):
                numbers[str(k)] = float(v)  # non-numeric entries are not ranked
        save(path, state, metadata={**self.header, "step": step, "metrics": numbers})
        self._verified[path] = _identity(path)  # written from memory just now: complete
        self._rotate(keep=path)
        return path

    def _valid(self, path: Path) -> bool:
        """Whether ``path`` verifies (remembered while the file is unchanged)."""
        with contextlib.suppress(OSError):
            if self._verified.get(path) == _identity(path):
                return True
        ok = verify(path)
        if ok:
            with contextlib.suppress(OSError):
                self._verified[path] = _identity(path)
        return ok

    def checkpoints(self) -> list[CheckpointInfo]:
        """Checkpoints whose header is readable, oldest step first (recovered by a scan)."""
        found = []
        if not self.directory.is_dir():
            return found
        for entry in self.directory.iterdir():
            match = self._pattern.fullmatch(entry.name)
            if match is None:
                continue
            try:
                meta = read_metadata(entry)
            except (CheckpointError, OSError):
                continue  # unreadable: never ranked, never deleted (kept for inspection)
            found.append(CheckpointInfo(entry, int(match.group(1)), _metrics_of(meta)))
        return sorted(found, key=lambda c: c.step)

    def _ranked(self, infos: list[CheckpointInfo]) -> list[CheckpointInfo]:
        """Checkpoints with a finite monitored metric, best first (earlier step wins ties)."""
        sign = 1.0 if self.mode == "min" else -1.0
        scored = [
            c
            for c in infos
            if isinstance(c.metrics.get(self.monitor), (int, float))
            and math.isfinite(c.metrics[self.monitor])
        ]
        return sorted(scored, key=lambda c: (sign * c.metrics[self.monitor], c.step))

    def latest(self) -> Path | None:
        """The newest checkpoint that passes ``verify``; falls back to older ones."""
        for info in reversed(self.checkpoints()):
            if self._valid(info.path):
                return info.path
        return None

    def best(self) -> Path | None:
        """The best checkpoint by ``monitor`` that passes ``verify`` (None if none ranks)."""
        for info in self._ranked(self.checkpoints()):
            if self._valid(info.path):
                return info.path
        return None

    def _rotate(self, keep: Path) -> None:
        """Delete what ``keep_last`` / ``keep_best`` do not keep, counting only checkpoints
        that verify: a corrupt file never takes the place of a good one (and is itself
        kept for inspection, never deleted)."""
        valid = [c for c in self.checkpoints() if c.path == keep or self._valid(c.path)]
        wanted = {c.path for c in valid[-self.keep_last :]}
        wanted |= {c.path for c in self._ranked(valid)[: self.keep_best]}
        wanted.add(keep)
        for info in valid:
            if info.path not in wanted:
                self._verified.pop(info.path, None)
                with contextlib.suppress(FileNotFoundError):
                    info.path.unlink()

    def _remove_stale_temporaries(self) -> None:
        """Delete temporary files left by a crash during a save (never a published file)."""
        if not self.directory.is_dir():
            return
        for entry in self.directory.iterdir():
            name = entry.name
            if name.startswith(f".{self.prefix}-") and name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    entry.unlink()
