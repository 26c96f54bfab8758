"""fit() against a hand-written loop doing the same arithmetic on the digits MLP.

One process, interleaved, several repetitions; prints the median ratio
fit()/hand-written (target: at most 1.05) with its min-max over the repetitions. Also
timed: ``fit(step=supervised_step)`` (the default step passed explicitly) against the same
hand-written loop, and a dict-batch model (a Dataset yielding ``{"x": ..., "y": ...}``)
trained by ``fit(step=dict_step)`` against a hand-written loop over the same dict batches.
If PyTorch Lightning is importable (an optional benchmark dependency, never a runtime
one), its Trainer is timed on the same work and Lightning/hand-written is printed too.

    .venv/bin/python benchmarks/loop_overhead.py [reps]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from trainwell import StepOutput, fit, supervised_step
from trainwell.app.data import EpochShuffleSampler, load_splits
from trainwell.app.models import MLP

EPOCHS, REPS = 5, 7


def setup(splits):
    torch.manual_seed(0)
    model = MLP(64, 10, hidden=(256, 256))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


class DictDataset(Dataset):
    """The same items as a ``TensorDataset``, as ``{"x": features, "y": label}``."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.base[i]
        return {"x": x, "y": y}


def dict_step(model, batch, loss_fn) -> StepOutput:
    outputs = model(batch["x"])
    return StepOutput(loss_fn(outputs, batch["y"]), outputs, batch["y"], len(batch["y"]))


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


def hand_written_dict(splits, loader) -> float:
    model, opt = setup(splits)
    start = time.perf_counter()
    for epoch in range(EPOCHS):
        loader.sampler.set_epoch(epoch)
        model.train()
        loss_sum, items = torch.zeros(()), 0
        for batch in loader:
            x, y = batch["x"], batch["y"]
            loss = F.cross_entropy(model(x), y)
            loss_sum += loss.detach() * len(y)
            items += len(y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _ = float(loss_sum) / items
    return time.perf_counter() - start


def with_fit(splits, loader, **kwargs) -> float:
    model, opt = setup(splits)
    start = time.perf_counter()
    fit(model, loader, None, opt, epochs=EPOCHS, **kwargs)
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


def ratio_line(label: str, num: list[float], den: list[float]) -> str:
    ratios = [a / b for a, b in zip(num, den, strict=True)]
    return (
        f"{label:<40} median {statistics.median(ratios):.3f}  "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f})"
    )


def main() -> None:
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else REPS
    torch.set_num_threads(1)
    splits = load_splits("digits", seed=0)
    loader = splits.loader("train", 64, shuffle=True, seed=0)
    dict_loader = DataLoader(
        DictDataset(splits.dataset("train")),
        batch_size=64,
        sampler=EpochShuffleSampler(len(loader.dataset), 0),
    )
    names = ("hand", "fit", "fit_step", "hand_dict", "fit_dict", "lightning")
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(reps):  # interleaved: every variant once per repetition
        times["hand"].append(hand_written(splits, loader))
        times["fit"].append(with_fit(splits, loader))
        times["fit_step"].append(with_fit(splits, loader, step=supervised_step))
        times["hand_dict"].append(hand_written_dict(splits, dict_loader))
        times["fit_dict"].append(with_fit(splits, dict_loader, step=dict_step))
        lightning = with_lightning(splits, loader)
        if lightning is not None:
            times["lightning"].append(lightning)
    print(f"digits MLP 64-256-256-10, {EPOCHS} epochs, {len(loader)} steps/epoch, {reps} reps")
    for name, label in (
        ("hand", "hand-written (x, y):"),
        ("fit", "fit():"),
        ("fit_step", "fit(step=supervised_step):"),
        ("hand_dict", "hand-written dict batches:"),
        ("fit_dict", "fit(step=dict_step) dict batches:"),
    ):
        print(f"{label:<36} {statistics.median(times[name]) * 1e3:8.1f} ms (median)")
    print("paired ratios over interleaved reps:")
    print(ratio_line("fit()/hand-written:", times["fit"], times["hand"]))
    print(ratio_line("fit(step=supervised_step)/hand-written:", times["fit_step"], times["hand"]))
    print(
        ratio_line("fit(step=dict_step)/hand-written dict:", times["fit_dict"], times["hand_dict"])
    )
    if times["lightning"]:
        print(ratio_line("Lightning/hand-written:", times["lightning"], times["hand"]))
    else:
        print("Lightning/hand-written: not measured (lightning is not installed)")


if __name__ == "__main__":
    main()
