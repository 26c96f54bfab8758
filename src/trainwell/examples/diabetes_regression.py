"""Regression with an MLP on scikit-learn's bundled diabetes data (nothing is downloaded).

Demonstrates ``[task] kind = "regression"``: MSE loss by default (``loss = "huber"`` or
``"l1"`` for a robust one), and ``test_mse`` / ``test_mae`` / ``test_r2`` in
``summary.json``. The datasets function standardizes features *and* targets with the
mean and standard deviation of the training split only, so nothing about val or test
leaks into training; the errors are therefore in units of the training target's
standard deviation (R^2 is unaffected). The config also keeps checkpoints.

The data: 442 patients, 10 baseline variables (age, sex, BMI, blood pressure, six serum
measurements), target a measure of disease progression one year later
(``sklearn.datasets.load_diabetes``, shipped with scikit-learn).

Run it::

    trainwell run examples/diabetes_regression.toml
    trainwell ablate examples/diabetes_regression.toml --jobs 2

The split is drawn from ``seed``; the same seed gives the same split.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset


def make_datasets(
    val_fraction: float = 0.15, test_fraction: float = 0.2, seed: int = 0
) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Train / val / test ``TensorDataset`` s of float32 features ``(N, 10)`` and targets ``(N,)``.

    Example:
        >>> train, val, test = make_datasets(seed=0)
        >>> len(train) + len(val) + len(test), train[0][0].shape, train[0][1].shape
        (442, torch.Size([10]), torch.Size([]))
        >>> x, y = train.tensors
        >>> round(float(y.mean()), 6), round(float(y.std(unbiased=False)), 6)
        (0.0, 1.0)
    """
    from sklearn.datasets import load_diabetes

    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            "val_fraction and test_fraction must be in (0, 1) and sum to less than 1, got "
            f"{val_fraction} and {test_fraction}"
        )
    x, y = load_diabetes(return_X_y=True, scaled=False)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = round(test_fraction * len(y))
    n_val = round(val_fraction * len(y))
    parts = {
        "test": order[:n_test],
        "val": order[n_test : n_test + n_val],
        "train": order[n_test + n_val :],
    }
    train = parts["train"]
    x_mean, x_std = x[train].mean(axis=0), x[train].std(axis=0)
    y_mean, y_std = y[train].mean(), y[train].std()
    x_std[x_std == 0] = 1.0

    def tensors(index: np.ndarray) -> TensorDataset:
        features = torch.as_tensor((x[index] - x_mean) / x_std, dtype=torch.float32)
        targets = torch.as_tensor((y[index] - y_mean) / y_std, dtype=torch.float32)
        return TensorDataset(features, targets)

    return tensors(parts["train"]), tensors(parts["val"]), tensors(parts["test"])


class MLP(nn.Module):
    """Linear -> activation -> dropout blocks and a linear output.

    Args:
        n_features: input width (filled in by trainwell).
        n_outputs: target values per item (filled in by trainwell; 1 here). With one
            output the model returns shape ``(N,)``, like the targets.
        hidden: widths of the hidden layers.
        dropout: rate of each ``nn.Dropout`` (``dropout.p`` overrides it).

    Example:
        >>> MLP(10, 1, hidden=[8])(torch.zeros(3, 10)).shape
        torch.Size([3])
    """

    def __init__(
        self,
        n_features: int,
        n_outputs: int = 1,
        hidden: list[int] | tuple[int, ...] = (64, 64),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.SiLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, n_outputs))
        self.net = nn.Sequential(*layers)
        self.n_outputs = n_outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out.squeeze(-1) if self.n_outputs == 1 else out
