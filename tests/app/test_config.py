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
