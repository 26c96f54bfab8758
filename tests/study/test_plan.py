"""Planning a study: one-at-a-time and grid variants, data sizes, seeds, the demo study."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainwell.study.demo import DEMO_TOML, demo_config
from trainwell.study.plan import plan_study, resolve_key

TINY = {"epochs": 2, "batch_size": 32, "data": {"train_size": 120}, "model": {"hidden": [16]}}


def _raw(ablation: dict, **extra) -> dict:
    return {**TINY, **extra, "ablation": ablation}


def test_one_at_a_time_crossed_with_data_and_seeds():
    grid = {"l2": [0, 1e-3, 1e-2], "dropout.p": [0.2], "data.train_fraction": [0.5, 1.0]}
    runs = plan_study(_raw({"seeds": 3, "grid": grid}))
    # l2 = 0 equals the base config and is dropped: base + 2 l2 + 1 dropout, x 2 data x 3 seeds
    assert len(runs) == 4 * 2 * 3
    assert {r.variant for r in runs} == {"base", "l2=0.001", "l2=0.01", "dropout=0.2"}
    assert {r.data for r in runs} == {"train_fraction=0.5", "train_fraction=1"}
    assert sorted({r.seed for r in runs}) == [0, 1, 2]
    run = next(r for r in runs if r.variant == "l2=0.01" and r.data == "train_fraction=0.5")
    assert run.raw["regularization"]["l2"] == 0.01 and run.raw["data"]["train_fraction"] == 0.5
    assert run.raw["seed"] == run.seed and "ablation" not in run.raw


def test_grid_mode_is_the_cartesian_product():
    grid = {"l2": [1e-4, 1e-3], "clip.max_norm": [0.5, 1.0, 2.0]}
    runs = plan_study(_raw({"seeds": 1, "mode": "grid", "grid": grid}))
    assert len(runs) == 1 + 2 * 3
    combo = next(r for r in runs if r.variant == "l2=0.001, clip.max_norm=2")
    # a clip threshold switches clipping on when the base has it off
    assert combo.raw["gradients"]["clip"] == {"max_norm": 2.0, "mode": "norm"}


def test_named_variants_and_seed_override():
    variants = {"ema": {"ema.enabled": True}, "acc": {"gradients": {"accumulate": 2}}}
    runs = plan_study(_raw({"seeds": 5, "variants": variants}), seeds=2)
    assert [(r.variant, r.seed) for r in runs] == [
        ("base", 0), ("ema", 0), ("acc", 0), ("base", 1), ("ema", 1), ("acc", 1)
    ]  # fmt: skip
    assert runs[2].raw["gradients"]["accumulate"] == 2
    assert resolve_key("weight_decay") == "optimizer.weight_decay"


@pytest.mark.parametrize(
    ("ablation", "match"),
    [
        ({"mode": "random"}, "ablation.mode must be"),
        ({"grids": {}}, "unknown key"),
        ({"grid": {"l2": 0.1}}, "non-empty list"),
        ({"seeds": 0}, "seeds must be a positive integer"),
        ({"variants": {"x": 1}}, "must be a table"),
    ],
)
def test_bad_spec_raises(ablation, match):
    with pytest.raises(ValueError, match=match):
        plan_study(_raw(ablation))


def test_demo_config_matches_the_example_and_covers_every_technique():
    root = Path(__file__).resolve().parents[2]
    assert (root / "examples" / "ablation.toml").read_text(encoding="utf-8") == DEMO_TOML
    raw = demo_config()
    runs = plan_study(raw, seeds=1)
    keys = {k for r in runs for k in r.overrides}
    for key in ("regularization.l1", "regularization.l2", "dropout.p", "optimizer.weight_decay",
                "gradients.clip.max_norm", "gradients.accumulate", "early_stopping.enabled",
                "ema.enabled", "swa.enabled"):  # fmt: skip
        assert key in keys
