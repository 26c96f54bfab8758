"""A 1-D CNN classifying noisy waveforms: your own model and data in a trainwell config.

Demonstrates ``[model] target`` / ``[data] target`` pointing at this file: a ``Conv1d``
network with global average pooling (``Conv1dNet``) learns to tell four waveform shapes
apart -- sine, square, sawtooth and triangle -- of random frequency, phase, amplitude and
offset, buried in Gaussian noise. Items are ``(channels, length)`` float32 tensors, the way
``nn.Conv1d`` wants them; ``input_shape`` and ``n_classes`` are filled in from the data.
The config also switches on early stopping and carries an ``[ablation]`` section (L2 and
dropout strengths, crossed with a smaller training set).

Run it::

    trainwell run examples/sequence_cnn.toml
    trainwell ablate examples/sequence_cnn.toml --jobs 2

Everything is generated from ``seed``: the same seed gives the same data and the same split.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import TensorDataset

WAVES = ("sine", "square", "sawtooth", "triangle")


def waveform(kind: int, t: torch.Tensor) -> torch.Tensor:
    """The clean waveform ``WAVES[kind]`` at phases ``t`` (in cycles), values in [-1, 1].

    Example:
        >>> waveform(1, torch.tensor([0.25, 0.75])).tolist()  # square
        [1.0, -1.0]
    """
    frac = torch.remainder(t, 1.0)
    if kind == 0:
        return torch.sin(2 * math.pi * t)
    if kind == 1:
        return torch.where(frac < 0.5, 1.0, -1.0)
    if kind == 2:
        return 2 * frac - 1
    if kind == 3:
        return 1 - 4 * torch.abs(frac - 0.5)
    raise ValueError(f"kind must be in [0, {len(WAVES)}), got {kind}")


def make_waves(
    n: int, length: int = 128, channels: int = 1, noise: float = 0.5, seed: int = 0
) -> TensorDataset:
    """``n`` noisy waveforms of shape ``(channels, length)`` and their class (``WAVES`` index).

    Each item draws a frequency of 2 to 8 cycles per window, a phase, an amplitude of 0.5
    to 1.5 and an offset; every channel is the same wave seen by another sensor (its own
    gain and noise). Classes are balanced (``i % 4``) and shuffled.
    """
    if n < len(WAVES):
        raise ValueError(f"n must be at least {len(WAVES)} (one item per class), got {n}")
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(WAVES)
    labels = labels[torch.randperm(n, generator=g)]
    grid = torch.arange(length, dtype=torch.float32) / length
    freq = 2 + 6 * torch.rand(n, 1, generator=g)
    phase = torch.rand(n, 1, generator=g)
    amp = 0.5 + torch.rand(n, 1, 1, generator=g)
    offset = 0.3 * torch.randn(n, 1, 1, generator=g)
    t = freq * grid + phase
    clean = torch.stack([waveform(int(k), t[i]) for i, k in enumerate(labels)])
    gain = 1 + 0.2 * torch.randn(n, channels, 1, generator=g)
    x = amp * gain * clean[:, None, :] + offset
    x = x + noise * torch.randn(n, channels, length, generator=g)
    return TensorDataset(x.float(), labels.long())


def make_datasets(
    n: int = 1200, length: int = 128, channels: int = 1, noise: float = 0.5, seed: int = 0
) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Train / val / test splits (70 / 15 / 15) of :func:`make_waves`.

    Example:
        >>> train, val, test = make_datasets(n=40, length=32, seed=0)
        >>> len(train), len(val), len(test), tuple(train[0][0].shape)
        (28, 6, 6, (1, 32))
    """
    x, y = make_waves(n, length, channels, noise, seed).tensors
    n_val = n_test = round(0.15 * n)
    n_train = n - n_val - n_test
    return (
        TensorDataset(x[:n_train], y[:n_train]),
        TensorDataset(x[n_train : n_train + n_val], y[n_train : n_train + n_val]),
        TensorDataset(x[n_train + n_val :], y[n_train + n_val :]),
    )


class Conv1dNet(nn.Module):
    """Conv1d -> BatchNorm -> ReLU -> MaxPool blocks, global average pooling, a linear head.

    Args:
        input_shape: ``(channels, length)`` of one item (filled in by trainwell).
        n_classes: number of classes (filled in by trainwell).
        channels: feature maps of the first block; each later block doubles them.
        depth: number of convolution blocks.
        kernel_size: odd convolution width ("same" padding).
        dropout: rate of the ``nn.Dropout`` before the head (``dropout.p`` overrides it).

    Example:
        >>> net = Conv1dNet((2, 64), 4, channels=8)
        >>> net(torch.zeros(5, 2, 64)).shape
        torch.Size([5, 4])
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        n_classes: int,
        channels: int = 32,
        depth: int = 3,
        kernel_size: int = 7,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if len(input_shape) != 2:
            raise ValueError(
                f"input_shape must be (channels, length) for Conv1d, got {tuple(input_shape)}"
            )
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        blocks: list[nn.Module] = []
        width = input_shape[0]
        for i in range(depth):
            out = channels * 2**i
            blocks += [
                nn.Conv1d(width, out, kernel_size, padding=kernel_size // 2, bias=False),
                nn.BatchNorm1d(out),
                nn.ReLU(),
                nn.MaxPool1d(2),
            ]
            width = out
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.features(x)).flatten(1)
        return self.head(self.dropout(h))
