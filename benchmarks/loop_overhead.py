"""fit() against a hand-written loop doing the same arithmetic on the digits MLP.

One process, interleaved, several repetitions; prints the median ratio
fit()/hand-written (target: at most 1.05). If PyTorch Lightning is importable (an
optional benchmark dependency, never a runtime one), its Trainer is timed on the same
work and Lightning/hand-written is printed too.

    .venv/bin/python benchmarks/loop_overhead.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from trainwell import fit
from trainwell.app.data import load_splits
from trainwell.app.models import MLP

EPOCHS, REPS = 5, 7


def setup(splits):
    torch.manual_seed(0)
    model = MLP(64, 10, hidden=(256, 256))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def hand_written(splits, loader) -> float:
    model, opt = setup(splits)
    start = time.perf_counter()
    for epoch in range(EPOCHS):
        loader.sampler.set_epoch(epoch)
        model.train()
        loss_sum, items = torch.zeros(()), 0
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            loss_sum += loss.detach() * len(y)
            items += len(y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _ = float(loss_sum) / items
    return time.perf_counter() - start


def with_fit(splits, loader) -> float:
    model, opt = setup(splits)
    start = time.perf_counter()
    fit(model, loader, None, opt, epochs=EPOCHS)
    return time.perf_counter() - start


def with_lightning(splits, loader) -> float | None:
    try:
        import lightning.pytorch as pl
    except ImportError:
        try:
            import pytorch_lightning as pl
        except ImportError:
            return None
    model, opt = setup(splits)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model

        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return opt

    trainer = pl.Trainer(
        max_epochs=EPOCHS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(Module(), loader)
    return time.perf_counter() - start


def main() -> None:
    torch.set_num_threads(1)
    splits = load_splits("digits", seed=0)
    loader = splits.loader("train", 64, shuffle=True, seed=0)
    times: dict[str, list[float]] = {"hand": [], "fit": [], "lightning": []}
    for _ in range(REPS):
        times["hand"].append(hand_written(splits, loader))
        times["fit"].append(with_fit(splits, loader))
        lightning = with_lightning(splits, loader)
        if lightning is not None:
            times["lightning"].append(lightning)
    hand = statistics.median(times["hand"])
    print(f"digits MLP 64-256-256-10, {EPOCHS} epochs, {len(loader)} steps/epoch, {REPS} reps")
    print(f"hand-written: {hand * 1e3:8.1f} ms")
    print(f"fit():        {statistics.median(times['fit']) * 1e3:8.1f} ms")
    ratios = [f / h for f, h in zip(times["fit"], times["hand"], strict=True)]
    print(f"fit()/hand-written (median of paired ratios): {statistics.median(ratios):.3f}")
    if times["lightning"]:
        ratios = [f / h for f, h in zip(times["lightning"], times["hand"], strict=True)]
        print(f"Lightning/hand-written: {statistics.median(ratios):.3f}")
    else:
        print("Lightning/hand-written: not measured (lightning is not installed)")


if __name__ == "__main__":
    main()
