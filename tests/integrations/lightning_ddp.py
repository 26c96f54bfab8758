"""Run trainwell's Lightning callbacks under ``strategy="ddp"`` on 2 CPU processes (gloo).

``python lightning_ddp.py OUT`` writes ``OUT.rank0.json`` and ``OUT.rank1.json``. Lightning
starts rank 1 by running this same command again, which is why the test runs it as a
script (and not inside pytest). Rank 1 plants a NaN loss at epoch 0, batch 1; each rank
reports a scripted ``val_loss`` (``VAL_LOSSES[rank]``) without ``sync_dist``, so the
stopping decision must come from their mean.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

#: Per-rank validation losses. Rank 0 alone stops at epoch 3 (patience 2), their mean at 4.
VAL_LOSSES = [
    [1.0, 0.5, 0.75, 0.75, 0.75, 0.75, 0.75],
    [1.0, 0.5, 0.125, 0.125, 0.125, 0.125, 0.125],
]


def main(out: Path) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from lightning_models import Regression, make_loader, quiet_trainer

    import trainwell.integrations.lightning as tl
    from trainwell import EarlyStopping, GradMonitor, Regularizer
    from trainwell.gradients import chain, clip_by_norm, skip_nonfinite

    torch.set_num_threads(1)
    module = Regression("adam", lr=0.05, val_losses=VAL_LOSSES)
    transforms = tl.GradientTransformCallback(chain(skip_nonfinite(), clip_by_norm(1.0)))
    monitor = tl.GradMonitorCallback(GradMonitor(module, every=1))
    ema = tl.EMACallback(decay=0.9)
    stopping = tl.EarlyStoppingCallback(EarlyStopping("val_loss", patience=2))
    callbacks = [ema, stopping, transforms, monitor, tl.RegularizerCallback(Regularizer(l2=1e-3))]
    trainer = quiet_trainer(
        max_epochs=len(VAL_LOSSES[0]), strategy="ddp", devices=2, callbacks=callbacks
    )
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    if rank == 1:
        module.nan_batches = {(0, 1)}
    trainer.fit(module, make_loader(), make_loader(8))
    opt = trainer.optimizers[0]
    steps = sorted({int(opt.state[p]["step"]) for g in opt.param_groups for p in g["params"]})
    flat = torch.cat([p.detach().flatten() for p in module.parameters()]).tolist()
    ema_flat = torch.cat([p.flatten() for p in ema.ema.module.parameters()]).tolist()
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "last_epoch": module.epochs_seen[-1],
        "global_step": trainer.global_step,
        "skipped_steps": transforms.skipped_steps,
        "adam_steps": steps,
        "monitor_rows": len(monitor.monitor.history),
        "weights": flat,
        "ema": ema_flat,
    }
    Path(f"{out}.rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
