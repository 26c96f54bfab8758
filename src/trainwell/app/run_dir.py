"""A run directory belongs to one run: atomic files, its config in every checkpoint, ownership.

* Every file of a run directory is written atomically (a temporary file next to it, fsync,
  ``os.replace``; :func:`trainwell.checkpoints.atomic.atomic_write`): a kill mid-write
  leaves the previous complete file or none, never a truncated one.
* Every checkpoint carries the resolved config (TOML text) and its hash in its header, so
  ``trainwell resume`` continues with the config the checkpoint was trained with even when
  ``config.toml`` is damaged, and refuses checkpoints of another config.
* ``trainwell run`` refuses a directory that holds another run's files (a different config
  hash) unless ``--overwrite``, which removes them first: two runs' files are never mixed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from trainwell.app.config import ConfigError, RunConfig, validate
from trainwell.app.config_files import load_config, to_toml
from trainwell.checkpoints import CheckpointError, CheckpointManager, load, read_metadata
from trainwell.checkpoints.atomic import atomic_write

CONFIG_KEY = "trainwell_config"
HASH_KEY = "trainwell_config_hash"
#: Where ``[logging] mlflow`` keeps the run's MLflow run id (``resume`` continues that run).
MLFLOW_RUN_FILE = "mlflow_run.json"
#: What a run writes into its directory (removed by ``--overwrite``).
RUN_FILES = ("config.toml", "metrics.csv", "grad_norms.csv", "model.safetensors",
             "summary.json", "curves.png", "ensemble_members.csv", "ensemble.json",
             "reliability.png", MLFLOW_RUN_FILE)  # fmt: skip
RUN_DIRS = ("checkpoints", "members", "tensorboard")
#: Sections that decide nothing a run trains: left out of its config hash.
UNTRAINED = {"distributed", "logging"}


def config_hash(config: RunConfig) -> str:
    """A short hash of everything that decides what a run trains (the resolved config;
    not the timeouts of ``[distributed]`` nor where ``[logging]`` sends the metrics).

    Example:
        >>> from trainwell.app.config_files import load_config
        >>> a, b = load_config(None, ["epochs=3"]), load_config(None, ["epochs=4"])
        >>> same = load_config(None, ["epochs=3"])
        >>> config_hash(a) == config_hash(same), config_hash(a) == config_hash(b)
        (True, False)
    """
    trained = config.model_dump(mode="json", exclude=UNTRAINED)
    text = json.dumps(trained, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def checkpoint_header(config: RunConfig) -> dict[str, str]:
    """What every checkpoint of this run carries: the config as TOML and its hash."""
    return {CONFIG_KEY: to_toml(config), HASH_KEY: config_hash(config)}


def write_bytes(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Atomically write ``path`` through ``write(file)``."""
    atomic_write(path, write)


def write_text(path: Path, text: str) -> None:
    """Atomically write ``path`` with ``text`` (UTF-8)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _read_config(path: Path) -> RunConfig | None:
    """The config in ``path``, or None when it is missing, damaged or invalid."""
    try:
        return load_config(path)
    except (ConfigError, UnicodeDecodeError):
        return None


def _checkpoint_hashes(directory: Path) -> set[str]:
    found = set()
    for info in CheckpointManager(directory / "checkpoints").checkpoints():
        try:
            found.add(str(read_metadata(info.path).get(HASH_KEY)))
        except (CheckpointError, OSError):
            continue
    return found


def owner_hashes(directory: Path) -> set[str]:
    """The config hashes of the runs whose files are in ``directory`` (``"?"``: unreadable)."""
    hashes = _checkpoint_hashes(directory) if (directory / "checkpoints").is_dir() else set()
    if (directory / "config.toml").is_file():
        config = _read_config(directory / "config.toml")
        hashes.add(config_hash(config) if config is not None else "?")
    elif any((directory / name).exists() for name in RUN_FILES[1:]):
        hashes.add("?")
    return hashes


def claim(directory: Path, config: RunConfig, overwrite: bool = False) -> None:
    """Make ``directory`` this run's: refuse another run's files unless ``overwrite``."""
    theirs = owner_hashes(directory) - {config_hash(config)}
    if theirs and not overwrite:
        raise ValueError(
            f"--out {directory}: it holds another run's files (a different config); pass "
            "--overwrite to replace them, choose another --out, or `trainwell resume` it"
        )
    if theirs:
        for name in RUN_FILES:
            (directory / name).unlink(missing_ok=True)
        for name in RUN_DIRS:
            shutil.rmtree(directory / name, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True)


def newest_valid_checkpoint(directory: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that loads and verifies, and a line for each one skipped.

    Every ``ckpt-<step>.safetensors`` file counts, even one whose header is unreadable.
    """
    folder = directory / "checkpoints"
    files = sorted(folder.glob("ckpt-*.safetensors")) if folder.is_dir() else []
    skipped: list[str] = []
    for path in reversed(files):  # the step is zero-padded: name order is step order
        try:
            load(path)
        except (CheckpointError, OSError) as err:
            skipped.append(f"skipped corrupt {path.name} ({err})")
            continue
        return path, skipped
    return None, skipped


def config_of_checkpoint(path: Path) -> RunConfig | None:
    """The config a checkpoint was trained with (None for checkpoints without a usable one)."""
    text = read_metadata(path).get(CONFIG_KEY)
    if not isinstance(text, str):
        return None
    import tomllib

    try:
        return validate(tomllib.loads(text))
    except (tomllib.TOMLDecodeError, ConfigError, RecursionError):
        return None  # a damaged config in a header: resume falls back to config.toml
