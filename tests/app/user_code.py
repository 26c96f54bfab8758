"""A user's own code, as the app-layer tests point configs at it (``user_code.py:Name``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

SEEN: dict[str, object] = {}  # what trainwell passed (inspected in-process by the tests)


class Net(nn.Module):
    """A two-layer MLP that is told its sizes by trainwell."""

    def __init__(self, n_features: int, n_classes: int, hidden: int = 16) -> None:
        super().__init__()
        SEEN.update(n_features=n_features, n_classes=n_classes, hidden=hidden)
        self.body = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Regressor(nn.Module):
    def __init__(self, n_features: int, n_outputs: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_features, 16), nn.Tanh(), nn.Linear(16, n_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def blobs(n: int = 240, classes: int = 3, features: int = 5, seed: int = 0):
    """Gaussian blobs: only a train split, so trainwell carves val and test."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    centers = torch.randn(classes, features, generator=g) * 3
    x = centers[y] + torch.randn(n, features, generator=g)
    return TensorDataset(x, y)


def blob_splits(n: int = 240, seed: int = 0):
    """All three splits, as a dict."""
    data = blobs(3 * n, seed=seed)
    x, y = data.tensors
    parts = [TensorDataset(x[i::3], y[i::3]) for i in range(3)]
    return {"train": parts[0], "val": parts[1], "test": parts[2]}


def line(n: int = 300, seed: int = 0):
    """A noisy linear regression target, float32, shape (N,)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + 0.1 * torch.randn(n, generator=g)
    return TensorDataset(x, y)


def continuous_labels(n: int = 100):
    x = torch.randn(n, 3)
    return TensorDataset(x, torch.rand(n))


class DictBlobs(Dataset):
    """Items are dicts: the default batch step cannot unpack them; ``dict_step`` can."""

    def __init__(self, n: int = 240, seed: int = 0) -> None:
        self.inner = blobs(n, seed=seed)
        self.targets = self.inner.tensors[1].tolist()

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.inner[i]
        return {"features": x, "label": y}


def dict_blobs(n: int = 240, seed: int = 0) -> DictBlobs:
    return DictBlobs(n, seed)


def dict_step(model, batch, loss_fn):
    outputs = model(batch["features"])
    targets = batch["label"]
    return loss_fn(outputs, targets), outputs, targets, len(targets)


def smoothed_ce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, label_smoothing=0.1)


def top2(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    best = outputs.topk(2, dim=1).indices
    return float((best == targets[:, None]).any(dim=1).float().mean())


def not_a_model(n_features: int, n_classes: int) -> str:
    return "not a module"


NOT_CALLABLE = 3


def four_splits():
    return (blobs(), blobs(), blobs(), blobs())


def an_iterable():
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(3), torch.tensor(0)

    return Stream()


def bad_keys():
    return {"training": blobs()}
