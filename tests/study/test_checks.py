"""Checking a study before it trains: every run's config, deduplicated and capped problems,
the user's code, and nothing written when the study is refused."""

from __future__ import annotations

import pytest

from trainwell.app.config import ConfigError
from trainwell.study.api import ablate
from trainwell.study.checks import MAX_PROBLEMS, check_study

TINY = {"epochs": 2, "batch_size": 32, "data": {"train_size": 120}, "model": {"hidden": [16]}}


def _raw(ablation: dict, **extra) -> dict:
    return {**TINY, **extra, "ablation": ablation}


def _lines(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        check_study(raw)
    return str(caught.value).splitlines()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            _raw({"grid": {"l2": [1e-3, -1.0]}}),
            "ablation.grid.l2 = -1.0 (variant l2=-1): regularization.l2: input should be "
            "greater than or equal to 0 (got -1.0)",
        ),
        (
            _raw({"grid": {"lr": ["fast"]}}),
            'ablation.grid.lr = "fast" (variant lr=fast): optimizer.lr: input should be a valid '
            "number, unable to parse string as a number (got 'fast')",
        ),
        (
            _raw({"grid": {"data.train_fraction": [0.5, 1.5]}}),
            "ablation.grid.data.train_fraction = 1.5 (data size train_fraction=1.5): "
            "data.train_fraction: input should be less than or equal to 1 (got 1.5)",
        ),
        (
            _raw({"grid": {"train_size": [0]}}),
            "ablation.grid.train_size = 0 (data size train_size=0): data.train_size: input "
            "should be greater than or equal to 1 (got 0)",
        ),
        (
            _raw({"variants": {"ema": {"ema.enabled": True, "ema.decay": 2.0}}}),
            "ablation.variants.ema (variant ema): ema.decay: input should be less than 1 (got 2.0)",
        ),
        (
            _raw({"grid": {"l2": [1e-3]}}, epochs=0),
            "base config: epochs: input should be greater than or equal to 1 (got 0)",
        ),
        (
            _raw({"base": {"optimizer.lr": -1}}),
            "base config: optimizer.lr: input should be greater than 0 (got -1)",
        ),
        (
            _raw({}, model={"target": "no_such_module_xyz:Net"}),
            "model.target = 'no_such_module_xyz:Net': no module named 'no_such_module_xyz' "
            "(is it installed, or on PYTHONPATH?)",
        ),
        (
            _raw({}, task={"loss": "torch.nn.functional:no_such_loss"}),
            "task.loss = 'torch.nn.functional:no_such_loss': torch.nn.functional has no "
            "attribute 'no_such_loss'",
        ),
    ],
)
def test_each_problem_is_one_line_naming_where_the_study_sets_it(raw, expected):
    assert _lines(raw) == [expected]


def test_a_missing_model_file_is_named(tmp_path):
    missing = tmp_path / "nets.py"
    lines = _lines(_raw({}, model={"target": f"{missing}:Net"}))
    assert lines == [f"model.target = '{missing}:Net': file '{missing}' does not exist"]


def test_identical_problems_are_listed_once():
    # grid mode: dropout.p = 2 fails with every l2 value, for every seed
    grid = {"l2": [1e-4, 1e-3, 1e-2], "dropout.p": [0.2, 2.0]}
    lines = _lines(_raw({"mode": "grid", "seeds": 3, "grid": grid}))
    assert len(lines) == 1 and lines[0].startswith("ablation.grid.dropout.p = 2.0 (variant ")
    # a bad base config is said once, not once per variant
    lines = _lines(_raw({"seeds": 3, "grid": {"l2": [1e-4, 1e-3]}}, batch_size=0))
    assert lines == ["base config: batch_size: input should be greater than or equal to 1 (got 0)"]


def test_the_list_is_capped():
    lines = _lines(_raw({"grid": {"l2": [-float(i) for i in range(1, 25)]}}))
    assert len(lines) == MAX_PROBLEMS + 1
    assert lines[-1] == f"... and {24 - MAX_PROBLEMS} more problems"


def test_a_valid_study_returns_its_runs():
    runs = check_study(_raw({"seeds": 2, "grid": {"l2": [1e-3]}}))
    assert [(r.variant, r.seed) for r in runs] == [
        ("base", 0), ("l2=0.001", 0), ("base", 1), ("l2=0.001", 1)
    ]  # fmt: skip


def test_a_refused_study_writes_nothing(tmp_path):
    out = tmp_path / "study"
    with pytest.raises(ConfigError, match=r"^ablation\.grid\.l3: unknown key"):
        ablate(_raw({"grid": {"l3": [0.1]}}), out=out)
    with pytest.raises(ConfigError, match=r"^ablation\.grid\.l2 = -1"):
        ablate(_raw({"grid": {"l2": [-1]}}), out=out)
    assert not out.exists()
