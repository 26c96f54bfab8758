"""A small transformer encoder on a generated token task, with a ``[task] step`` batch hook.

Demonstrates what to do when a batch is not an ``(inputs, target)`` pair: the datasets
yield dict items ``{"tokens": LongTensor (max_len,), "label": LongTensor ()}``, padded
with ``PAD`` to one length, and :func:`step` tells trainwell how to run such a batch
(``[task] step = "token_transformer.py:step"``). The config also uses a per-step
``OneCycleLR`` schedule and gradient clipping.

The task: each sequence holds filler tokens and exactly one ``A`` and one ``B`` at random
places; the label is 1 when ``A`` comes before ``B``. Bag-of-tokens models cannot solve
it (both orders hold the same tokens): the model has to use positions.

Run it::

    trainwell run examples/token_transformer.toml

Everything is generated from ``seed``: the same seed gives the same sequences.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

PAD, CLS, A, B = 0, 1, 2, 3
FIRST_FILLER = 4  # filler tokens are FIRST_FILLER .. vocab_size - 1


class TokenDataset(Dataset):
    """Padded token sequences and labels, served as dict items.

    ``targets`` (the labels as a list of ints) lets trainwell find the classes and
    stratify without running ``__getitem__``.
    """

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor) -> None:
        if tokens.dim() != 2 or labels.shape != tokens.shape[:1]:
            raise ValueError(
                f"tokens must be (N, max_len) and labels (N,), got {tuple(tokens.shape)} "
                f"and {tuple(labels.shape)}"
            )
        self.tokens, self.labels = tokens.long(), labels.long()
        self.targets = self.labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"tokens": self.tokens[index], "label": self.labels[index]}


def a_before_b(
    n: int, min_len: int = 8, max_len: int = 24, vocab_size: int = 16, seed: int = 0
) -> TokenDataset:
    """``n`` sequences of ``min_len`` to ``max_len`` tokens (right-padded with ``PAD``).

    Example:
        >>> data = a_before_b(4, max_len=10, seed=0)
        >>> item = data[0]
        >>> item["tokens"].shape, int((item["tokens"] == A).sum()), int((item["tokens"] == B).sum())
        (torch.Size([10]), 1, 1)
    """
    if not 2 <= min_len <= max_len:
        raise ValueError(f"need 2 <= min_len <= max_len, got {min_len} and {max_len}")
    if vocab_size <= FIRST_FILLER:
        raise ValueError(f"vocab_size must be greater than {FIRST_FILLER}, got {vocab_size}")
    g = torch.Generator().manual_seed(seed)
    tokens = torch.full((n, max_len), PAD, dtype=torch.long)
    labels = torch.arange(n) % 2
    labels = labels[torch.randperm(n, generator=g)]
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
    for i in range(n):
        length = int(lengths[i])
        seq = torch.randint(FIRST_FILLER, vocab_size, (length,), generator=g)
        first, second = torch.randperm(length, generator=g)[:2].sort().values.tolist()
        seq[first], seq[second] = (A, B) if labels[i] == 1 else (B, A)
        tokens[i, :length] = seq
    return TokenDataset(tokens, labels)


def make_datasets(
    n: int = 2000, min_len: int = 8, max_len: int = 24, vocab_size: int = 16, seed: int = 0
) -> tuple[TokenDataset, TokenDataset, TokenDataset]:
    """Train / val / test splits (70 / 15 / 15) of :func:`a_before_b`."""
    data = a_before_b(n, min_len, max_len, vocab_size, seed)
    n_val = n_test = round(0.15 * n)
    n_train = n - n_val - n_test
    cuts = [(0, n_train), (n_train, n_train + n_val), (n_train + n_val, n)]
    return tuple(TokenDataset(data.tokens[a:b], data.labels[a:b]) for a, b in cuts)  # type: ignore[return-value]


class TokenTransformer(nn.Module):
    """Token + learned positional embeddings, an ``nn.TransformerEncoder``, a ``CLS`` head.

    A ``CLS`` token is put in front of every sequence; its final state is classified.
    Padding (``pad_id``) is masked out of attention.

    Args:
        n_classes: number of classes (filled in by trainwell).
        vocab_size: number of token ids (``PAD``, ``CLS``, ``A``, ``B`` and fillers).
        max_len: longest sequence (without ``CLS``).
        d_model, nhead, num_layers, dim_feedforward, dropout: as in ``nn.TransformerEncoder``.
        pad_id: the padding token.

    Example:
        >>> net = TokenTransformer(2, vocab_size=16, max_len=10)
        >>> net(torch.tensor([[5, 2, 3, 0, 0, 0, 0, 0, 0, 0]])).shape
        torch.Size([1, 2])
    """

    def __init__(
        self,
        n_classes: int,
        vocab_size: int = 16,
        max_len: int = 24,
        d_model: int = 32,
        nhead: int = 4,
        num_layers: int = 2,
        dim_feedforward: int = 64,
        dropout: float = 0.1,
        pad_id: int = PAD,
    ) -> None:
        super().__init__()
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.position = nn.Embedding(max_len + 1, d_model)
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model))
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward, dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(
            layer, num_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False
        )
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length = tokens.shape
        if length + 1 > self.position.num_embeddings:
            raise ValueError(
                f"sequences of length {length} exceed max_len {self.position.num_embeddings - 1}"
            )
        h = torch.cat([self.cls.expand(batch, 1, -1), self.embed(tokens)], dim=1)
        h = h + self.position(torch.arange(length + 1, device=tokens.device))
        not_pad = torch.zeros_like(tokens[:, :1], dtype=torch.bool)  # CLS is never padding
        pad = torch.cat([not_pad, tokens == self.pad_id], dim=1)
        h = self.encoder(h, src_key_padding_mask=pad)
        return self.head(h[:, 0])


def step(
    model: nn.Module, batch: dict[str, torch.Tensor], loss_fn: Callable[..., torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """trainwell's batch hook: ``(loss, outputs, targets, n_items)`` of a dict batch.

    ``loss`` is the mean over the ``n_items`` sequences of the batch; ``outputs`` and
    ``targets`` are what the validation and test metrics (accuracy, NLL, ...) see.

    Example:
        >>> import torch.nn.functional as F
        >>> net = TokenTransformer(2, max_len=10)
        >>> batch = {"tokens": a_before_b(3, max_len=10).tokens, "label": torch.tensor([0, 1, 1])}
        >>> loss, outputs, targets, n = step(net, batch, F.cross_entropy)
        >>> outputs.shape, n
        (torch.Size([3, 2]), 3)
    """
    tokens: Any = batch["tokens"]
    labels = batch["label"]
    outputs = model(tokens)
    return loss_fn(outputs, labels), outputs, labels, labels.shape[0]
