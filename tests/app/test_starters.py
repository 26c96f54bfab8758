"""``trainwell init``: the shipped examples, written out and run as a new user would."""

import subprocess
import sys
from pathlib import Path

import pytest

from trainwell.app.starters import available, write_example

ROOT = Path(__file__).resolve().parents[2]


def trainwell(*args, cwd):
    return subprocess.run([sys.executable, "-m", "trainwell", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=180)  # fmt: skip


def test_every_repository_example_ships_in_the_package():
    shipped = {p.stem for p in (ROOT / "src" / "trainwell" / "examples").glob("*.toml")}
    assert set(available()) == shipped == {p.stem for p in (ROOT / "examples").glob("*.toml")}


def test_init_writes_the_default_example_and_it_runs(tmp_path):
    done = trainwell("init", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sequence_cnn.py", "sequence_cnn.toml"]
    ran = trainwell("run", "sequence_cnn.toml", "--set", "epochs=1", "-q", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert (tmp_path / "runs" / "sequence_cnn-seed0" / "summary.json").is_file()


def test_init_never_replaces_a_users_file_without_force(tmp_path):
    mine = tmp_path / "digits.toml"
    mine.write_text("epochs = 3  # my edits\n")
    done = trainwell("init", "digits", cwd=tmp_path)
    assert done.returncode == 2 and "--force" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert mine.read_text() == "epochs = 3  # my edits\n"
    assert trainwell("init", "digits", "--force", cwd=tmp_path).returncode == 0
    assert mine.read_bytes() == (ROOT / "examples" / "digits.toml").read_bytes()


def test_init_unknown_name_lists_the_known_ones(tmp_path):
    done = trainwell("init", "nope", cwd=tmp_path)
    assert done.returncode == 2
    assert "sequence_cnn" in done.stderr and "'nope'" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_init_list_names_every_example(tmp_path):
    done = trainwell("init", "--list", cwd=tmp_path)
    assert done.returncode == 0
    assert [line.split()[0] for line in done.stdout.splitlines()] == list(available())


def test_write_example_into_a_new_folder_with_its_code(tmp_path):
    written = write_example("token_transformer", tmp_path / "new" / "dir")
    assert [p.name for p in written] == ["token_transformer.toml", "token_transformer.py"]
    with pytest.raises(ValueError, match="already there"):
        write_example("token_transformer", tmp_path / "new" / "dir")


def test_init_into_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("mine")
    done = trainwell("init", "digits", "--dir", "afile", cwd=tmp_path)
    assert done.returncode == 2 and "--dir afile is a file" in done.stderr
    assert (tmp_path / "afile").read_text() == "mine"
