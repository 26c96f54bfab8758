"""Reading a data source into arrays: the embedded datasets, a CSV file or an NPZ file.

Every problem with a file is one ``ValueError`` line naming the file and what is wrong
(unreadable, not UTF-8, ragged rows, text in feature columns, no ``X`` / ``y``, complex or
object arrays, NaN / Inf features): :func:`read_source` never lets a library's
multi-kilobyte message or a pickle through.
"""

from __future__ import annotations

import csv
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn import datasets as skdatasets

EMBEDDED = {
    "digits": skdatasets.load_digits,
    "breast_cancer": skdatasets.load_breast_cancer,
    "wine": skdatasets.load_wine,
    "diabetes": skdatasets.load_diabetes,
}


def load_arrays(source: str, target: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """Features, labels and a display name from an embedded name, a CSV or an NPZ path.

    Args:
        source: ``"digits"``, ``"breast_cancer"``, ``"wine"``, or a path to a ``.csv``
            (needs ``target``: the label column) or ``.npz`` (arrays ``X`` and ``y``).
        target: the label column of a CSV file.

    Raises:
        ValueError: one line naming the file and what is wrong with it (unreadable, not a
            CSV / NPZ, features that are not real numbers, ...).
    """
    found = read_source(source, target)
    return found.x, found.y, found.name


@dataclass
class Source:
    """What a data source holds, with the names its messages use."""

    x: np.ndarray
    y: np.ndarray
    name: str
    features: list[str] | None = None  # CSV column names of x (None: 0-based indices)
    label: str = "the target"  # how messages name y
    where: str = "data"  # how messages name the source


def read_source(source: str, target: str | None) -> Source:
    if source in EMBEDDED:
        bunch = EMBEDDED[source]()
        names = [str(n) for n in getattr(bunch, "feature_names", [])] or None
        return Source(np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target),
                       source, names)  # fmt: skip
    path = Path(source)
    if path.suffix.lower() not in {".csv", ".npz"}:
        raise ValueError(
            f"data.source {cut_text(source)!r} is neither an embedded dataset "
            f"({', '.join(EMBEDDED)}) nor a .csv or .npz file"
        )
    if path.is_dir():
        raise ValueError(f"data.source {cut_text(source)!r} is a directory; expected a file")
    if not path.is_file():
        raise ValueError(f"data.source: file {cut_text(source)!r} does not exist")
    try:
        if path.suffix.lower() == ".npz":
            x, y = _read_npz(path)
            return Source(x, y, path.stem, None, "array 'y'", f"data.source {path.name}")
        x, y, features = _read_csv(path, target)
        label = f"the target column {show_value(target)}"
        return Source(x, y, path.stem, features, label, f"data.source {path.name}")
    except OSError as err:
        raise ValueError(
            f"data.source {path.name}: cannot be read ({err.strerror or first_line(err)})"
        ) from None


def first_line(err: BaseException, limit: int = 100) -> str:
    """A library's message cut to its first line and ``limit`` characters."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return cut_text(text, limit)


def cut_text(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def plural_rows(n: int) -> str:
    return f"{n} row{'s' * (n != 1)}"


def show_value(value: Any, limit: int = 40) -> str:
    """``repr(value)``, cut for a one-line message."""
    return cut_text(repr(value), limit)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``X`` (float64; real numbers only) and ``y`` of an ``.npz`` archive; never unpickles."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, zipfile.BadZipFile):  # not zip, not .npy: numpy tries pickle
        raise ValueError(
            f"data.source {path.name}: not a NumPy .npz archive; write one with "
            "np.savez(path, X=X, y=y)"
        ) from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(
            f"data.source {path.name}: holds a single array (a .npy file), not an .npz archive "
            "with arrays 'X' and 'y'; write one with np.savez(path, X=X, y=y)"
        )
    with loaded as arrays:
        missing = {"X", "y"} - set(arrays.files)
        if missing:
            raise ValueError(
                f"data.source {path.name} must hold arrays 'X' and 'y'; missing "
                f"{sorted(missing)} (it holds {cut_text(str(sorted(arrays.files)), 60)})"
            )
        x, y = (_npz_array(arrays, key, path.name) for key in ("X", "y"))
    if x.dtype.kind not in "biuf":
        what = "complex numbers" if x.dtype.kind == "c" else f"dtype {x.dtype}"
        raise ValueError(
            f"data.source {path.name}: array 'X' holds {what}; features must be real "
            "numbers (bool, integer or float)"
        )
    return x.astype(np.float64), y


def _npz_array(arrays: Any, key: str, name: str) -> np.ndarray:
    try:
        return np.asarray(arrays[key])
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise ValueError(
                f"data.source {name}: array {key!r} holds Python objects (dtype object), "
                "which trainwell never unpickles; store numbers (or text labels in y)"
            ) from None
        raise ValueError(f"data.source {name}: array {key!r}: {first_line(err)}") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise ValueError(
            f"data.source {name}: array {key!r} cannot be read; the archive is damaged "
            f"({first_line(err, 60)})"
        ) from None


def _read_csv(path: Path, target: str | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features (float64), labels and feature column names of a CSV with a header line.

    No cell may be empty; the file must be UTF-8 text (a BOM is fine).

    Read with the ``csv`` module, so quoted fields work and a missing cell is seen as
    missing in every column (``np.genfromtxt`` fills an integer column's gap with -1).
    Lines are the file's lines: line 1 is the header, line 2 the first data row.
    """
    if not target:
        raise ValueError("data.target is required for a CSV file: the name of the label column")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        try:
            header, rows = _csv_rows(path, reader)
        except UnicodeDecodeError:
            raise ValueError(f"data.source {path.name}: {_not_utf8(path)}") from None
        except csv.Error as err:
            raise ValueError(
                f"data.source {path.name}: line {reader.line_num}: {first_line(err)}"
            ) from None
    return _csv_arrays(path, target, header, rows)


def _not_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        return f"not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); save it as UTF-8"
    return "not UTF-8 text; save it as UTF-8"


def _csv_rows(path: Path, reader: Any) -> tuple[list[str], list[list[str]]]:
    """The header and the (stripped, complete) data rows of a CSV reader."""
    header = [name.strip() for name in next(reader, [])]
    if not header:
        raise ValueError(f"data.source {path.name}: the file is empty; need a header line")
    for i, name in enumerate(header):
        if not name:
            raise ValueError(f"data.source {path.name}: column {i + 1} of the header has no name")
        if header.index(name) != i:
            raise ValueError(f"data.source {path.name}: column {show_value(name)} appears twice")
    rows: list[list[str]] = []
    for row in reader:
        if not row:  # a blank line
            continue
        if len(row) > len(header):
            raise ValueError(
                f"data.source {path.name}: line {reader.line_num} has {len(row)} cells, "
                f"the header {len(header)}"
            )
        cells = [cell.strip() for cell in row] + [""] * (len(header) - len(row))
        empty = next((j for j, cell in enumerate(cells) if not cell), None)
        if empty is not None:
            raise ValueError(
                f"data.source {path.name}: column {show_value(header[empty])} has an empty cell at "
                f"line {reader.line_num} of the file (data row {len(rows) + 1}; the first "
                "one); fill or drop missing values first"
            )
        rows.append(cells)
    return header, rows


def _csv_arrays(
    path: Path, target: str, header: list[str], rows: list[list[str]]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if target not in header:
        raise ValueError(
            f"data.target {show_value(target)} is not a column of {path.name}; columns: "
            f"{cut_text(str(header), 100)}"
        )
    if not rows:
        raise ValueError(f"data.source {path.name}: the file has a header but no data rows")
    columns = {name: [row[j] for row in rows] for j, name in enumerate(header)}
    features = [c for c in header if c != target]
    if not features:
        raise ValueError(f"data.source {path.name}: no feature column besides {target!r}")
    x = np.empty((len(rows), len(features)), dtype=np.float64)
    for j, name in enumerate(features):
        try:
            x[:, j] = [float(cell) for cell in columns[name]]
        except ValueError:
            bad = next(i for i, cell in enumerate(columns[name]) if not _is_float(cell))
            raise ValueError(
                f"data.source {path.name}: every feature column must be numeric; column "
                f"{show_value(name)} holds {show_value(columns[name][bad])} (data row {bad + 1})"
            ) from None
    return x, _typed(columns[target]), features


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _typed(cells: list[str]) -> np.ndarray:
    """A label column as int64 when every cell is an integer, else float64, else text."""
    for kind in (int, float):
        try:
            return np.asarray([kind(cell) for cell in cells])
        except (ValueError, OverflowError):
            continue
    return np.asarray(cells)


def check_shapes(found: Source) -> None:
    """X of shape (rows, features) with rows >= 1, and one target per row."""
    x, y, where = found.x, found.y, found.where
    if y.ndim == 0:
        raise ValueError(f"{where}: {found.label} is a single value; need one target per row")
    if x.ndim != 2:
        raise ValueError(
            f"{where}: X has shape {tuple(x.shape)}; features must be 2-D (rows, features)"
        )
    if len(x) != len(y):
        raise ValueError(
            f"{where}: X has {len(x)} rows but {found.label} {len(y)}; need one target per row"
        )
    if len(x) == 0 or x.shape[1] == 0:
        raise ValueError(
            f"{where}: no data (X has shape {tuple(x.shape)}); need rows and feature columns"
        )


def check_finite_input(found: Source) -> None:
    """Refuse NaN / Inf features, naming the columns (a NaN loss later is worse)."""
    broken = ~np.isfinite(found.x)
    if not broken.any():
        return
    rows = int(broken.any(axis=1).sum())
    columns = np.flatnonzero(broken.any(axis=0))
    if found.features is not None:
        named = [found.features[j] for j in columns[:5]]
        shown = f"columns {cut_text(str(named), 80)}"
    else:
        shown = f"feature columns {cut_text(str(columns[:8].tolist()), 60)} (0-based) of X"
    more = (
        f" and {len(columns) - 5} more" if found.features is not None and len(columns) > 5 else ""
    )
    raise ValueError(
        f"{found.where}: {plural_rows(rows)} of features hold NaN or Inf, in {shown}{more}; "
        "clean or impute them first"
    )
