"""Datasets split for a run: embedded ones that need no download, the user's CSV / NPZ files.

Every dataset is split the same way: a seeded, stratified train/val/test split,
feature scaling fitted on the training split only (no leakage), and an optional
``train_fraction`` / ``train_size`` that keeps only part of the training split
(stratified too) to make small-data, overfitting-prone settings on purpose. Reading the
files is :mod:`trainwell.app.data_files`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from trainwell.app.data_files import (
    check_finite_input,
    check_shapes,
    plural_rows,
    read_source,
    show_value,
)


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
            f"data: the labels hold a single class ({show_value(classes[0])}); need at least 2"
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
                f"{where}: {name} holds NaN or Inf in {plural_rows(int((~finite).sum()))} (the "
                f"first at index {int(np.flatnonzero(~finite)[0])}); every row needs a class label"
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
    found = read_source(source, target)
    x, y_raw, name = found.x, found.y, found.name
    check_shapes(found)
    check_finite_input(found)
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
                f"data: {found.label} holds NaN or Inf in {plural_rows(bad)} (or beyond float32's "
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
