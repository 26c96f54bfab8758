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
    """
    if source in EMBEDDED:
        bunch = EMBEDDED[source]()
        return np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target), source
    path = Path(source)
    if path.suffix.lower() not in {".csv", ".npz"}:
        raise ValueError(
            f"data.source {source!r} is neither an embedded dataset "
            f"({', '.join(EMBEDDED)}) nor a .csv or .npz file"
        )
    if not path.is_file():
        raise ValueError(f"data.source: file {source!r} does not exist")
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as arrays:
            missing = {"X", "y"} - set(arrays.files)
            if missing:
                raise ValueError(
                    f"data.source {source!r} must hold arrays 'X' and 'y'; "
                    f"missing {sorted(missing)}"
                )
            x, y = np.asarray(arrays["X"], dtype=np.float64), np.asarray(arrays["y"])
    else:
        x, y = _read_csv(path, target)
    return x, y, path.stem


def _read_csv(path: Path, target: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Features (float64) and labels of a CSV with a header line; no cell may be empty.

    Read with the ``csv`` module, so quoted fields work and a missing cell is seen as
    missing in every column (``np.genfromtxt`` fills an integer column's gap with -1).
    Lines are the file's lines: line 1 is the header, line 2 the first data row.
    """
    if not target:
        raise ValueError("data.target is required for a CSV file: the name of the label column")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        if not header:
            raise ValueError(f"data.source {path.name}: the file is empty; need a header line")
        for i, name in enumerate(header):
            if not name:
                raise ValueError(
                    f"data.source {path.name}: column {i + 1} of the header has no name"
                )
            if header.index(name) != i:
                raise ValueError(f"data.source {path.name}: column {name!r} appears twice")
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
                    f"data.source {path.name}: column {header[empty]!r} has an empty cell at "
                    f"line {reader.line_num} of the file (data row {len(rows) + 1}; the first "
                    "one); fill or drop missing values first"
                )
            rows.append(cells)
    if target not in header:
        raise ValueError(
            f"data.target {target!r} is not a column of {path.name}; columns: {header}"
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
                f"{name!r} holds {columns[name][bad]!r} (data row {bad + 1})"
            ) from None
    return x, _typed(columns[target])


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


def _encode_labels(y: np.ndarray) -> tuple[np.ndarray, int]:
    check_class_labels(y, "data")
    classes, encoded = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"data: the labels hold a single class ({classes[0]!r}); need at least 2")
    return encoded.astype(np.int64), len(classes)


def check_class_labels(y: np.ndarray, where: str) -> None:
    """Refuse targets that look continuous under classification (never a silent
    many-class classifier): fractional floats, or classes seen only once each."""
    if y.dtype.kind == "c":
        raise ValueError(f"{where}: complex targets are not class labels")
    if y.dtype.kind == "f":
        fractional = y[np.isfinite(y) & (y != np.round(y))]
        if fractional.size:
            raise ValueError(
                f"{where}: the targets look continuous (e.g. {float(fractional[0]):g}), but "
                'task.kind is "classification"; set [task] kind = "regression"'
            )
    values, counts = np.unique(y, return_counts=True)
    once = int((counts < 2).sum())
    if once:
        raise ValueError(
            f"{where}: {len(values)} distinct target values, {once} of them seen only once; "
            'this looks like a continuous target: set [task] kind = "regression" (classes '
            "need at least 2 samples each for the stratified split)"
        )


def split_indices(
    n: int, labels: np.ndarray | None, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded train / val / test indices, stratified by ``labels`` when given."""
    index = np.arange(n)
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
    x, y_raw, name = load_arrays(source, target)
    if x.ndim != 2 or len(x) != len(y_raw):
        raise ValueError(
            f"data: X must be 2-D with one row per label; got {x.shape} rows vs {len(y_raw)}"
        )
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise ValueError(
            f"data: {bad} rows of features hold NaN or Inf; clean or impute them first"
        )
    if task == "classification":
        y, n_classes = _encode_labels(y_raw)
        labels: np.ndarray | None = y
    else:
        try:
            y = np.asarray(y_raw, dtype=np.float32)
        except ValueError:
            raise ValueError("data: regression targets must be numbers") from None
        if not np.isfinite(y).all():
            raise ValueError("data: some regression targets are NaN or Inf; clean them first")
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
