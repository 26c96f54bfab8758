import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from trainwell.app.config_files import load_config
from trainwell.app.data import load_splits
from trainwell.app.ensemble_runner import bootstrap, train_ensemble
from trainwell.cli import app

TINY = ["data.source=wine", "epochs=4", "model.hidden=[16]", "ensemble.members=3"]


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("diversity", ["seeds", "bagging", "snapshot"])
def test_members_differ_and_the_ensemble_is_scored(diversity):
    cfg = load_config(None, [*TINY, f"ensemble.diversity={diversity}"])
    result = train_ensemble(cfg)
    assert len(result.members) == 3
    flat = [params(m) for m in result.members]
    assert not torch.equal(flat[0], flat[1]) and not torch.equal(flat[1], flat[2])
    report = result.report
    assert {"acc", "nll", "ece", "brier", "nll_ts", "ece_ts"} <= set(report["ensemble"])
    # the ensemble's NLL is at most the mean member NLL (mean_prob: convexity of -log)
    assert report["ensemble"]["nll"] <= report["members_mean"]["nll"] + 1e-9


def test_bootstrap_resamples_the_training_split_only():
    splits = load_splits("wine", seed=0)
    boot = bootstrap(splits, seed=1)
    assert len(boot.y_train) == len(splits.y_train)
    rows = {tuple(r) for r in boot.x_train.round(8)}
    assert len(rows) < len(splits.y_train)  # drawn with replacement: duplicates
    np.testing.assert_array_equal(boot.x_test, splits.x_test)


def test_parallel_jobs_give_the_same_members():
    cfg = load_config(None, TINY)
    one, two = train_ensemble(cfg, jobs=1), train_ensemble(cfg, jobs=2)
    for a, b in zip(one.members, two.members, strict=True):
        assert torch.equal(params(a), params(b))


def test_trainwell_run_with_an_ensemble_section_writes_its_files(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("")
    out = tmp_path / "run"
    sets = [a for s in TINY for a in ("--set", s)]
    result = CliRunner().invoke(app, ["run", str(cfg), "--out", str(out), "-q", *sets])
    assert result.exit_code == 0, result.output
    for name in ("summary.json", "ensemble_members.csv", "reliability.png", "ensemble.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["ensemble"]["members"]) == 3
