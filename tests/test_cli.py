import json

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from trainwell.cli import app

runner = CliRunner()
TINY = ["--set", "epochs=3", "--set", "model.hidden=[32]", "--set", "data.source=wine"]


def test_help_explains_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "resume", "demo", "soup"):
        assert command in result.output
        assert runner.invoke(app, [command, "--help"]).exit_code == 0


@pytest.mark.parametrize(
    ("text", "key"),
    [("[optimiser]\nlr = 1\n", "optimiser"), ('[optimizer]\nlr = "fast"\n', "optimizer.lr"),
     ("epochs = -1\n", "epochs")],
)  # fmt: skip
def test_bad_config_is_one_line_and_exit_2(tmp_path, text, key):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"trainwell: error: {key}:")
    assert "Traceback" not in result.output


def test_run_writes_the_run_directory_and_soup_uses_its_checkpoints(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[checkpoint]\nenabled = true\nkeep_last = 3\n")
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(cfg), "--out", str(out), "-q", *TINY])
    assert result.exit_code == 0, result.output
    for name in ("config.toml", "metrics.csv", "model.safetensors", "summary.json", "curves.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["test"]["test_acc"] <= 1.0 and summary["epochs_run"] == 3
    assert len((out / "metrics.csv").read_text().strip().splitlines()) == 1 + 3
    result = runner.invoke(app, ["soup", str(out), "--method", "uniform"])
    assert result.exit_code == 0, result.output
    soup = load_file(out / "soup-uniform.safetensors")
    assert set(soup) == set(load_file(out / "model.safetensors"))
    assert runner.invoke(app, ["soup", str(out), "--method", "best"]).exit_code == 2
