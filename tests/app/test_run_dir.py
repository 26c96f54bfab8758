"""A run directory belongs to one run: ownership, --overwrite, resume's own config and words."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trainwell.app.config_files import load_config
from trainwell.app.run_dir import HASH_KEY, config_hash
from trainwell.checkpoints import read_metadata
from trainwell.cli import app

BASE = 'epochs = 3\nbatch_size = 64\n[data]\nsource = "wine"\n[model]\nhidden = [8]\n'
CKPT = "[checkpoint]\nenabled = true\nkeep_last = 3\n"


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_default_directory_is_named_after_the_config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = write(tmp_path, "small.toml", BASE)
    b = write(tmp_path, "wide.toml", BASE.replace("[8]", "[32]"))
    assert invoke("run", str(a), "-q").exit_code == 0
    assert invoke("run", str(b), "-q").exit_code == 0  # used to overwrite the first one
    small = json.loads((tmp_path / "runs/small-seed0/summary.json").read_text())
    wide = json.loads((tmp_path / "runs/wide-seed0/summary.json").read_text())
    assert small["config"]["model"]["hidden"] == [8] and wide["config"]["model"]["hidden"] == [32]


def test_another_runs_directory_is_refused_unless_overwrite(tmp_path):
    a = write(tmp_path, "a.toml", BASE + CKPT)
    b = write(tmp_path, "b.toml", BASE.replace("[8]", "[16]") + CKPT)
    out = tmp_path / "run"
    assert invoke("run", str(a), "--out", str(out), "-q").exit_code == 0
    first = (out / "model.safetensors").read_bytes()
    result = invoke("run", str(b), "--out", str(out), "-q")
    assert result.exit_code == 2 and "another run's files" in result.output
    assert (out / "model.safetensors").read_bytes() == first  # untouched
    assert invoke("run", str(b), "--out", str(out), "--overwrite", "-q").exit_code == 0
    own = config_hash(load_config(b))
    hashes = {read_metadata(p)[HASH_KEY] for p in (out / "checkpoints").iterdir()}
    assert hashes == {own}  # no checkpoint of the other config is left to mix in
    assert invoke("run", str(b), "--out", str(out), "-q").exit_code == 0  # same config: fine


@pytest.mark.parametrize("damage", ["empty", "other_config"])
def test_resume_uses_the_config_inside_the_checkpoint(tmp_path, damage):
    config = write(tmp_path, "c.toml", BASE.replace("epochs = 3", "epochs = 4") + CKPT
                   + "[ema]\nenabled = true\n")  # fmt: skip
    out = tmp_path / "run"
    assert invoke("run", str(config), "--out", str(out), "-q").exit_code == 0
    reference = json.loads((out / "summary.json").read_text())
    for name in sorted(p.name for p in (out / "checkpoints").iterdir())[1:]:
        (out / "checkpoints" / name).unlink()  # as if killed after epoch 2
    text = "" if damage == "empty" else BASE  # 0 bytes, or a config without EMA
    (out / "config.toml").write_text(text)
    result = invoke("resume", str(out), "-q")
    assert result.exit_code == 0, result.output
    assert "resumed after epoch 2 of 4 (ckpt-00000001.safetensors)" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test"] == reference["test"] and "ema_test_acc" in summary["extra"]


def test_resume_names_skipped_corrupt_checkpoints_and_refuses_without_any(tmp_path):
    config = write(tmp_path, "c.toml", BASE + CKPT)
    out = tmp_path / "run"
    assert invoke("run", str(config), "--out", str(out), "-q").exit_code == 0
    newest = sorted((out / "checkpoints").iterdir())[-1]
    newest.write_bytes(newest.read_bytes()[:-100])
    result = invoke("resume", str(out), "-q")
    assert result.exit_code == 0 and f"skipped corrupt {newest.name}" in result.output
    for path in (out / "checkpoints").iterdir():
        path.unlink()
    result = invoke("resume", str(out), "-q")
    assert result.exit_code == 2 and "no valid checkpoint" in result.output
    assert "--restart" in result.output
    result = invoke("resume", str(out), "-q", "--restart")
    assert result.exit_code == 0 and "restarting" in result.output


@pytest.mark.parametrize("text", ["epochs = [", "epochs = -5", "x = " + "[" * 5000])
def test_a_damaged_config_in_a_checkpoint_header_is_none_not_a_crash(tmp_path, text):
    from trainwell.app.run_dir import CONFIG_KEY, config_of_checkpoint
    from trainwell.checkpoints import save

    path = save(tmp_path / "ckpt-00000000.safetensors", {}, metadata={CONFIG_KEY: text})
    assert config_of_checkpoint(path) is None  # resume then reads config.toml instead
