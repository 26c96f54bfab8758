"""Built-in models: an MLP for tabular data and a small CNN for the 8x8 digits images."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from trainwell.regularization.dropout import Dropout

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}
NORMS = {"none": None, "batch": nn.BatchNorm1d, "layer": nn.LayerNorm}


def _dropout(p: float) -> nn.Module:
    """trainwell's ``Dropout``: it obeys ``model.eval()`` and ``set_dropout`` / schedules."""
    return Dropout(p)


class MLP(nn.Sequential):
    """A multi-layer perceptron: [Linear -> norm -> activation -> dropout] x depth -> Linear.

    Every hidden layer gets a dropout module (rate 0 when off) so that rates can be
    changed later by ``set_dropout`` or a ``DropoutSchedule``.

    Args:
        in_features: input width.
        out_features: number of outputs (classes).
        hidden: widths of the hidden layers.
        activation: one of ``relu``, ``gelu``, ``tanh``, ``silu``.
        norm: ``none``, ``batch`` or ``layer`` normalization after each hidden Linear.
        dropout: one rate for every hidden layer, or one rate per hidden layer.

    Example:
        >>> m = MLP(64, 10, hidden=(32, 32), dropout=(0.1, 0.2))
        >>> m(torch.zeros(5, 64)).shape
        torch.Size([5, 10])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int] = (256, 256),
        activation: str = "relu",
        norm: str = "none",
        dropout: float | Sequence[float] = 0.0,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"model.activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}"
            )
        if norm not in NORMS:
            raise ValueError(f"model.norm must be one of {sorted(NORMS)}, got {norm!r}")
        rates = (
            [float(dropout)] * len(hidden) if isinstance(dropout, int | float) else list(dropout)
        )
        if len(rates) != len(hidden):
            raise ValueError(
                f"model.dropout needs one rate per hidden layer ({len(hidden)}), got {len(rates)}"
            )
        layers: list[nn.Module] = []
        width = in_features
        for size, rate in zip(hidden, rates, strict=True):
            layers.append(nn.Linear(width, size))
            if NORMS[norm] is not None:
                layers.append(NORMS[norm](size))
            layers += [ACTIVATIONS[activation](), _dropout(rate)]
            width = size
        layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)


class DigitsCNN(nn.Module):
    """A small CNN for the 8x8 digits images (input: 64 features, reshaped to 1x8x8).

    Example:
        >>> DigitsCNN(10)(torch.zeros(2, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(self, out_features: int = 10, channels: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.BatchNorm2d(2 * channels),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), _dropout(dropout), nn.Linear(2 * channels * 16, out_features)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.view(-1, 1, 8, 8)
        return self.head(self.features(x))


def build_model(
    kind: str,
    in_features: int,
    out_features: int,
    *,
    hidden: Sequence[int] = (256, 256),
    activation: str = "relu",
    norm: str = "none",
    dropout: float | Sequence[float] = 0.0,
    channels: int = 32,
) -> nn.Module:
    """Build a built-in model by name: ``mlp`` or ``cnn`` (64 input features only)."""
    if kind == "mlp":
        return MLP(in_features, out_features, hidden, activation, norm, dropout)
    if kind == "cnn":
        if in_features != 64:
            raise ValueError(
                f"model.kind 'cnn' expects 8x8 images (64 features), got {in_features} features"
            )
        rate = dropout if isinstance(dropout, int | float) else max(dropout, default=0.0)
        return DigitsCNN(out_features, channels, float(rate))
    raise ValueError(f"model.kind must be 'mlp' or 'cnn', got {kind!r}")
