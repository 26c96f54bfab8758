import pytest

from trainwell.app.config import ConfigError, validate
from trainwell.app.config_files import load_config, read_toml, to_toml


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


def _refused_lines(err: ConfigError, needles: list[str]) -> list[str]:
    """The message's lines, checked: short, at most two, naming every needle.

    At most 200 characters a line; an unknown key's line lists every accepted key (the
    21 top-level ones take about 230 characters).
    """
    text = str(err)
    lines = text.splitlines()
    assert 1 <= len(lines) <= 2, text[:500]
    for line in lines:
        assert len(line) <= (280 if "unknown key" in line else 200), line
    for needle in needles:
        assert needle in text, (needle, text)
    return lines


BOUNDED = [
    ("epochs", 1_000_000), ("batch_size", 2**24), ("seed", 2**31 - 1),
    ("model.channels", 4096), ("gradients.accumulate", 1_000_000),
    ("gradients.monitor_every", 1_000_000), ("early_stopping.patience", 1_000_000),
    ("early_stopping.warmup", 1_000_000), ("early_stopping.window", 10_000),
    ("checkpoint.keep_last", 10_000), ("checkpoint.keep_best", 10_000),
    ("ema.update_every", 1_000_000), ("swa.anneal_epochs", 1_000_000),
    ("ensemble.members", 1000), ("ensemble.jobs", 256), ("data.num_workers", 256),
    ("data.train_size", 10**12),
]  # fmt: skip


@pytest.mark.parametrize(("key", "bound"), BOUNDED)
def test_every_integer_setting_has_an_upper_bound_that_names_itself(key, bound):
    assert getattr(load_config(None, [f"{key}={bound}"]), key.split(".")[0]) is not None
    for value in (bound + 1, 10**23):
        with pytest.raises(ConfigError) as info:
            load_config(None, [f"{key}={value}"])
        (line,) = _refused_lines(info.value, [key, f"less than or equal to {bound}"])
        assert line.startswith(f"{key}: ")


FLOATS = [
    "optimizer.lr", "optimizer.weight_decay", "regularization.l2", "regularization.l1",
    "early_stopping.baseline", "early_stopping.min_delta", "ema.decay", "swa.lr",
    "model.dropout", "dropout.p", "gradients.clip.value", "distributed.timeout_s",
]  # fmt: skip


@pytest.mark.parametrize("key", FLOATS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_float_settings_must_be_finite(key, value):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{key}={value}"])
    (line,) = _refused_lines(info.value, [key])
    assert "finite number" in line or "greater than" in line or "less than" in line, line


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["device=gpu0"], ["device", "'gpu0'", "accepted: auto, cpu, cuda, cuda:N, mps"]),
        (["device=cuda:x"], ["device", "'cuda:x'", "accepted: auto, cpu, cuda, cuda:N, mps"]),
        (["device=CUDA"], ["device", "accepted: auto, cpu, cuda, cuda:N, mps"]),
        (["model.hidden=[0]"], ["model.hidden", "every width must be in [1, 1000000]", "layer 0"]),
        (["model.hidden=[-1]"], ["model.hidden", "[1, 1000000]", "is -1"]),
        (["model.hidden=[64, 2000000]"], ["model.hidden", "[1, 1000000]", "layer 1"]),
        (["model.hidden=[]"], ["model.hidden", "at least 1 item"]),
        (["epochs=100000000000000000000000"], ["epochs", "less than or equal to 1000000"]),
        (["epochs=" + "9" * 300], ["epochs", "1000000", "an integer of 300 digits"]),
        (["epochs=1" + "0" * 5000], ["--set epochs", "5001 digits", "4300"]),
        (["batch_size=1" + "0" * 6000], ["--set batch_size", "6001 digits"]),
        (["batch_size=100000000000000000000000"], ["batch_size", "16777216"]),
        (["batch_size=10**23"], ["batch_size", "valid integer", "'10**23'"]),
        (["optimizer.lr=nan"], ["optimizer.lr", "finite number", "nan"]),
        (["optimizer.lr=inf"], ["optimizer.lr", "finite number", "inf"]),
        (["optimizer.lr=1e400"], ["optimizer.lr", "finite number"]),  # TOML reads it as inf
        (["model.dropout=[0.1, nan]"], ["model.dropout[1]", "finite number"]),
        (["regularization.per_layer.x=[inf, 0.1]"], ["regularization.per_layer.x[0]", "finite"]),
        (["epochs"], ["--set 'epochs'", "expected section.key=value"]),
        (["=3"], ["--set '=3'", "expected section.key=value"]),
        ([" =3"], ["expected section.key=value"]),
        ([".x=1"], [".x", "empty key part"]),
        (["model..hidden=[1]"], ["model..hidden", "empty key part"]),
        (["nosection.x=1"], ["nosection: unknown key; accepted here:", "optimizer"]),
        (["model.widths=[1]"], ["model.widths: unknown key", "hidden"]),
        (["epochs.x=1"], ["epochs.x", "'epochs' is a value, not a section", "epochs=<value>"]),
        (["gradients.clip.mode.x=1"], ["'gradients.clip.mode' is a value, not a section"]),
        (["model.hidden=" + "[" * 100_000], ["--set model.hidden", "nested too deeply"]),
        (["x" * 5000 + "=1"], ["unknown key"]),
        (["task.kind=regression", "task.loss=cross_entropy"],
         ["task: loss \"cross_entropy\"", 'kind is "regression"', "mse, l1, huber"]),
        (["task.loss=mse"], ["task: loss \"mse\" is a regression loss", "cross_entropy"]),
    ],
)  # fmt: skip
def test_bad_overrides_are_refused_in_one_short_line(overrides, needles):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    _refused_lines(info.value, needles)


@pytest.mark.parametrize(
    ("overrides", "check"),
    [
        (["gradients.clip.max_norm=inf"], lambda c: c.gradients.clip.max_norm == float("inf")),
        (["gradients.clip.norm_type=inf"], lambda c: c.gradients.clip.norm_type == float("inf")),
        (["device=cuda:1"], lambda c: c.device == "cuda:1"),
        (["device=mps"], lambda c: c.device == "mps"),
        (["seed=2147483647"], lambda c: c.seed == 2**31 - 1),
        (["model.hidden=[1, 1000000]"], lambda c: c.model.hidden == [1, 1_000_000]),
        (["model.args.inner.depth=3"], lambda c: c.model.args == {"inner": {"depth": 3}}),
        (["ablation.grid.l2=[0.1]"], lambda c: c.ablation == {"grid": {"l2": [0.1]}}),
        (["task.loss=mse", "task.step=m:f"], lambda c: c.task.loss == "mse"),  # step adapts
        (["task.kind=regression", "task.loss=huber"], lambda c: c.task.loss == "huber"),
    ],
)  # fmt: skip
def test_values_at_the_edges_are_accepted(overrides, check):
    assert check(load_config(None, overrides))


def test_a_set_value_cannot_smuggle_in_more_keys():
    from trainwell.app.config_files import parse_value

    assert parse_value("1\nepochs = 5") == "1\nepochs = 5"  # text, not 1 plus a hidden key
    with pytest.raises(ConfigError) as info:
        load_config(None, ["batch_size=1\nepochs = 5"])
    _refused_lines(info.value, ["batch_size", "valid integer"])


def test_huge_python_integers_are_refused_without_printing_them():
    with pytest.raises(ConfigError) as info:
        validate({"epochs": 10**6000, "optimizer": {"lr": 10**6000}})
    lines = _refused_lines(info.value, ["epochs", "about 6001 digits", "optimizer.lr"])
    assert len(lines) == 2


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        (b"a = " + b"[" * 100_000, ["config file c.toml", "nested too deeply"]),
        (b"x = " + b"[" * 100_000 + b"]" * 100_000 + b"\n", ["c.toml", "nested too deeply"]),
        (b"epochs = 1" + b"0" * 5000 + b"\n", ["config file c.toml", "5001 digits", "4300"]),
        (b"epochs = 2\n# caf\xe9 \xff\n", ["config file c.toml", "not UTF-8", "line 2"]),
        (b"\xff\xfe[\x00", ["config file c.toml", "not UTF-8", "line 1"]),
        (b"epochs = = 3", ["config file c.toml", "not valid TOML", "line 1"]),
        (b"epochs = 3\nepochs = 4\n", ["config file c.toml", "not valid TOML"]),
        (b"epochs = 10000000000000000000000\n", ["epochs", "less than or equal to 1000000"]),
        (b"[optimizer]\nlr = nan\n", ["optimizer.lr", "finite number"]),
    ],
)  # fmt: skip
def test_bad_config_files_are_refused_in_one_line_naming_the_file(tmp_path, content, needles):
    path = tmp_path / "c.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    _refused_lines(info.value, needles)


def test_config_path_that_is_a_directory_or_missing(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    _refused_lines(info.value, [str(tmp_path), "is a directory"])
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    _refused_lines(info.value, ["nope.toml", "does not exist"])


def test_an_empty_config_file_means_the_defaults(tmp_path):
    # a valid (empty) TOML document: run directories and tests rely on it meaning defaults
    (tmp_path / "c.toml").write_text("")
    assert load_config(tmp_path / "c.toml") == load_config(None)


@pytest.mark.parametrize("value", ["1.5", "[0.1, 2]", "-0.1"])
def test_a_dropout_rate_out_of_range_names_its_key_once(value):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"model.dropout={value}"])
    assert str(err.value).startswith("model.dropout: every rate must be in [0, 1)")


def test_split_seed_shares_one_split_across_run_seeds():
    """data.split_seed fixes the train/val/test split (ensembles of seeds need one test
    set); by default the split follows the run's seed."""
    import torch

    from trainwell.app.runner import load_data

    def test_split(*overrides):
        splits = load_data(load_config(None, ["data.source=wine", *overrides]))
        return torch.stack([x for x, _ in splits.test])

    assert not torch.equal(test_split("seed=1"), test_split("seed=2"))
    shared = [test_split(f"seed={s}", "data.split_seed=7") for s in (1, 2)]
    assert torch.equal(*shared)
