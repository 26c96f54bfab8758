"""The example configs shipped in the package, written out by ``trainwell init NAME``.

The examples live in ``trainwell/examples/`` (the repository's ``examples/`` points there):
``NAME.toml``, plus ``NAME.py`` when the config's model or data comes from code next to
it. Writing one never replaces a file that exists unless asked to.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

DEFAULT = "sequence_cnn"


def _folder():  # a Traversable: the package's examples folder, installed or editable
    return files("trainwell") / "examples"


def available() -> dict[str, str]:
    """``{name: its first comment line}`` for every shipped example, sorted by name."""
    out = {}
    for entry in sorted(_folder().iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            first = entry.read_text(encoding="utf-8").splitlines()[0]
            out[entry.name[: -len(".toml")]] = first.lstrip("# ").strip()
    return out


def write_example(name: str, directory: Path, *, force: bool = False) -> list[Path]:
    """Write example ``name`` (its ``.toml`` and its ``.py``, if any) into ``directory``.

    Returns the files written. Raises ``ValueError`` for an unknown name (listing the
    known ones) or when a file would be replaced and ``force`` is False.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     [p.name for p in write_example("sequence_cnn", Path(d))]
        ['sequence_cnn.toml', 'sequence_cnn.py']
    """
    known = available()
    if name not in known:
        raise ValueError(f"NAME must be one of {', '.join(known)}; got {name!r}")
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"--dir {directory} is a file: give a folder to write the example in")
    sources = [_folder() / f"{name}.toml", _folder() / f"{name}.py"]
    sources = [s for s in sources if s.is_file()]
    targets = [directory / s.name for s in sources]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not force:
        raise ValueError(
            f"{', '.join(existing)} already there: choose another --dir or pass --force"
        )
    directory.mkdir(parents=True, exist_ok=True)
    from trainwell.checkpoints.atomic import atomic_write

    for source, target in zip(sources, targets, strict=True):
        data = source.read_bytes()
        atomic_write(target, lambda file, data=data: file.write(data))
    return targets
