"""The user's own datasets: ``[data] target = "module:make_datasets"`` with ``[data.args]``.

The target is called with ``[data.args]`` (and ``seed`` when its signature takes it) and
returns map-style ``torch.utils.data.Dataset`` s: one (train), a tuple ``(train, val)`` /
``(train, val, test)``, or a dict with ``train`` and optionally ``val`` / ``test``. A
missing val or test split is carved from train with the same seeded split as the
built-in data (``data.val_fraction`` / ``data.test_fraction``), stratified when the labels
are reachable; ``data.train_fraction`` / ``data.train_size`` then keep part of the
training split, stratified too (random otherwise).

Labels are reachable when the dataset has a ``targets`` attribute (torchvision's
spelling), is a ``TensorDataset``, or yields ``(input, ..., target)`` items with a scalar
target; trainwell reads every training target once to find them (and the number of
classes). Items of other shapes (dicts, sequences of tokens) work with a ``[task] step``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Subset, TensorDataset

from trainwell.app.data import (
    Splits,
    check_class_labels,
    split_indices,
    split_size_error,
    subsample_indices,
)
from trainwell.app.entry_points import EntryPointError, call, resolve_callable

SPLITS = ("train", "val", "test")


def _as_splits(key: str, target: str, returned: Any) -> dict[str, Dataset | None]:
    """The train / val / test datasets of what the target returned, or one-line errors."""
    expected = (
        "expected a Dataset, a tuple (train, val[, test]) or a dict with 'train' "
        "(and 'val' / 'test')"
    )
    if isinstance(returned, dict):
        unknown = set(returned) - set(SPLITS)
        if unknown or "train" not in returned:
            raise EntryPointError(
                f"{key} = {target!r} returned a dict with keys {sorted(returned)}; {expected}"
            )
        sets = {s: returned.get(s) for s in SPLITS}
    elif isinstance(returned, (tuple, list)):
        if not 1 <= len(returned) <= 3:
            raise EntryPointError(f"{key} = {target!r} returned {len(returned)} items; {expected}")
        sets = dict(zip(SPLITS, [*returned, None, None][:3], strict=True))
    else:
        sets = {"train": returned, "val": None, "test": None}
    for split, dataset in sets.items():
        if dataset is None:
            continue
        if isinstance(dataset, IterableDataset) or not (
            hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
        ):
            raise EntryPointError(
                f"{key} = {target!r}: the {split} split is a {type(dataset).__name__}, not a "
                "map-style Dataset (with __getitem__ and __len__); " + expected
            )
        if len(dataset) == 0:
            raise EntryPointError(f"{key} = {target!r}: the {split} split is empty")
    return sets


def _target_of(item: Any) -> Any:
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return item[-1]
    return None


def targets(dataset: Dataset) -> np.ndarray | None:
    """Every item's target as one array (scalar targets only), or None when not reachable."""
    if isinstance(dataset, Subset):
        inner = targets(dataset.dataset)
        return inner[np.asarray(dataset.indices)] if inner is not None else None
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        values = dataset.tensors[-1]
        return values.numpy() if values.dim() == 1 else None
    found = getattr(dataset, "targets", None)
    if found is not None:
        values = np.asarray(found)
        return values if values.ndim == 1 and len(values) == len(dataset) else None
    collected = []
    for i in range(len(dataset)):  # type: ignore[arg-type]
        value = _target_of(dataset[i])
        if value is None:
            return None
        value = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if value.ndim != 0:
            return None
        collected.append(value)
    return np.stack(collected)


def _first_input_shape(dataset: Dataset) -> tuple[int, ...] | None:
    item = dataset[0]
    first = item[0] if isinstance(item, (tuple, list)) and len(item) >= 2 else None
    return tuple(first.shape) if isinstance(first, torch.Tensor) else None


def _target_shape(dataset: Dataset) -> tuple[int, ...]:
    target = _target_of(dataset[0])
    return tuple(target.shape) if isinstance(target, torch.Tensor) else ()


def _check_task(labels: np.ndarray | None, task: str) -> int | None:
    """The number of classes (classification with reachable labels), checking the labels."""
    if labels is None or task != "classification":
        return None
    check_class_labels(labels, "data.target")
    if labels.dtype.kind == "f":
        raise ValueError(
            "data.target: the classification targets are floats holding whole numbers; "
            "return integer class labels (torch.long)"
        )
    if labels.dtype.kind not in "iub":
        raise ValueError(f"data.target: class labels must be integers, got {labels.dtype}")
    if labels.min() < 0:
        raise ValueError("data.target: class labels must be in [0, n_classes); found a negative")
    return int(labels.max()) + 1


def _carve(
    sets: dict[str, Dataset | None], labels: np.ndarray | None, val: float, test: float, seed: int
) -> dict[str, Dataset]:
    """Fill a missing val / test split from train with the seeded (stratified) split."""
    train = sets["train"]
    assert train is not None
    if sets["val"] is not None and sets["test"] is not None:
        return dict(sets)  # type: ignore[arg-type]
    if sets["val"] is None and sets["test"] is None:
        tr, va, te = split_indices(len(train), labels, val, test, seed)
        return {"train": Subset(train, tr), "val": Subset(train, va), "test": Subset(train, te)}
    missing = "val" if sets["val"] is None else "test"
    share = val if missing == "val" else test
    from sklearn.model_selection import train_test_split

    try:
        tr, held = train_test_split(
            np.arange(len(train)), test_size=share, stratify=labels, random_state=seed
        )
    except ValueError:  # scikit-learn: a split would be empty or miss a class
        raise split_size_error(len(train), labels, val, test) from None
    out = dict(sets)
    out["train"], out[missing] = Subset(train, tr), Subset(train, held)
    return out  # type: ignore[return-value]


def load_user_splits(config: Any) -> Splits:
    """The :class:`Splits` of a config whose ``data.target`` is an entry point."""
    d, task = config.data, config.task.kind
    fn = resolve_callable("data.target", d.target)
    returned = call("data.target", d.target, fn, d.args, {"seed": d.data_seed(config.seed)})
    sets = _as_splits("data.target", d.target, returned)
    labels = targets(sets["train"])  # type: ignore[arg-type]
    n_classes = _check_task(labels, task)
    stratify = labels if task == "classification" else None
    sets = _carve(sets, stratify, d.val_fraction, d.test_fraction, d.data_seed(config.seed))
    train_labels = targets(sets["train"]) if stratify is not None else None
    keep = subsample_indices(
        len(sets["train"]), train_labels, d.train_fraction, d.train_size, d.data_seed(config.seed)
    )
    if len(keep) < len(sets["train"]):
        sets["train"] = Subset(sets["train"], keep)
    collate = resolve_callable("data.collate", d.collate) if d.collate else None
    for split in ("val", "test"):
        other = targets(sets[split]) if n_classes is not None else None
        if other is not None and other.size:
            n_classes = max(n_classes or 0, int(other.max()) + 1)
    return Splits(
        **sets,
        name=str(d.target).rpartition(":")[2],
        task=task,
        n_classes=n_classes,
        input_shape=_first_input_shape(sets["train"]),
        target_shape=_target_shape(sets["train"]),
        collate=collate,
        num_workers=d.num_workers,
        pin_memory=d.pin_memory,
    )
