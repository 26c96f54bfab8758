"""``trainwell soup`` on a run whose checkpoints are partly corrupt: it skips and names them."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.checkpoints.test_fuzz import join, manifest_of, split, with_manifest, with_state_text
from trainwell.app.soup_runner import soup_run
from trainwell.cli import app


def test_soup_skips_and_names_corrupt_checkpoints(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[checkpoint]\nenabled = true\nkeep_last = 4\n")
    run = tmp_path / "run"
    tiny = ["--set", "epochs=4", "--set", "model.hidden=[8]", "--set", "data.source=wine"]
    result = CliRunner().invoke(app, ["run", str(cfg), "--out", str(run), "-q", *tiny])
    assert result.exit_code == 0, result.output
    folder = run / "checkpoints"
    assert len(list(folder.glob("ckpt-*.safetensors"))) == 4
    data = (folder / "ckpt-00000001.safetensors").read_bytes()
    header, body = split(data)
    deep = join(with_state_text(header, "[" * 100_000), body)  # reaches the JSON parser
    (folder / "ckpt-00000001.safetensors").write_bytes(deep)
    surrogate = with_manifest(header, manifest_of(header))
    surrogate["__metadata__"]["trainwell_manifest"] += "\ud800"  # read_metadata refuses it
    (folder / "ckpt-00000002.safetensors").write_bytes(join(surrogate, body))

    found = soup_run(run, "uniform")
    skipped = found["skipped"]
    assert len(skipped) == 2 and all(isinstance(line, str) for line in skipped)
    assert skipped[0].startswith("skipped corrupt ckpt-00000001.safetensors (")
    assert "nested deeper than 200" in skipped[0]
    assert skipped[1].startswith("skipped corrupt ckpt-00000002.safetensors (")
    assert [row["model"] for row in found["rows"]] == [
        "ckpt-00000000.safetensors",
        "ckpt-00000003.safetensors",
        "uniform soup",
    ]
    with pytest.raises(ValueError, match=r"^--out: .* is a directory; give a file path such as"):
        soup_run(run, "uniform", out=tmp_path)
    (folder / "ckpt-00000003.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="found 1 .*skipped corrupt ckpt-00000003"):
        soup_run(run, "uniform")
