"""Reading a run config: TOML files, ``--set`` overrides, relative paths made absolute,
and writing the resolved config back as TOML. The schema and its one-line-per-problem
errors are :mod:`trainwell.app.config`."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import tomli_w
import tomllib
from pydantic import BaseModel

from trainwell.app.config import (
    NAMED_STORES,
    TARGET_KEYS,
    ConfigError,
    RunConfig,
    cut_text,
    short_value,
    validate,
)
from trainwell.app.entry_points import absolute_target


def _toml_problem(err: Exception) -> str:
    """What went wrong when tomllib could not read a text: one short phrase."""
    if isinstance(err, RecursionError):
        return "arrays or tables nested too deeply"
    digits = re.search(r"value has (\d+) digits", str(err))
    if digits:
        return (
            f"an integer with {digits.group(1)} digits, more than Python reads "
            f"({sys.get_int_max_str_digits()}); no setting takes such a number"
        )
    return cut_text(str(err).splitlines()[0] if str(err) else type(err).__name__, 120)


def parse_value(text: str) -> Any:
    """A ``--set`` value: TOML syntax when it parses (1e-3, true, [1, 2], "x"), else a string.

    A value TOML cannot hold at all (an integer of thousands of digits, thousands of nested
    brackets) is a ``ConfigError``.

    Example:
        >>> parse_value("1e-3"), parse_value("[64, 64]"), parse_value("adamw"), parse_value("inf")
        (0.001, [64, 64], 'adamw', inf)
    """
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    except (ValueError, RecursionError) as err:
        raise ConfigError(f"value {short_value(text, 40)}: {_toml_problem(err)}") from None
    # a line break could smuggle in more keys ("1\nepochs = 5"): then it is just text
    return parsed["v"] if list(parsed) == ["v"] else text


def _field_kind(model: type[BaseModel] | None, name: str) -> type[BaseModel] | str:
    """A section's field: its sub-section, ``"table"`` (a free dict), ``"value"`` or
    ``"unknown"`` (left to validation, which lists the accepted keys)."""
    if model is None:
        return "table"
    field = model.model_fields.get(name)
    if field is None:
        return "unknown"
    annotation = field.annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = getattr(annotation, "__origin__", None)
    return "table" if annotation is Any or origin is dict else "value"


def set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``raw["a"]["b"] = value`` for ``dotted == "a.b"``, creating tables as needed.

    A part that the schema knows as a plain value (``epochs.x``) or an empty part
    (``a..b``) is a ``ConfigError``.
    """
    *parents, leaf = dotted.split(".")
    if not all(part.strip() for part in [*parents, leaf]):
        raise ConfigError(f"{cut_text(dotted)}: empty key part; expected section.key=value")
    node: dict[str, Any] = raw
    model: type[BaseModel] | None = RunConfig
    for i, part in enumerate(parents):
        kind = _field_kind(model, part)
        if kind == "value":
            where = ".".join(parents[: i + 1])
            raise ConfigError(
                f"{cut_text(dotted)}: {where!r} is a value, not a section; set {where}=<value>"
            )
        model = kind if isinstance(kind, type) else None
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{cut_text(dotted)}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (or a dict of dotted keys) to a raw config dict."""
    pairs: list[tuple[str, Any]] = []
    if isinstance(overrides, dict):
        pairs = list(overrides.items())
    else:
        for item in overrides:
            key, sep, text = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"--set {short_value(item)}: expected section.key=value")
            try:
                pairs.append((key.strip(), parse_value(text.strip())))
            except ConfigError as err:
                raise ConfigError(f"--set {cut_text(key.strip())}: {err}") from None
    for key, value in pairs:
        set_path(raw, key, value)
    return raw


def read_toml(path: str | Path) -> dict[str, Any]:
    """The raw dict of a TOML config file, with a one-line error when it is unreadable.

    An empty file is a valid config (every default), as TOML has it.
    """
    path = Path(path)
    shown = cut_text(str(path))
    if path.is_dir():
        raise ConfigError(f"config file {shown!r} is a directory; expected a .toml file")
    if not path.is_file():
        raise ConfigError(f"config file {shown!r} does not exist")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"config file {shown!r} cannot be read: {err.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"config file {path.name}: not UTF-8 text (byte 0x{data[err.start]:02x} on line "
            f"{line}); TOML files are UTF-8"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(
            f"config file {path.name}: not valid TOML ({_toml_problem(err)})"
        ) from None
    except (ValueError, RecursionError) as err:
        raise ConfigError(
            f"config file {path.name}: not usable TOML ({_toml_problem(err)})"
        ) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML file (or the defaults when ``path`` is None) and apply ``--set`` overrides.

    Example:
        >>> load_config(None, ["optimizer.lr=0.01", "epochs=3"]).optimizer.lr
        0.01
    """
    raw = read_toml(path) if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    base = Path(path).resolve().parent if path is not None else Path.cwd()
    return validate(absolute_targets(raw, base))


def absolute_targets(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """``raw`` with every relative ``file.py:name`` target made absolute against ``base``.

    So a run directory's ``config.toml`` (and a study's stored configs) still find the
    user's files after the run moved away from the config that named them.

    The ``[logging]`` locations are made absolute too, against the current directory
    (:func:`absolute_locations`).

    Example:
        >>> absolute_targets({"model": {"target": "net.py:Net"}}, Path("/exp"))["model"]
        {'target': '/exp/net.py:Net'}
    """
    absolute_locations(raw)
    for dotted in TARGET_KEYS:
        section, _, key = dotted.partition(".")
        table = raw.get(section)
        if not isinstance(table, dict) or key not in table:
            continue
        value = table[key]
        if isinstance(value, str) and ":" in value:
            table[key] = absolute_target(value, base)
        elif isinstance(value, list):
            table[key] = [
                absolute_target(v, base) if isinstance(v, str) and ":" in v else v for v in value
            ]
    return raw


def absolute_locations(raw: dict[str, Any], base: Path | None = None) -> dict[str, Any]:
    """``raw`` with ``logging.tensorboard`` (a folder) and a local ``logging.mlflow`` store
    (``file:``, ``sqlite:///`` or a plain path) made absolute against ``base`` (default:
    the current directory, where MLflow itself resolves them); other URIs are left alone.

    Example:
        >>> raw = {"logging": {"mlflow": "file:./mlruns", "tensorboard": "tb"}}
        >>> absolute_locations(raw, Path("/exp"))["logging"]
        {'mlflow': 'file:///exp/mlruns', 'tensorboard': '/exp/tb'}
        >>> absolute_locations({"logging": {"mlflow": "sqlite:///m.db"}}, Path("/exp"))
        {'logging': {'mlflow': 'sqlite:////exp/m.db'}}
    """
    table = raw.get("logging")
    if not isinstance(table, dict):
        return raw
    base = base or Path.cwd()
    folder = table.get("tensorboard")
    if isinstance(folder, str) and folder.strip():
        table["tensorboard"] = str(base / Path(folder).expanduser())
    uri = table.get("mlflow")
    if isinstance(uri, str) and uri.strip():
        table["mlflow"] = _absolute_uri(uri.strip(), base)
    return raw


def _absolute_uri(uri: str, base: Path) -> str:
    """A local MLflow store's URI with an absolute path (``base / path``)."""
    if uri.startswith("file:") and not uri.startswith("file://"):
        return (base / Path(uri[5:]).expanduser()).as_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{base / Path(uri[10:]).expanduser()}"
    if ":" not in uri and not NAMED_STORES.fullmatch(uri):
        return str(base / Path(uri).expanduser())
    return uri


def to_toml(config: RunConfig) -> str:
    """The resolved config as TOML text (for the run directory; unset options are left out)."""
    return tomli_w.dumps(config.model_dump(mode="python", exclude_none=True))
