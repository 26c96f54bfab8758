"""Planning a study: one-at-a-time and grid variants, data sizes, seeds, the demo study."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainwell.app.config import ConfigError
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
        ({"mode": 1}, "ablation.mode must be 'one-at-a-time' or 'grid', got 1"),
        ({"grids": {}}, "unknown key"),
        ({"name": 3}, "ablation.name must be a non-empty string"),
        ({"name": ""}, "ablation.name must be a non-empty string"),
        ({"seeds": 0}, "seeds must be a positive integer"),
        ({"seeds": "3"}, 'ablation.seeds: seeds must be a positive integer, got "3"'),
        ({"seeds": 2.5}, "ablation.seeds: seeds must be a positive integer, got 2.5"),
        ({"seeds": True}, "ablation.seeds: seeds must be a positive integer, got true"),
        ({"grid": [1]}, r"ablation.grid must be a table, got \[1\]"),
        ({"grid": {"l2": 0.1}}, "ablation.grid.l2 must be a non-empty list of values, got 0.1"),
        ({"grid": {"dropout.p": []}}, r"ablation.grid.dropout.p must be a non-empty list.*\[\]"),
        (
            {"grid": {"l3": [0.1]}},
            "ablation.grid.l3: unknown key; short names: accumulate, .*l1, l2",
        ),
        (
            {"grid": {"model.dropuot": [0.1]}},
            "ablation.grid.model.dropuot: model has no key 'dropuot'; it has: .*dropout",
        ),
        (
            {"grid": {"modl.dropout": [0.1]}},
            "ablation.grid.modl.dropout: the config has no key 'modl'",
        ),
        ({"grid": {"regularization.l2.x": [0.1]}}, "regularization.l2 is a value, not a table"),
        ({"grid": {"ablation.seeds": [1]}}, "ablation.grid.ablation.seeds: the config has no key"),
        ({"grid": {"seed": [1, 2]}}, "ablation.grid.seed: seeds come from ablation.seeds"),
        (
            {"grid": {"dropout": [0.1], "dropout.p": [0.2]}},
            "'dropout' and 'dropout.p' both set dropout.p",
        ),
        (
            {"grid": {"l2": [1e-3, 1.0000001e-3]}},
            "two different variants are both labelled 'l2=0.001'",
        ),
        (
            {"grid": {"train_size": [100, 100.0000001]}},
            "two data sizes are both labelled 'train_size=100'",
        ),
        ({"variants": {"x": 1}}, "ablation.variants.x must be a table of config keys, got 1"),
        (
            {"variants": {"base": {"ema.enabled": True}}},
            "ablation.variants.base: 'base' names the base",
        ),
        (
            {"variants": {"x": {"ema.enabld": True}}},
            "ablation.variants.x.ema.enabld: ema has no key 'enabld'",
        ),
        ({"base": {"optimizer.lrr": 1}}, "ablation.base.optimizer.lrr: optimizer has no key 'lrr'"),
        ({"base": 1}, "ablation.base must be a table, got 1"),
    ],
)
def test_a_malformed_ablation_section_is_one_line_per_problem(ablation, match):
    with pytest.raises(ConfigError, match=match) as caught:
        plan_study(_raw(ablation))
    assert len(str(caught.value).splitlines()) == 1


def test_every_problem_of_the_section_is_listed_at_once():
    ablation = {"seeds": 0, "mode": "all", "grid": {"l3": [1], "l2": 1e-3}}
    with pytest.raises(ConfigError) as caught:
        plan_study(_raw(ablation))
    lines = str(caught.value).splitlines()
    assert [line.split(":")[0].split(" ")[0] for line in lines] == [
        "ablation.mode", "ablation.seeds", "ablation.grid.l3", "ablation.grid.l2"
    ]  # fmt: skip


def test_seeds_argument_is_checked_too():
    with pytest.raises(ConfigError, match="^seeds: seeds must be a positive integer, got 0$"):
        plan_study(_raw({}), seeds=0)


def test_runs_say_where_the_section_sets_them():
    grid = {"l2": [1e-3], "data.train_fraction": [0.5]}
    runs = plan_study(_raw({"seeds": 1, "grid": grid, "variants": {"ema": {"ema.enabled": True}}}))
    by = {r.variant: r.origin for r in runs}
    assert by["l2=0.001"] == {
        "regularization.l2": "ablation.grid.l2 = 0.001",
        "data.train_fraction": "ablation.grid.data.train_fraction = 0.5",
    }
    assert by["ema"]["ema.enabled"] == "ablation.variants.ema"


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
