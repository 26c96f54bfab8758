"""Built-in models: an MLP for tabular data and a small CNN for the 8x8 digits images."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import nn

from trainwell.regularization.dropout import Dropout

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}
NORMS = {"none": None, "batch": nn.BatchNorm1d, "layer": nn.LayerNorm}
#: The most parameters a built-in model may have: 40 GB of float32 weights (160 GB with
#: Adam's state), beyond any one accelerator; a larger one is a typo in ``model.hidden``.
MAX_PARAMETERS = 10**10
T = TypeVar("T")


def _check_size(name: str, value: object) -> int:
    """``value`` as a width, refusing what is not a whole number >= 1 (one line)."""
    try:
        size = operator.index(value)  # int, numpy integers; not 2.5, not "3"
    except TypeError:
        size = 0
    if isinstance(value, bool) or size < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}"[:200])
    return size


def _check_parameters(count: int, what: str) -> None:
    if count > MAX_PARAMETERS:
        raise ValueError(
            f"{what} would have {count:.3g} parameters ({count * 4 / 1e9:.3g} GB as float32), "
            f"more than the {MAX_PARAMETERS:.0e} trainwell builds; use smaller widths"
        )


def _allocate(build: Callable[[], T], count: int, what: str) -> T:
    """``build()``, with an out-of-memory error turned into one line naming the size."""
    try:
        return build()
    except (RuntimeError, MemoryError) as err:
        if isinstance(err, RuntimeError) and "alloc" not in str(err).lower():
            raise
        raise ValueError(
            f"{what}: not enough memory for its {count:.3g} parameters "
            f"({count * 4 / 1e9:.3g} GB as float32); use smaller widths"
        ) from None


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
        in_features = _check_size("the number of input features", in_features)
        out_features = _check_size("the number of outputs (classes)", out_features)
        hidden = [_check_size(f"model.hidden[{i}]", w) for i, w in enumerate(hidden)]
        rates = (
            [float(dropout)] * len(hidden) if isinstance(dropout, int | float) else list(dropout)
        )
        if len(rates) != len(hidden):
            raise ValueError(
                f"model.dropout needs one rate per hidden layer ({len(hidden)}), got {len(rates)}"
            )
        widths = [in_features, *hidden, out_features]
        count = sum((a + 1) * b for a, b in zip(widths, widths[1:], strict=False))
        what = f"model.hidden = {hidden} on {in_features} features"[:120]
        _check_parameters(count, what)

        def build() -> list[nn.Module]:
            layers: list[nn.Module] = []
            width = in_features
            for size, rate in zip(hidden, rates, strict=True):
                layers.append(nn.Linear(width, size))
                if NORMS[norm] is not None:
                    layers.append(NORMS[norm](size))
                layers += [ACTIVATIONS[activation](), _dropout(rate)]
                width = size
            layers.append(nn.Linear(width, out_features))
            return layers

        super().__init__(*_allocate(build, count, what))


class DigitsCNN(nn.Module):
    """A small CNN for the 8x8 digits images (input: 64 features, reshaped to 1x8x8).

    Example:
        >>> DigitsCNN(10)(torch.zeros(2, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(self, out_features: int = 10, channels: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        out_features = _check_size("the number of outputs (classes)", out_features)
        channels = _check_size("model.channels", channels)
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
