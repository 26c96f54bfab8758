import pytest

from trainwell.app.config import ConfigError, load_config, read_toml, to_toml, validate


def test_defaults_and_overrides():
    cfg = load_config(
        None, ["optimizer.lr=0.01", "model.hidden=[32, 16]", "gradients.clip.mode=norm"]
    )
    assert cfg.optimizer.lr == 0.01
    assert cfg.model.hidden == [32, 16]
    assert cfg.gradients.clip.mode == "norm"
    assert cfg.epochs == 30


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config(None, ['regularization.per_layer={"0.*" = [0.0, 0.001]}', "seed=5"])
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"optimiser": {"lr": 1}}, r"^optimiser: unknown key; accepted here: .*optimizer"),
        ({"optimizer": {"lr": "fast"}}, r"^optimizer\.lr: .*valid number.*'fast'"),
        ({"epochs": -1}, r"^epochs: .*greater than or equal to 1"),
        ({"model": {"dropout": 1.5}}, r"model\.dropout"),
        ({"gradients": {"clip": {"mode": "magic"}}}, r"gradients\.clip\.mode: .*'norm'"),
    ],
)
def test_bad_configs_are_refused_one_line_each(raw, match):
    with pytest.raises(ConfigError, match=match) as info:
        validate(raw)
    assert len(str(info.value).splitlines()) == 1


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["optimizer.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        read_toml(tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("epochs = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_toml(tmp_path / "bad.toml")


def test_early_stopping_mode_comes_from_the_monitor_name(tmp_path):
    # the hole: mode defaulted to "min" whatever the monitor, so val_acc stopped improving runs
    assert load_config(None, ["early_stopping.monitor=val_acc"]).early_stopping.mode == "max"
    assert load_config(None, ["early_stopping.monitor=ema_val_r2"]).early_stopping.mode == "max"
    assert load_config(None, []).early_stopping.mode == "min"  # val_loss
    given = ["early_stopping.monitor=my_metric", "early_stopping.mode=max"]
    assert load_config(None, given).early_stopping.mode == "max"
    cfg = load_config(None, ["early_stopping.monitor=val_acc"])
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))  # the resolved mode is written out and reads back
    assert 'mode = "max"' in path.read_text() and load_config(path) == cfg


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["early_stopping.monitor=my_metric"],
            r"^early_stopping: monitor 'my_metric' is not a metric .*"
            r'set early_stopping.mode = "min" or "max"$',
        ),
        (
            ["early_stopping.monitor=val_acc", "early_stopping.mode=min"],
            r"^early_stopping: mode 'min' contradicts monitor 'val_acc'",
        ),
    ],
)
def test_early_stopping_mode_unknown_or_contradicting_is_refused(overrides, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_config(None, overrides)
    assert len(str(info.value).splitlines()) == 1


def test_run_with_unknown_monitor_fails_before_training(tmp_path):
    from typer.testing import CliRunner

    from trainwell.cli import app

    cfg = tmp_path / "c.toml"
    cfg.write_text('[early_stopping]\nenabled = true\nmonitor = "val_f1"\n')
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(cfg), "--out", str(out), "-q"])
    assert result.exit_code == 2
    assert "val_f1" in result.output and "early_stopping.mode" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_techniques_get_the_inferred_mode(tmp_path):
    import torch

    from trainwell.app.techniques import build_techniques

    on = ["early_stopping.enabled=true", "checkpoint.enabled=true"]
    cfg = load_config(None, [*on, "early_stopping.monitor=val_acc"])
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    built = build_techniques(cfg, model, optimizer, 1, tmp_path)
    assert built["early_stopping"].modes == {"val_acc": "max"}
    assert built["checkpoints"].mode == "max"
