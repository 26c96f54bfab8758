"""The loop's progress when stdout is not a terminal: one plain line per epoch."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainwell import fit


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=16)


def test_a_plain_line_per_epoch_with_the_rows_values_when_not_a_tty(capsys):
    net = nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), 0.1)
    result = fit(net, _data(), _data(), opt, F.mse_loss, epochs=3, progress=True)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    for line, row in zip(lines, result.history, strict=True):
        assert line.startswith(f"epoch {row['epoch'] + 1}/3  ")
        assert f"train_loss {row['train_loss']:.4f}" in line
        assert f"val_loss {row['val_loss']:.4f}" in line


def test_no_line_without_progress(capsys):
    net = nn.Linear(3, 1)
    fit(net, _data(), None, torch.optim.SGD(net.parameters(), 0.1), F.mse_loss, epochs=2)
    assert capsys.readouterr().out == ""
