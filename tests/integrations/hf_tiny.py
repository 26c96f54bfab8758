"""A tiny BERT classifier built from a config and generated token data, for the HF tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

VOCAB, LENGTH = 50, 8


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    """A 2-layer BERT with hidden size 16 and no dropout (so runs are deterministic)."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=LENGTH,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


class TokenData(torch.utils.data.Dataset):
    """``n`` random sequences; the label says whether token 1 occurs more often than token 2.

    ``flip=True`` inverts the labels: training on the normal data makes its loss worse.
    """

    def __init__(self, n: int, seed: int, flip: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
        labels = ((self.ids == 1).sum(1) >= (self.ids == 2).sum(1)).long()
        self.ids[:, 0] = torch.where(labels == 1, 3, 4)  # an easy cue to learn
        self.labels = 1 - labels if flip else labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def arguments(output_dir: Path, **overrides: Any) -> TrainingArguments:
    """CPU, no reporting, no progress bars, a constant learning rate unless overridden."""
    options: dict[str, Any] = {
        "output_dir": str(output_dir),
        "use_cpu": True,
        "report_to": "none",
        "disable_tqdm": True,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 32,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "constant",
        "max_steps": 6,
        "logging_strategy": "no",
        "save_strategy": "no",
        "eval_strategy": "no",
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    options.update(overrides)
    return TrainingArguments(**options)
