"""Datasets: embedded ones that need no download, and the user's own CSV / NPZ files.

Every dataset is split the same way: a seeded, stratified train/val/test split,
feature scaling fitted on the training split only (no leakage), and an optional
``train_fraction`` / ``train_size`` that keeps only part of the training split
(stratified too) to make small-data, overfitting-prone settings on purpose.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn import datasets as skdatasets
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

EMBEDDED = {
    "digits": skdatasets.load_digits,
    "breast_cancer": skdatasets.load_breast_cancer,
    "wine": skdatasets.load_wine,
    "diabetes": skdatasets.load_diabetes,
}


class EpochShuffleSampler(Sampler[int]):
    """Shuffles with a permutation that depends only on ``(seed, epoch)``.

    ``fit()`` calls ``set_epoch`` before each epoch (as for ``DistributedSampler``),
    so a run resumed at epoch k sees exactly the batches an uninterrupted run saw.
    With ``world_size > 1`` each rank keeps every ``world_size``-th index of the
    shared permutation, starting at ``rank`` (padded by wrapping around so every
    rank gets ``ceil(n / world_size)`` indices, like ``DistributedSampler``): batch j
    of every rank together is batch j of a single process with ``world_size`` times
    the batch size.

    Example:
        >>> a, b = EpochShuffleSampler(5, 0, 0, 2), EpochShuffleSampler(5, 0, 1, 2)
        >>> len(a), sorted(set(a) | set(b)) == list(range(5))
        (3, True)
    """

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"rank must be in [0, world_size) and world_size >= 1, got {rank}, {world_size}"
            )
        self.n, self.seed, self.epoch = n, seed, 0
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        if self.world_size == 1:
            return iter(order)
        total = len(self) * self.world_size
        order += (order * (total // max(self.n, 1) + 1))[: total - self.n]
        return iter(order[self.rank : total : self.world_size])

    def __len__(self) -> int:
        return -(-self.n // self.world_size)


@dataclass
class Splits:
    """The train / val / test datasets of a run and what the model needs to know of them.

    Any map-style ``torch.utils.data.Dataset`` works; the built-in and array sources give
    ``TensorDataset`` s of float32 features and int64 labels (float32 targets for regression).
    ``input_shape`` is the shape of one item's (first) input, ``n_features`` its number of
    values, ``n_classes`` the number of classes (None for regression or when unknown) and
    ``n_outputs`` what a model's last layer should produce (classes, or target values).
    """

    train: Dataset
    val: Dataset
    test: Dataset
    name: str
    task: str = "classification"
    n_classes: int | None = None
    input_shape: tuple[int, ...] | None = None
    target_shape: tuple[int, ...] = ()
    collate: Callable[[list[Any]], Any] | None = None
    num_workers: int = 0
    pin_memory: bool = False

    @property
    def n_features(self) -> int | None:
        return math.prod(self.input_shape) if self.input_shape is not None else None

    @property
    def n_outputs(self) -> int | None:
        if self.task == "classification":
            return self.n_classes
        return math.prod(self.target_shape) if self.target_shape else 1

    def dataset(self, split: str) -> Dataset:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        return getattr(self, split)

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` of a split of tensors as NumPy arrays (array sources only)."""
        x, y = self.tensors(split)
        return x.numpy(), y.numpy()

    def tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of a split as two stacked tensors (every item an ``(x, y)`` pair)."""
        dataset = self.dataset(split)
        if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
            return dataset.tensors[0], dataset.tensors[1]
        batch = next(iter(self.loader(split, max(len(dataset), 1))))
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(f"the {split} split's items are not (input, target) pairs")
        return batch[0], batch[1]

    # the tabular arrays, as before (x_train, y_train, ...)
    x_train = property(lambda self: self.arrays("train")[0])
    y_train = property(lambda self: self.arrays("train")[1])
    x_val = property(lambda self: self.arrays("val")[0])
    y_val = property(lambda self: self.arrays("val")[1])
    x_test = property(lambda self: self.arrays("test")[0])
    y_test = property(lambda self: self.arrays("test")[1])

    def with_train(self, train: Dataset) -> Splits:
        """The same splits with another training set (a bootstrap resample, a subset)."""
        return dataclasses.replace(self, train=train)

    def loader(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> DataLoader:
        """A DataLoader over one split; shuffling is seeded per epoch (EpochShuffleSampler).

        ``rank`` / ``world_size`` shard a shuffled split across DDP processes.
        """
        dataset = self.dataset(split)
        sampler = EpochShuffleSampler(len(dataset), seed, rank, world_size) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )


def array_splits(
    arrays: dict[str, tuple[np.ndarray, np.ndarray]], name: str, task: str, n_classes: int | None
) -> Splits:
    """Splits of ``TensorDataset`` s from ``{"train": (x, y), "val": ..., "test": ...}``."""
    y_dtype = torch.int64 if task == "classification" else torch.float32
    sets = {
        split: TensorDataset(
            torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=y_dtype)
        )
        for split, (x, y) in arrays.items()
    }
    x, y = arrays["train"]
    return Splits(
        **sets, name=name, task=task, n_classes=n_classes, input_shape=tuple(x.shape[1:]),
        target_shape=tuple(y.shape[1:]),
    )  # fmt: skip


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
    found = _load(source, target)
    return found.x, found.y, found.name


@dataclass
class _Source:
    """What a data source holds, with the names its messages use."""

    x: np.ndarray
    y: np.ndarray
    name: str
    features: list[str] | None = None  # CSV column names of x (None: 0-based indices)
    label: str = "the target"  # how messages name y
    where: str = "data"  # how messages name the source


def _load(source: str, target: str | None) -> _Source:
    if source in EMBEDDED:
        bunch = EMBEDDED[source]()
        names = [str(n) for n in getattr(bunch, "feature_names", [])] or None
        return _Source(np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target),
                       source, names)  # fmt: skip
    path = Path(source)
    if path.suffix.lower() not in {".csv", ".npz"}:
        raise ValueError(
            f"data.source {_cut(source)!r} is neither an embedded dataset "
            f"({', '.join(EMBEDDED)}) nor a .csv or .npz file"
        )
    if path.is_dir():
        raise ValueError(f"data.source {_cut(source)!r} is a directory; expected a file")
    if not path.is_file():
        raise ValueError(f"data.source: file {_cut(source)!r} does not exist")
    try:
        if path.suffix.lower() == ".npz":
            x, y = _read_npz(path)
            return _Source(x, y, path.stem, None, "array 'y'", f"data.source {path.name}")
        x, y, features = _read_csv(path, target)
        label = f"the target column {_show(target)}"
        return _Source(x, y, path.stem, features, label, f"data.source {path.name}")
    except OSError as err:
        raise ValueError(
            f"data.source {path.name}: cannot be read ({err.strerror or _first_line(err)})"
        ) from None


def _first_line(err: BaseException, limit: int = 100) -> str:
    """A library's message cut to its first line and ``limit`` characters."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return _cut(text, limit)


def _cut(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _rows(n: int) -> str:
    return f"{n} row{'s' * (n != 1)}"


def _show(value: Any, limit: int = 40) -> str:
    """``repr(value)``, cut for a one-line message."""
    return _cut(repr(value), limit)


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
                f"{sorted(missing)} (it holds {_cut(str(sorted(arrays.files)), 60)})"
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
        raise ValueError(f"data.source {name}: array {key!r}: {_first_line(err)}") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise ValueError(
            f"data.source {name}: array {key!r} cannot be read; the archive is damaged "
            f"({_first_line(err, 60)})"
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
                f"data.source {path.name}: line {reader.line_num}: {_first_line(err)}"
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
            raise ValueError(f"data.source {path.name}: column {_show(name)} appears twice")
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
                f"data.source {path.name}: column {_show(header[empty])} has an empty cell at "
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
            f"data.target {_show(target)} is not a column of {path.name}; columns: "
            f"{_cut(str(header), 100)}"
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
                f"{_show(name)} holds {_show(columns[name][bad])} (data row {bad + 1})"
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


def _check_finite_features(arrays: dict[str, np.ndarray], scaled: bool) -> None:
    """Refuse features that are not finite as the float32 the model gets (after scaling).

    A file can hold only finite values and still overflow: ``StandardScaler`` squares the
    values (``1e308 ** 2`` is Inf), and anything beyond float32's ``±3.4e38`` becomes Inf.
    """
    bad: dict[str, int] = {}
    columns: set[int] = set()
    with np.errstate(over="ignore", invalid="ignore"):
        for split, x in arrays.items():
            broken = ~np.isfinite(np.asarray(x, dtype=np.float32))
            if broken.any():
                bad[split] = int(broken.any(axis=1).sum())
                columns.update(np.flatnonzero(broken.any(axis=0)).tolist())
    if bad:
        counts = ", ".join(f"{n} of {split}" for split, n in bad.items())
        when = "when scaled (StandardScaler) or stored " if scaled else "when stored "
        total = sum(bad.values())
        raise ValueError(
            f"data: the features overflow {when}as float32: {total} row{'s' * (total != 1)} "
            f"({counts}) turn NaN or Inf, in feature columns {sorted(columns)} (0-based); "
            "values near ±1e308 overflow scaling and beyond ±3.4e38 overflow float32; "
            "rescale those columns (divide, log) first"
        )


def _encode_labels(y: np.ndarray, name: str = "the target") -> tuple[np.ndarray, int]:
    check_class_labels(y, "data", name)
    classes, encoded = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(
            f"data: the labels hold a single class ({_show(classes[0])}); need at least 2"
        )
    return encoded.reshape(-1).astype(np.int64), len(classes)


def check_class_labels(y: np.ndarray, where: str, name: str = "the target") -> None:
    """Refuse targets that are not one class label per row under classification (never a
    silent many-class classifier): several columns, complex numbers, NaN / Inf, fractional
    floats, or classes seen only once each. Every message is one line naming ``where``
    (the config key) and ``name`` (the column or array)."""
    regression = 'for regression set task.kind = "regression"'
    if y.ndim != 1:
        per_row = math.prod(y.shape[1:])
        raise ValueError(
            f"{where}: {name} has shape {tuple(y.shape)}, but classification takes one class "
            f"label per row, shape ({len(y)},) (one-hot: y.argmax(axis=1)); for {per_row} "
            f'regression targets per row set task.kind = "regression"'
        )
    if y.dtype.kind == "c":
        raise ValueError(f"{where}: {name} holds complex numbers; they are not class labels")
    if y.dtype.kind not in "biufUS":
        raise ValueError(f"{where}: {name} has dtype {y.dtype}; class labels are integers or text")
    if y.dtype.kind == "f":
        finite = np.isfinite(y)
        if not finite.all():
            raise ValueError(
                f"{where}: {name} holds NaN or Inf in {_rows(int((~finite).sum()))} (the first at "
                f"index {int(np.flatnonzero(~finite)[0])}); every row needs a class label"
            )
        fractional = y[y != np.round(y)]
        if fractional.size:
            raise ValueError(
                f"{where}: {name} has {np.unique(fractional).size} distinct non-integer values "
                f"(e.g. {float(fractional[0]):g}) under classification; {regression}; "
                "classification needs integer class labels"
            )
    values, counts = np.unique(y, return_counts=True)
    once = int((counts < 2).sum())
    if once:
        raise ValueError(
            f"{where}: {name} has {len(values)} distinct values, {once} of them seen only once; "
            f'a continuous target needs task.kind = "regression"; classes need 2+ samples each'
        )


def split_size_error(n: int, labels: np.ndarray | None, val: float, test: float) -> ValueError:
    """The error for too few samples to split, in the config's terms (to be raised)."""
    fractions = f"data.val_fraction = {val:g}, data.test_fraction = {test:g}"
    if labels is None:
        return ValueError(
            f"data: {n} samples are too few for a train / val / test split with {fractions}; "
            "each split needs at least one sample"
        )
    k = len(np.unique(labels))
    return ValueError(
        f"data: {n} samples are too few for a train / val / test split stratified over {k} "
        f"classes with {fractions}; each split needs at least one sample per class"
    )


def _check_shapes(found: _Source) -> None:
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


def _check_finite_input(found: _Source) -> None:
    """Refuse NaN / Inf features, naming the columns (a NaN loss later is worse)."""
    broken = ~np.isfinite(found.x)
    if not broken.any():
        return
    rows = int(broken.any(axis=1).sum())
    columns = np.flatnonzero(broken.any(axis=0))
    if found.features is not None:
        named = [found.features[j] for j in columns[:5]]
        shown = f"columns {_cut(str(named), 80)}"
    else:
        shown = f"feature columns {_cut(str(columns[:8].tolist()), 60)} (0-based) of X"
    more = (
        f" and {len(columns) - 5} more" if found.features is not None and len(columns) > 5 else ""
    )
    raise ValueError(
        f"{found.where}: {_rows(rows)} of features hold NaN or Inf, in {shown}{more}; "
        "clean or impute them first"
    )


def split_indices(
    n: int, labels: np.ndarray | None, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded train / val / test indices, stratified by ``labels`` when given."""
    index = np.arange(n)
    try:
        rest, test = train_test_split(
            index, test_size=test_fraction, stratify=labels, random_state=seed
        )
        val_share = val_fraction / (1.0 - test_fraction)
        train, val = train_test_split(
            rest,
            test_size=val_share,
            stratify=labels[rest] if labels is not None else None,
            random_state=seed,
        )
    except ValueError:  # scikit-learn: a split would be empty or miss a class
        raise split_size_error(n, labels, val_fraction, test_fraction) from None
    return train, val, test


def subsample_indices(
    n: int, labels: np.ndarray | None, fraction: float | None, size: int | None, seed: int
) -> np.ndarray:
    """The training items ``train_fraction`` / ``train_size`` keep (stratified by ``labels``)."""
    index = np.arange(n)
    if fraction is None and size is None:
        return index
    if size is not None and size > n:
        raise ValueError(
            f"data.train_size is {size}, but the training split holds only {n} samples; "
            f"use at most {n} (or data.train_fraction)"
        )
    keep = size if size is not None else max(1, round(fraction * n))
    if keep >= n:
        return index
    if labels is None:
        return np.sort(np.random.default_rng(seed).choice(n, size=keep, replace=False))
    n_classes = len(np.unique(labels))
    if keep < n_classes:
        raise ValueError(
            f"data.train_fraction/train_size keeps {keep} samples, fewer than the "
            f"{n_classes} classes; keep at least one per class"
        )
    if n - keep < n_classes:  # the stratified split needs one left-out sample per class
        raise ValueError(
            f"data.train_fraction/train_size keeps {keep} of {n} training samples, leaving "
            f"out {n - keep}, fewer than the {n_classes} classes; keep at most "
            f"{n - n_classes} or all {n}"
        )
    kept, _ = train_test_split(index, train_size=keep, stratify=labels, random_state=seed)
    return kept


def load_splits(
    source: str = "digits",
    *,
    target: str | None = None,
    task: str = "classification",
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    train_fraction: float | None = None,
    train_size: int | None = None,
    seed: int = 0,
    scale: bool = True,
) -> Splits:
    """Load a dataset and split it: seeded, stratified (classification), scaled on train only.

    Example:
        >>> s = load_splits("wine", seed=0)
        >>> s.n_classes, s.x_train.shape[1]
        (3, 13)
        >>> abs(float(s.x_train.mean())) < 1e-6
        True
    """
    if train_fraction is not None and not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"data.train_fraction must be in (0, 1], got {train_fraction}")
    if train_size is not None and train_size < 1:
        raise ValueError(f"data.train_size must be a positive integer, got {train_size}")
    found = _load(source, target)
    x, y_raw, name = found.x, found.y, found.name
    _check_shapes(found)
    _check_finite_input(found)
    if task == "classification":
        if y_raw.ndim == 2 and y_raw.shape[1] == 1:
            y_raw = y_raw[:, 0]  # shape (n, 1): already one label per row
        y, n_classes = _encode_labels(y_raw, found.label)
        labels: np.ndarray | None = y
    else:
        if y_raw.dtype.kind not in "biuf":
            what = "complex numbers" if y_raw.dtype.kind == "c" else f"dtype {y_raw.dtype}"
            raise ValueError(
                f"data: {found.label} holds {what}; regression targets must be real numbers"
            )
        with np.errstate(over="ignore"):  # beyond float32 is Inf: refused next
            y = np.asarray(y_raw, dtype=np.float32)
        if not np.isfinite(y).all():
            bad = int((~np.isfinite(y)).reshape(len(y), -1).any(axis=1).sum())
            raise ValueError(
                f"data: {found.label} holds NaN or Inf in {_rows(bad)} (or beyond float32's "
                "±3.4e38); clean them first"
            )
        n_classes, labels = None, None
    train, val, test = split_indices(len(y), labels, val_fraction, test_fraction, seed)
    train = train[
        subsample_indices(
            len(train), labels[train] if labels is not None else None, train_fraction,
            train_size, seed,
        )
    ]  # fmt: skip
    x_train, x_val, x_test = x[train], x[val], x[test]
    if scale:
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused next
            scaler = StandardScaler().fit(x_train)
            x_train, x_val, x_test = (scaler.transform(a) for a in (x_train, x_val, x_test))
    _check_finite_features({"train": x_train, "val": x_val, "test": x_test}, scale)
    arrays = {"train": (x_train, y[train]), "val": (x_val, y[val]), "test": (x_test, y[test])}
    return array_splits(arrays, name, task, n_classes)
