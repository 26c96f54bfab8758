"""Two real processes (torch.distributed, gloo on CPU): ranks that see different metrics stop
together, at the step the averaged metric dictates, and nobody hangs.

The test launches this file twice as a script (rank 0 and rank 1) with a hard timeout, so a
hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from trainwell import EarlyStopping

# rank 0 stalls early (alone it would stop at step 3), rank 1 keeps improving (never stops)
SEQUENCES = {
    0: [1.0, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4],
    1: [1.0, 0.9, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3],
}
NAN_ON_RANK_1 = {0: [1.0, 0.9, 0.8, 0.7], 1: [1.0, 0.9, float("nan"), 0.7]}
TIMEOUT_S = 120


def _run(stopper: EarlyStopping, values: list[float]) -> dict:
    step = None
    for step, v in enumerate(values):
        if stopper({"val_loss": v, "rank_only": float(step)}, step=step):
            break
    return {"stop": step if stopper.stopped else None, "reason": stopper.reason,
            "best": stopper.best, "best_step": stopper.best_step}  # fmt: skip


def worker(rank: int, port: int, out_dir: Path) -> None:
    from datetime import timedelta

    from trainwell import CheckpointManager

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    results = {
        "synced": _run(EarlyStopping(patience=2), SEQUENCES[rank]),
        "local": _run(EarlyStopping(patience=2, sync=False), SEQUENCES[rank]),
        "nan": _run(EarlyStopping(patience=2), NAN_ON_RANK_1[rank]),
        # misconfigured ranks (different patience): the reduced decision still agrees
        "mismatch": _run(EarlyStopping(patience=1 if rank == 0 else 5), SEQUENCES[rank]),
    }
    own = CheckpointManager(out_dir / f"rank{rank}", keep_last=1)  # per-rank directories
    results["wrote"] = own.save({"rank": rank}, 3).exists()
    manager = CheckpointManager(out_dir / "checkpoints", keep_last=1)
    manager.save({"rank": rank}, 3, {"val_loss": 0.5})
    dist.barrier()
    results["latest"] = str(manager.latest())
    dist.barrier()
    dist.destroy_process_group()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_with_different_metrics_stop_together(tmp_path: Path) -> None:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(rank), str(port), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        pytest.fail("a rank hung: the stop decision was not shared")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))

    # reference: one process judging the rank-averaged metric
    mean = [(a + b) / 2 for a, b in zip(SEQUENCES[0], SEQUENCES[1], strict=True)]
    expected = _run(EarlyStopping(patience=2), mean)
    assert r0["synced"] == r1["synced"] == expected
    assert expected["stop"] is not None
    # without sync the ranks disagree: this is what would hang a DDP job
    assert r0["local"]["stop"] != r1["local"]["stop"]
    assert r0["local"]["stop"] != expected["stop"]
    # a NaN on one rank stops both at that step
    assert r0["nan"]["stop"] == r1["nan"]["stop"] == 2
    assert r0["nan"]["reason"] == r1["nan"]["reason"] == "val_loss is nan"
    # the decision itself is reduced: the rank with more patience stops with the other
    assert r0["mismatch"]["stop"] == r1["mismatch"]["stop"]
    assert r1["mismatch"]["reason"] == "another rank decided to stop"
    # checkpoints: only rank 0 writes, both ranks see the same file
    assert r0["wrote"] and not r1["wrote"]
    assert not (tmp_path / "rank1").exists()
    assert r0["latest"] == r1["latest"] != "None"


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
