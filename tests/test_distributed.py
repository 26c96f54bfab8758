"""Two real processes (torch.distributed, gloo on CPU) against single-process references.

One pair of worker processes (this file run as a script, rank 0 and rank 1, with a hard
timeout so a hang fails instead of blocking CI) runs every scenario and writes its
measurements to JSON; the tests compare them with references computed here in one process:

- DDP training through ``fit()`` and through ``runner.train`` equals one process with the
  same global batch (to 1e-5);
- ``Accumulator`` with k=4 and a partial last window: exactly one gradient all-reduce per
  optimizer step (counted by a DDP communication hook), gradients equal the full-batch one;
- clipping uses the global gradient (same factor on every rank); non-finite skipping agrees;
- early stopping inside ``fit()`` with rank-dependent validation stops both ranks together;
- a resumed 2-process run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from trainwell.app.data import EpochShuffleSampler
from trainwell.training.loop import fit

TIMEOUT_S = 90
N, D, C = 64, 6, 3
MICRO = {0: [2, 3, 2, 1, 2, 2, 3, 1, 2, 2], 1: [3, 1, 2, 2, 1, 2, 2, 2, 3, 1]}  # windows 4,4,2


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, D, generator=g), torch.randint(0, C, (N,), generator=g)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.Tanh(), torch.nn.Linear(16, C))


def _flat(model: torch.nn.Module) -> list[float]:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()


def _fit_run(batch: int, rank: int, world: int, ddp: bool) -> tuple[list[float], list]:
    from trainwell.gradients.transforms import chain, clip_by_norm, skip_nonfinite

    x, y = _data()
    model = _model()
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    sampler = EpochShuffleSampler(N, 1, rank, world)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, sampler=sampler)
    val = DataLoader(TensorDataset(x, y), batch_size=N)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    transforms = chain(skip_nonfinite(), clip_by_norm(0.5))
    result = fit(net, loader, val, opt, epochs=3, transforms=transforms)
    return _flat(model), [r["val_loss"] for r in result.history]


def _runner_config(epochs: int):
    from trainwell.app.config import RunConfig

    return RunConfig.model_validate(
        {"seed": 0, "epochs": epochs, "batch_size": 32,
         "data": {"source": "digits", "train_size": 192},
         "model": {"hidden": [16]},
         "optimizer": {"name": "sgd", "lr": 0.05},
         "gradients": {"accumulate": 2, "clip": {"mode": "norm", "max_norm": 1.0}},
         "checkpoint": {"enabled": True}}
    )  # fmt: skip


def _runner_weights(model: torch.nn.Module) -> list[float]:
    return _flat(model)


def _accumulation(rank: int) -> dict:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from trainwell.distributed import maybe_no_sync
    from trainwell.gradients.accumulation import Accumulator

    x, y = _data()
    model = _model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    calls = [0]

    def counting_hook(state, bucket):
        calls[0] += 1
        return default_hooks.allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(ddp, steps=4)
    reference = _model()
    # items of every rank: rank r's micro-batches come from its own half of the data
    starts = {r: r * N // 2 for r in (0, 1)}
    offsets = {r: [starts[r] + sum(MICRO[r][:i]) for i in range(len(MICRO[r]) + 1)] for r in (0, 1)}
    windows = [(0, 4), (4, 8), (8, 10)]
    per_step_calls, grad_errors = [], []
    for lo, hi in windows:
        idx = torch.cat([torch.arange(offsets[r][lo], offsets[r][hi]) for r in (0, 1)])
        reference.load_state_dict(model.state_dict())
        full = torch.autograd.grad(F.cross_entropy(reference(x[idx]), y[idx]),
                                   list(reference.parameters()))  # fmt: skip
        before = calls[0]
        for i in range(lo, hi):
            a, b = offsets[rank][i], offsets[rank][i + 1]
            last = i + 1 == len(MICRO[rank])
            # DDP decides at forward time whether backward syncs: forward under no_sync too
            with maybe_no_sync(ddp, skip_sync=i + 1 != hi):
                loss = F.cross_entropy(ddp(x[a:b]), y[a:b])
            due = acc.backward(loss, weight=b - a, last=last)
            assert due == (i + 1 == hi)
        per_step_calls.append(calls[0] - before)
        grad_errors.append(max(float((p.grad - g).abs().max())
                               for p, g in zip(model.parameters(), full, strict=True)))  # fmt: skip
        opt.step()
    # the same through fit(): 10 micro-batches per epoch, 2 epochs -> 6 steps
    calls[0] = 0
    sampler = EpochShuffleSampler(40, 2, rank, 2)
    loader = DataLoader(TensorDataset(x[:40], y[:40]), batch_size=2, sampler=sampler)
    fitted = fit(ddp, loader, None, opt, epochs=2, accumulator=Accumulator(ddp, steps=4))
    return {"per_step_calls": per_step_calls, "grad_errors": grad_errors,
            "fit_calls": calls[0], "fit_steps": fitted.steps}  # fmt: skip


def _clipping(rank: int) -> dict:
    from trainwell.gradients.transforms import clip_by_norm, skip_nonfinite

    x, y = _data()
    model = _model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    half = slice(rank * N // 2, (rank + 1) * N // 2)  # different data per rank
    local = torch.autograd.grad(F.cross_entropy(model(x[half]), y[half]), list(model.parameters()))
    local_norm = float(torch.cat([g.reshape(-1) for g in local]).norm())
    F.cross_entropy(ddp(x[half]), y[half]).backward()
    stats = clip_by_norm(0.1).apply_(list(model.parameters()))
    clipped = _flat_grads(model)
    # non-finite: plain (unsynced) model, only rank 1's gradient is NaN
    plain = _model()
    F.cross_entropy(plain(x[half]), y[half]).backward()
    if rank == 1:
        plain[0].weight.grad[0, 0] = float("nan")
    guard = skip_nonfinite()
    bad = guard.apply_(list(plain.parameters()))["skip"]
    plain.zero_grad()
    F.cross_entropy(plain(x[half]), y[half]).backward()
    good = guard.apply_(list(plain.parameters()))["skip"]
    return {"local_norm": local_norm, "norm": float(stats["grad_norm"]),
            "coef": float(stats["clip_coef"]), "grads": clipped,
            "skip_bad": bool(bad), "skip_good": bool(good)}  # fmt: skip


def _flat_grads(model: torch.nn.Module) -> list[float]:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).tolist()


def _early_stopping(rank: int) -> dict:
    from trainwell.stopping import EarlyStopping

    x, y = _data()
    model = _model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    loader = DataLoader(
        TensorDataset(x, y), batch_size=8, sampler=EpochShuffleSampler(N, 3, rank, 2)
    )
    # rank 1 validates on shuffled labels: its val loss soon rises, rank 0's keeps falling
    yv = y if rank == 0 else y[torch.randperm(N, generator=torch.Generator().manual_seed(5))]
    val = DataLoader(TensorDataset(x, yv), batch_size=N)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    result = fit(ddp, loader, val, opt, epochs=30, early_stopping=EarlyStopping(patience=2))
    return {"epochs": result.epochs_run, "reason": result.stop_reason,
            "val_loss": [r["val_loss"] for r in result.history]}  # fmt: skip


def worker(rank: int, port: int, out_dir: Path) -> None:
    from datetime import timedelta

    from trainwell.app.runner import train, write_run_dir

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    weights, val_losses = _fit_run(8, rank, 2, ddp=True)
    results: dict = {"fit": {"weights": weights, "val_loss": val_losses}}
    results["accumulation"] = _accumulation(rank)
    results["clipping"] = _clipping(rank)
    results["early_stopping"] = _early_stopping(rank)
    full, model = train(_runner_config(4), out_dir=out_dir / "full")
    results["runner"] = {"weights": _runner_weights(model), "extra": full.extra}
    write_run_dir(out_dir / f"written{rank}", _runner_config(4), full, model)  # rank 0 only
    train(_runner_config(2), out_dir=out_dir / "resumed")
    resumed, model = train(_runner_config(4), out_dir=out_dir / "resumed", resume=True)
    results["resumed"] = {"weights": _runner_weights(model), "epochs": resumed.epochs_run,
                          "steps": resumed.steps, "full_steps": full.steps}  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TEARDOWN_ABORT = "terminate called without an active exception"


def _aborted_at_exit(proc: subprocess.Popen, output: str, results: Path) -> bool:
    """A rank that wrote its results (its last step, after ``destroy_process_group``) and
    then aborted in C++ teardown at interpreter exit (SIGABRT, seen intermittently under a
    full suite with torch 2.13's gloo): its results are complete and checked below."""
    return proc.returncode == -6 and TEARDOWN_ABORT in output and results.is_file()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, Path]:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("ddp")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    env.pop("WORLD_SIZE", None)
    procs = [
        subprocess.Popen([sys.executable, __file__, str(r), str(port), str(out)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in (0, 1)
    ]  # fmt: skip
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        pytest.fail("a rank hung (a collective was not joined by every rank)")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, output) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0 or _aborted_at_exit(proc, output, out / f"rank{rank}.json"), (
            output
        )
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    return r0, r1, out


def _close(a: list[float], b: list[float], tol: float = 1e-5) -> bool:
    return torch.allclose(torch.tensor(a), torch.tensor(b), atol=tol, rtol=0)


def test_ddp_fit_equals_single_process_with_same_global_batch(ranks) -> None:
    r0, r1, _ = ranks
    weights, val_losses = _fit_run(16, 0, 1, ddp=False)  # 2 ranks x 8 = one process x 16
    assert _close(r0["fit"]["weights"], weights) and _close(r1["fit"]["weights"], weights)
    assert r0["fit"]["val_loss"] == r1["fit"]["val_loss"]
    assert _close(r0["fit"]["val_loss"], val_losses)
    # the reference is sensitive: a different global batch gives other weights
    assert not _close(_fit_run(8, 0, 1, ddp=False)[0], weights)


def test_runner_ddp_equals_single_process_and_states_global_batch(ranks, tmp_path) -> None:
    from trainwell.app.runner import train

    r0, r1, out = ranks
    _, model = train(_runner_config(4), out_dir=tmp_path)
    assert _close(r0["runner"]["weights"], _runner_weights(model))
    assert r0["runner"]["weights"] == r1["runner"]["weights"]
    extra = r0["runner"]["extra"]
    assert extra["processes"] == 2 and extra["global_batch_size"] == 32
    assert extra["batch_size_per_process"] == 16 and extra["lr"] == 0.05
    summary = json.loads((out / "written0" / "summary.json").read_text())
    assert summary["extra"]["processes"] == 2
    assert not (out / "written1").exists()  # only rank 0 writes


def test_accumulation_one_all_reduce_per_step_and_full_batch_gradient(ranks) -> None:
    for r in ranks[:2]:
        acc = r["accumulation"]
        assert acc["per_step_calls"] == [1, 1, 1]  # incl. the partial last window (2 micro)
        assert max(acc["grad_errors"]) < 1e-6
        assert acc["fit_steps"] == 6 and acc["fit_calls"] == acc["fit_steps"]


def test_clipping_and_nonfinite_skipping_agree_across_ranks(ranks) -> None:
    r0, r1, _ = ranks
    c0, c1 = r0["clipping"], r1["clipping"]
    assert c0["local_norm"] != c1["local_norm"]  # the ranks' own gradients differ ...
    assert c0["norm"] == c1["norm"] and c0["coef"] == c1["coef"] < 1  # ... the clip does not
    assert c0["grads"] == c1["grads"]
    # reference: the full-batch gradient (both halves) clipped by torch
    x, y = _data()
    model = _model()
    F.cross_entropy(model(x), y).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    assert abs(float(norm) - c0["norm"]) < 1e-5
    assert _close(c0["grads"], _flat_grads(model))
    assert c0["skip_bad"] and c1["skip_bad"]  # only rank 1 saw the NaN
    assert not c0["skip_good"] and not c1["skip_good"]


def test_early_stopping_in_fit_stops_every_rank_at_the_same_epoch(ranks) -> None:
    e0, e1 = ranks[0]["early_stopping"], ranks[1]["early_stopping"]
    assert e0 == e1
    assert e0["epochs"] < 30 and e0["reason"] != "max_epochs"


def test_resumed_two_process_run_matches_uninterrupted(ranks) -> None:
    for r in ranks[:2]:
        assert r["resumed"]["epochs"] == 4
        assert r["resumed"]["steps"] == r["resumed"]["full_steps"]
        assert _close(r["resumed"]["weights"], r["runner"]["weights"], 1e-6)
    out = ranks[2]
    assert (out / "resumed" / "checkpoints").is_dir()


def test_cli_nproc_two_runs_and_states_processes(tmp_path) -> None:
    root = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    config = str(root / "examples" / "ddp.toml")
    cmd = [sys.executable, "-m", "trainwell", "run", config, "--nproc", "2", "--quiet",
           "--out", str(tmp_path / "run"), "--set", "epochs=2"]  # fmt: skip
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail("trainwell run --nproc 2 hung")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("processes") == 1  # rank 0 alone prints its table
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["extra"]["processes"] == 2


def test_sharded_sampler_splits_each_global_batch_across_ranks() -> None:
    for n, world in [(64, 2), (10, 3), (7, 4)]:
        full = list(EpochShuffleSampler(n, seed=4))
        shards = [list(EpochShuffleSampler(n, 4, r, world)) for r in range(world)]
        assert len({len(s) for s in shards}) == 1 == len({len(EpochShuffleSampler(n, 4, r, world))
                                                        for r in range(world)})  # fmt: skip
        assert set().union(*shards) == set(range(n))  # padding repeats, never drops
        per_rank = len(shards[0])
        for j in range(per_rank):  # position j of every rank = consecutive global positions
            got = [shards[r][j] for r in range(world)]
            want = (full * 2)[j * world : (j + 1) * world]
            assert got == want
    a = EpochShuffleSampler(16, 0, 1, 2)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first  # reseeded per epoch


def test_bad_arguments_are_rejected() -> None:
    from trainwell.app.launch import env_world_size, torchrun_command

    with pytest.raises(ValueError, match="rank must be in"):
        EpochShuffleSampler(10, 0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="nproc must be a positive integer"):
        torchrun_command(0, ["run"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORLD_SIZE", "two")
        with pytest.raises(ValueError, match="WORLD_SIZE must be an integer"):
            env_world_size()


def test_cli_nproc_must_divide_the_global_batch(tmp_path) -> None:
    from typer.testing import CliRunner

    from trainwell.cli import app

    root = Path(__file__).parents[1]
    config = str(root / "examples" / "ddp.toml")
    result = CliRunner().invoke(app, ["run", config, "--nproc", "3", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "must be divisible by --nproc 3" in result.output


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
