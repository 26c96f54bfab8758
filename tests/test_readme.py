import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import config_reference  # noqa: E402


def test_readme_config_reference_is_generated_from_the_schema():
    readme = (ROOT / "README.md").read_text()
    assert config_reference.table() in readme, "run scripts/build_readme.sh"


def test_readme_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    head = readme[:2500]
    assert "make demo" in head and "make test" in head


def test_readme_own_model_example_runs(tmp_path):
    """The first example of the README (a user's model and datasets) trains as shown."""
    import re
    import subprocess

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Your own model") : text.index("## In your own loop")]
    python, toml = re.findall(r"```(?:python|toml)\n(.*?)```", section, re.S)[:2]
    (tmp_path / "mycode.py").write_text(python)
    (tmp_path / "study.toml").write_text(toml)
    done = subprocess.run(
        [sys.executable, "-m", "trainwell", "run", "study.toml", "--set", "epochs=2", "-q"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "runs" / "study-seed0" / "summary.json").is_file()
