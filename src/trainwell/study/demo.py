"""The embedded default ablation that ``trainwell demo`` runs (a copy is examples/ablation.toml).

A wide MLP on a small subset of scikit-learn's digits overfits within a few
epochs, so the regularizers, averaging and early stopping have something to fix.
Every technique trainwell has gets one variant (ensembles aside: they multiply
the cost by their member count).
"""

from __future__ import annotations

from typing import Any

import tomllib

DEMO_TOML = """\
# trainwell demo: which technique helps a wide MLP on a small digits subset?
# Run it yourself with `trainwell ablate examples/ablation.toml --jobs 2`.
seed = 0
epochs = 24
batch_size = 32

[data]
source = "digits"
split_seed = 0  # one split for every seed: the seeds' ensembles are scored on all of its test set

[model]
kind = "mlp"
hidden = [512, 512]

[optimizer]
name = "adamw"
lr = 2e-3

[gradients]
monitor = true
monitor_every = 2

[ablation]
name = "demo"
mode = "one-at-a-time"
seeds = 5

[ablation.grid]
"data.train_fraction" = [0.1, 0.3]
l2 = [1e-4, 1e-3, 1e-2]
l1 = [1e-4]
"dropout.p" = [0.2, 0.5]
"clip.max_norm" = [0.5]
weight_decay = [0.1]

[ablation.variants."accumulate 4x8"]
"gradients.accumulate" = 4
batch_size = 8

[ablation.variants."early stopping"]
"early_stopping.enabled" = true
"early_stopping.patience" = 4

[ablation.variants.ema]
"ema.enabled" = true
"ema.decay" = 0.9

[ablation.variants.swa]
"swa.enabled" = true
"swa.start" = 0.5
"""


def demo_config() -> dict[str, Any]:
    """The demo study as a raw config dict.

    Example:
        >>> demo_config()["ablation"]["grid"]["l2"]
        [0.0001, 0.001, 0.01]
    """
    return tomllib.loads(DEMO_TOML)
