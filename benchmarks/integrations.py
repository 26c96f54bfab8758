"""The time per optimizer step that each trainwell callback adds to a Lightning and a
Hugging Face ``Trainer`` step on a small model (target: under 5% with the defaults).

Lightning: a 64-256-256-10 MLP (digits-sized, batch 64, Adam, 32 steps an epoch plus a
small validation pass); HF: a 2-layer BERT (hidden 64, sequences of 32 tokens, batch 16,
AdamW) built from a config. Every configuration runs the same Trainer with a timing
callback (process CPU time, which scheduling noise on a shared machine moves less);
the first epoch (Lightning) or the first steps (HF) are warm-up and not timed, and
every configuration runs once untimed before the timed repetitions.
Configurations are interleaved over repetitions and the median time per step is
compared with the median of the plain Trainer in the same run. The gradient transform
(``chain(skip_nonfinite(), clip_by_norm(1.0))``) does the work of the Trainer's own
clipping plus the non-finite guard: the Trainer clipping to norm 1 is shown as a
reference, and so is an empty callback (what the Trainer's dispatch of any callback's
hooks costs). CPU, one thread.

    .venv/bin/python benchmarks/integrations.py [reps]
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainwell import EarlyStopping, GradMonitor, Regularizer
from trainwell.gradients import chain, clip_by_norm, skip_nonfinite
from trainwell.regularization import DropoutSchedule

REPS = 5
TARGET = 1.05


def report(title: str, times: dict[str, list[float]]) -> None:
    """Median microseconds per step and the ratio to the plain Trainer; the gradient
    transform is judged against the Trainer's own clipping, whose work it also does."""
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["plain Trainer"]
    clipping = next(v for k, v in medians.items() if k.startswith("(reference) ") and "=1" in k)
    print(f"\n{title}: median time per optimizer step over {len(times['plain Trainer'])} reps")
    for name, median in medians.items():
        ratio, note = median / base, ""
        if name == "GradientTransformCallback":
            ratio, note = median / clipping, " (vs the Trainer's own clipping)"
        plain = name == "plain Trainer" or name.startswith("(reference)")
        verdict = "" if plain else ("  ok" if ratio <= TARGET else "  OVER")
        print(f"  {name:36s} {median * 1e6:9.0f} us   x{ratio:.3f}{verdict}{note}")


def interleaved(runs: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # warm-up: imports, allocator, first-call paths
        run()
    for _ in range(reps):
        for name, run in runs.items():
            times[name].append(run())
    return times


# ----------------------------------------------------------------------------- Lightning
def lightning_runs() -> dict[str, Callable[[], float]]:
    import lightning as L

    from trainwell.integrations import lightning as tw

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2048, 64, generator=g), torch.randint(0, 10, (2048,), generator=g)
    train = DataLoader(TensorDataset(x, y), batch_size=64)
    val = DataLoader(TensorDataset(x[:256], y[:256]), batch_size=256)

    class MLP(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.1),
                nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10),
            )  # fmt: skip

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def validation_step(self, batch: Any, _: int) -> None:
            self.log("val_loss", F.cross_entropy(self.net(batch[0]), batch[1]))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    class Timer(L.Callback):
        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            if trainer.current_epoch == 1:
                self.t0, self.s0 = time.process_time(), trainer.global_step

        def on_train_end(self, trainer: Any, module: Any) -> None:
            self.per_step = (time.process_time() - self.t0) / (trainer.global_step - self.s0)

    def run(
        make: Callable[[nn.Module], list[Any]], clip: float | None = None
    ) -> Callable[[], float]:
        def once() -> float:
            torch.manual_seed(0)
            module, timer = MLP(), Timer()
            trainer = L.Trainer(
                max_epochs=6, accelerator="cpu", devices=1, logger=False, gradient_clip_val=clip,
                enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0,
                callbacks=[*make(module.net), timer],
            )  # fmt: skip
            trainer.fit(module, train, val)
            return timer.per_step

        return once

    steps = 6 * len(train)
    clip = chain(skip_nonfinite(), clip_by_norm(1.0))
    return {
        "plain Trainer": run(lambda net: []),
        "(reference) an empty Callback": run(lambda net: [L.Callback()]),
        "(reference) gradient_clip_val=1": run(lambda net: [], clip=1.0),
        "GradientTransformCallback": run(lambda net: [tw.GradientTransformCallback(clip)]),
        "RegularizerCallback (l2)": run(lambda net: [tw.RegularizerCallback(Regularizer(l2=1e-4))]),
        "GradMonitorCallback (every 50)": run(
            lambda net: [tw.GradMonitorCallback(GradMonitor(net))]
        ),
        "EMACallback": run(lambda net: [tw.EMACallback(0.999)]),
        "EarlyStoppingCallback": run(lambda net: [tw.EarlyStoppingCallback(EarlyStopping())]),
        "DropoutScheduleCallback": run(
            lambda net: [
                tw.DropoutScheduleCallback(DropoutSchedule(net, "linear", 0.1, total=steps))
            ]
        ),
    }


# ----------------------------------------------------------------------------------- HF
def hf_runs(folder: str) -> dict[str, Callable[[], float]]:
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from trainwell.integrations import hf as tw

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 500, (2400, 32), generator=g)
    labels = (ids[:, 0] % 2).long()

    class Tokens(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": ids[i], "labels": labels[i]}

    class Timer(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 5:
                self.t0, self.s0 = time.process_time(), state.global_step

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.per_step = (time.process_time() - self.t0) / (state.global_step - self.s0)

    config = BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=128,
                        max_position_embeddings=32, num_labels=2)  # fmt: skip

    def run(make: Callable[[], list[Any]], clip: float = 0.0) -> Callable[[], float]:
        def once() -> float:
            torch.manual_seed(0)
            timer = Timer()
            args = TrainingArguments(
                folder, use_cpu=True, report_to="none", disable_tqdm=True, max_steps=150,
                per_device_train_batch_size=16, logging_strategy="no", save_strategy="no",
                eval_strategy="no", max_grad_norm=clip, dataloader_num_workers=0,
            )  # fmt: skip
            trainer = Trainer(model=BertForSequenceClassification(config), args=args,
                              train_dataset=Tokens(), callbacks=[*make(), timer])  # fmt: skip
            with contextlib.redirect_stdout(io.StringIO()):  # its final metrics line
                trainer.train()
            return timer.per_step

        return once

    return {
        "plain Trainer": run(lambda: []),
        "(reference) an empty TrainerCallback": run(lambda: [TrainerCallback()]),
        "(reference) max_grad_norm=1": run(lambda: [], clip=1.0),
        "GradientTransformCallback": run(
            lambda: [tw.GradientTransformCallback(chain(skip_nonfinite(), clip_by_norm(1.0)))]
        ),
        "GradMonitorCallback (every 50)": run(lambda: [tw.GradMonitorCallback()]),
        "EMACallback": run(lambda: [tw.EMACallback(0.999)]),
        "StoppingCallback": run(lambda: [tw.StoppingCallback(EarlyStopping())]),
    }


def main() -> None:
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else REPS
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    report("Lightning (MLP 64-256-256-10, batch 64)", interleaved(lightning_runs(), reps))
    with tempfile.TemporaryDirectory() as folder:
        report("HF Trainer (BERT 2x64, batch 16x32)", interleaved(hf_runs(folder), reps))


if __name__ == "__main__":
    main()
