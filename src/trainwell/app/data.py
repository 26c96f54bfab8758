"""Datasets: embedded ones that need no download, and the user's own CSV / NPZ files.

Every dataset is split the same way: a seeded, stratified train/val/test split,
feature scaling fitted on the training split only (no leakage), and an optional
``train_fraction`` / ``train_size`` that keeps only part of the training split
(stratified too) to make small-data, overfitting-prone settings on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn import datasets as skdatasets
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader, Sampler, TensorDataset

EMBEDDED = {
    "digits": skdatasets.load_digits,
    "breast_cancer": skdatasets.load_breast_cancer,
    "wine": skdatasets.load_wine,
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
    """Scaled feature arrays and integer labels for train / val / test."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    name: str

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    def tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of one split as float32 / int64 tensors."""
        x, y = {
            "train": (self.x_train, self.y_train),
            "val": (self.x_val, self.y_val),
            "test": (self.x_test, self.y_test),
        }[split]
        return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)

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
        dataset = TensorDataset(*self.tensors(split))
        sampler = EpochShuffleSampler(len(dataset), seed, rank, world_size) if shuffle else None
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler)


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
    if not target:
        raise ValueError("data.target is required for a CSV file: the name of the label column")
    table = np.genfromtxt(path, delimiter=",", names=True, dtype=None, encoding="utf-8")
    columns = list(table.dtype.names or ())
    if target not in columns:
        raise ValueError(
            f"data.target {target!r} is not a column of {path.name}; columns: {columns}"
        )
    features = [c for c in columns if c != target]
    try:
        x = np.column_stack([table[c].astype(np.float64) for c in features])
    except ValueError as err:
        raise ValueError(f"data.source {path.name}: every feature column must be numeric") from err
    return x, np.asarray(table[target])


def _encode_labels(y: np.ndarray) -> tuple[np.ndarray, int]:
    classes, encoded = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"data: the labels hold a single class ({classes[0]!r}); need at least 2")
    return encoded.astype(np.int64), len(classes)


def _subsample(x, y, fraction: float | None, size: int | None, seed: int):
    if fraction is None and size is None:
        return x, y
    keep = size if size is not None else max(1, round(fraction * len(y)))
    if keep >= len(y):
        return x, y
    n_classes = len(np.unique(y))
    if keep < n_classes:
        raise ValueError(
            f"data.train_fraction/train_size keeps {keep} samples, fewer than the "
            f"{n_classes} classes; keep at least one per class"
        )
    x_kept, _, y_kept, _ = train_test_split(x, y, train_size=keep, stratify=y, random_state=seed)
    return x_kept, y_kept


def load_splits(
    source: str = "digits",
    *,
    target: str | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    train_fraction: float | None = None,
    train_size: int | None = None,
    seed: int = 0,
    scale: bool = True,
) -> Splits:
    """Load a dataset and split it: stratified, seeded, scaled on train only.

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
    y, n_classes = _encode_labels(y_raw)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    val_share = val_fraction / (1.0 - test_fraction)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_share, stratify=y_rest, random_state=seed
    )
    x_train, y_train = _subsample(x_train, y_train, train_fraction, train_size, seed)
    if scale:
        scaler = StandardScaler().fit(x_train)
        x_train, x_val, x_test = (scaler.transform(a) for a in (x_train, x_val, x_test))
    return Splits(x_train, y_train, x_val, y_val, x_test, y_test, n_classes, name)
