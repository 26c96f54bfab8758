"""A ``Dataset`` that reads its items lazily from files on disk: one ``.npy`` per item.

Demonstrates the shape most real data has -- a folder of files and a label table --
without downloading anything: :func:`make_datasets` first writes a synthetic folder
(``item_00000.npy`` ... plus ``labels.csv``) into ``root``, then returns one
:class:`NpyFolder` dataset over it. Only a train split is returned, so trainwell carves
the validation and test splits itself with its seeded, stratified split; the dataset's
``targets`` attribute (the labels from ``labels.csv``, a list of ints) lets it stratify
without opening every file. Items are read in ``__getitem__`` only, so the DataLoader's
worker processes (``[data] num_workers``) do the file reading in parallel. The model is
trainwell's built-in MLP (``[model] kind = "mlp"``): user data and built-in models mix.

Each item is a noisy 32-value feature vector around one of its class's two prototypes
(so the classes are not linearly separable).

Run it::

    trainwell run examples/lazy_files.toml
    trainwell run examples/lazy_files.toml --set data.args.root=/path/to/folder

Without ``root`` the files go to a folder under the system temp directory named after
the arguments (reused when it is already complete). The same ``data_seed`` writes the same
files.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

LABELS = "labels.csv"
META = "generated.json"  # the arguments a generated folder was written with


class NpyFolder(Dataset):
    """Items ``(features, label)`` read from ``root/<file>.npy`` on each ``__getitem__``.

    ``root/labels.csv`` has a header ``file,label`` and one row per item; it is the only
    file read up front.

    Attributes:
        files: the item file names, in ``labels.csv`` order.
        targets: the integer labels, in the same order.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        table = self.root / LABELS
        if not table.is_file():
            raise ValueError(f"root {str(self.root)!r} has no {LABELS}")
        with table.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if not rows or set(rows[0]) != {"file", "label"}:
            raise ValueError(f"{table}: expected the columns file,label and at least one row")
        self.files = [row["file"] for row in rows]
        self.targets = [int(row["label"]) for row in rows]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        features = np.load(self.root / self.files[index], allow_pickle=False)
        return torch.from_numpy(features.astype(np.float32)), torch.tensor(self.targets[index])


def write_folder(root: Path, meta: dict[str, int | float]) -> None:
    """Write ``meta["n"]`` items, ``labels.csv`` and ``generated.json`` into a new ``root``.

    The files are written into a fresh sibling folder that is renamed to ``root`` when
    complete, so a reader (or a second process writing the same folder) never sees half
    a folder.
    """
    n, n_features, n_classes = int(meta["n"]), int(meta["n_features"]), int(meta["n_classes"])
    rng = np.random.default_rng(int(meta["data_seed"]))
    prototypes = rng.normal(size=(n_classes, 2, n_features))
    labels = np.arange(n) % n_classes
    rng.shuffle(labels)
    which = rng.integers(0, 2, size=n)
    root.parent.mkdir(parents=True, exist_ok=True)
    partial = root.parent / f".{root.name}.{uuid.uuid4().hex}.partial"
    partial.mkdir()
    try:
        rows = []
        for i, (label, proto) in enumerate(zip(labels, which, strict=True)):
            x = prototypes[label, proto] + meta["noise"] * rng.normal(size=n_features)
            name = f"item_{i:05d}.npy"
            np.save(partial / name, x.astype(np.float32), allow_pickle=False)
            rows.append((name, int(label)))
        with (partial / LABELS).open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "label"])
            writer.writerows(rows)
        (partial / META).write_text(json.dumps(meta, sort_keys=True), encoding="utf-8")
        try:
            os.rename(partial, root)
        except OSError:
            if not (root / LABELS).is_file():  # another process won the race only if complete
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def default_root(meta: dict[str, int | float]) -> Path:
    """The folder under the system temp directory that the given arguments write to.

    Example:
        >>> default_root({"n": 600, "n_features": 32, "noise": 1.0}).name
        'trainwell-lazy-files-n600-n_features32-noise1'
    """
    keyed = "-".join(f"{k}{v:g}" for k, v in meta.items())
    return Path(tempfile.gettempdir()) / f"trainwell-lazy-files-{keyed}"


def make_datasets(
    root: str | None = None,
    n: int = 600,
    n_features: int = 32,
    n_classes: int = 4,
    noise: float = 2.0,
    data_seed: int = 0,
) -> NpyFolder:
    """The folder dataset at ``root``, written first when ``root/labels.csv`` is missing.

    Only the training dataset is returned: trainwell carves val and test from it
    (stratified by ``targets``). ``data_seed`` fixes the files; the run's ``seed`` (not
    taken here) still varies the split, the initialization and the batch order, as it
    would for a folder of real data. A folder this function wrote with other arguments
    is refused (its ``generated.json`` says what they were); a folder of your own (a
    ``labels.csv`` and no ``generated.json``) is read as it is.

    Example:
        >>> folder = make_datasets(root=tempfile.mkdtemp() + "/items", n=8, n_classes=2)
        >>> len(folder), folder.targets.count(0), folder[0][0].shape
        (8, 4, torch.Size([32]))
    """
    if n < n_classes:
        raise ValueError(f"n must be at least n_classes ({n_classes}), got {n}")
    meta = {"n": n, "n_features": n_features, "n_classes": n_classes, "noise": noise,
            "data_seed": data_seed}  # fmt: skip
    path = Path(root) if root else default_root(meta)
    if not (path / LABELS).is_file():
        if path.exists() and any(path.iterdir()):
            raise ValueError(f"root {str(path)!r} exists, is not empty and has no {LABELS}")
        if path.exists():
            path.rmdir()
        write_folder(path, meta)
    elif (path / META).is_file():
        written = json.loads((path / META).read_text(encoding="utf-8"))
        if written != json.loads(json.dumps(meta)):
            raise ValueError(
                f"root {str(path)!r} holds files generated with {written}, not {meta}; "
                "pass another root (or delete the folder)"
            )
    return NpyFolder(path)
