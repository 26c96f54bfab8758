"""A user's model that starts every run from one fixed set of weights (as a fine-tune of
one pretrained checkpoint does): ``model.target = "tests.study.soup_code:pretrained"``."""

from __future__ import annotations

import torch
from torch import nn


def pretrained(n_features: int, n_classes: int, hidden: int = 16, init_seed: int = 0) -> nn.Module:
    """An MLP with BatchNorm whose initial weights depend on ``init_seed`` only (not on the
    run's seed); the global random state is left as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(init_seed)
        return nn.Sequential(
            nn.Linear(n_features, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_classes),
        )
