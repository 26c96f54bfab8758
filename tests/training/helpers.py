"""Datasets shared by the training-loop tests."""

from __future__ import annotations

from torch.utils.data import Dataset

from trainwell.app.data import EpochShuffleSampler as EpochSampler  # noqa: F401 - re-export


class DictDataset(Dataset):
    """Items as dicts ``{"x": ..., "y": ...}``: the default step cannot unpack them."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}
