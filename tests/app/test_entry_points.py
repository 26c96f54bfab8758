"""User code by reference: resolving ``target`` strings, calling them, one-line errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.app import user_code
from trainwell.app.config_files import load_config
from trainwell.app.entry_points import EntryPointError, call, reference, resolve
from trainwell.app.runner import load_data, model_for

HERE = Path(__file__).parent


def test_module_and_file_targets_resolve_to_the_same_object():
    by_module = resolve("model.target", "tests.app.user_code:Net")
    by_file = resolve("model.target", f"{HERE / 'user_code.py'}:Net")
    assert by_module is user_code.Net
    assert by_file.__name__ == "Net" and by_file.__module__.startswith("trainwell_user_")
    assert resolve("x", "torch.nn:Linear") is torch.nn.Linear
    assert resolve("x", "torch:nn.Linear") is torch.nn.Linear  # dots walk attributes


def test_relative_file_targets_are_relative_to_the_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "net.py").write_text((HERE / "user_code.py").read_text())
    (tmp_path / "sub" / "c.toml").write_text('[model]\ntarget = "net.py:Net"\n')
    cfg = load_config(tmp_path / "sub" / "c.toml", ["data.target='net.py:blobs'"])
    assert cfg.model.target == f"{(tmp_path / 'sub' / 'net.py').resolve()}:Net"
    assert cfg.data.target == f"{(tmp_path / 'sub' / 'net.py').resolve()}:blobs"
    model = model_for(cfg, load_data(cfg))
    assert type(model).__name__ == "Net"


def test_model_gets_sizes_from_the_data_and_args_win():
    cfg = load_config(None, ["model.target='tests.app.user_code:Net'", "model.args.hidden=7",
                             "data.target='tests.app.user_code:blobs'"])  # fmt: skip
    model = model_for(cfg, load_data(cfg))
    assert user_code.SEEN == {"n_features": 5, "n_classes": 3, "hidden": 7}
    assert model.head.out_features == 3 and model.body[0].in_features == 5
    cfg = load_config(None, ["model.target='tests.app.user_code:Net'", "model.args.n_classes=4",
                             "data.target='tests.app.user_code:blobs'"])  # fmt: skip
    assert model_for(cfg, load_data(cfg)).head.out_features == 4


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_such_pkg.mod:Net", "no module named 'no_such_pkg'"),
        ("tests.app.user_code:Nope", "has no attribute 'Nope'"),
        ("tests.app.user_code:NOT_CALLABLE", "int is not callable"),
        ("missing_file.py:Net", "does not exist"),
        ("Net", "expected 'module:name'"),
    ],
)
def test_a_wrong_target_is_one_line_naming_key_and_target(target, message):
    with pytest.raises(EntryPointError, match=message) as err:
        from trainwell.app.entry_points import resolve_callable

        resolve_callable("model.target", target)
    text = str(err.value)
    assert text.startswith("model.target") and "\n" not in text


def test_an_argument_the_callable_does_not_take_is_named():
    with pytest.raises(EntryPointError, match="unexpected keyword argument 'widht'"):
        call(
            "model.target", "t:Net", user_code.Net, {"widht": 3}, {"n_features": 2, "n_classes": 2}
        )


def test_reference_of_callables():
    assert reference(user_code.Net, "model") == "tests.app.user_code:Net"
    assert reference("pkg.mod:Net", "model") == "pkg.mod:Net"
    with pytest.raises(EntryPointError, match="lambda"):
        reference(lambda x: x, "task.loss")

    def local():
        pass

    with pytest.raises(EntryPointError, match="inside a function"):
        reference(local, "data")


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "trainwell", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)  # fmt: skip


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model.target='tests.app.user_code:Nope'", "model.target = 'tests.app.user_code:Nope'"),
        ("model.target='tests.app.user_code:not_a_model'", "not a torch.nn.Module"),
        ("data.target='tests.app.user_code:continuous_labels'", 'kind = "regression"'),
        ("model.args.widht=3", "unexpected keyword argument 'widht'"),
        ("optimizer.name='Adamz'", "unknown optimizer 'Adamz'"),
        ("optimizer.args.betaz=1", "optimizer.name = 'adamw'"),
        ("device='cuda'" if not torch.cuda.is_available() else "device='cuda:99'", "device ="),
        ("task.loss='tests.app.user_code:nope'", "has no attribute 'nope'"),
    ],
)
def test_cli_wrong_user_code_is_one_line_exit_2(tmp_path, override, needle):
    root = Path(__file__).resolve().parents[2]
    base = [
        "--set=model.target='tests.app.user_code:Net'",
        "--set=data.target='tests.app.user_code:blobs'",
    ]  # noqa: E501
    sets = [s for s in base if override.split("=")[0] not in s] + [f"--set={override}"]
    (tmp_path / "c.toml").write_text("epochs = 1\n")
    done = subprocess.run(
        [sys.executable, "-m", "trainwell", "run", str(tmp_path / "c.toml"), *sets,
         "--out", str(tmp_path / "run"), "-q"],
        capture_output=True, text=True, cwd=root, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert needle in lines[0]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("four_splits", "returned 4 items; expected a Dataset"),
        ("an_iterable", "not a map-style Dataset"),
        ("bad_keys", "dict with keys ['training']"),
    ],
)
def test_a_datasets_function_returning_the_wrong_thing_is_named(target, message):
    cfg = load_config(None, [f"data.target='tests.app.user_code:{target}'"])
    with pytest.raises(EntryPointError, match=re.escape(message)) as err:
        load_data(cfg)
    assert str(err.value).startswith("data.target = 'tests.app.user_code:")
