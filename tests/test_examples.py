"""The examples in ``examples/`` run through the real CLI and learn something.

Each example is run as a user would run it (``python -m trainwell run examples/<name>.toml``)
in a subprocess whose working directory is ``tmp_path``, with few epochs; the bounds on
the test metrics were measured first and carry a wide margin (see each test). Studies are
run from a copy of the example's config (``trainwell ablate`` takes no ``--set``) whose
relative ``file.py:name`` targets are made absolute, so the copy finds the example modules.
"""

from __future__ import annotations

import html
import importlib.util
import json
import math
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import tomli_w
import tomllib
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TARGET_KEYS = (("model", "target"), ("data", "target"), ("task", "step"), ("task", "loss"))


def trainwell(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``python -m trainwell ARGS`` in ``cwd``; stdout and stderr are captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "trainwell", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_example(name: str, tmp_path: Path, *sets: str) -> dict[str, Any]:
    """Run ``examples/<name>.toml`` with ``--set`` overrides; returns its summary.json."""
    out = tmp_path / name
    overrides = [arg for item in ("epochs=2", *sets) for arg in ("--set", item)]
    proc = trainwell(
        "run", str(EXAMPLES / f"{name}.toml"), *overrides, "--out", str(out), "--quiet",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


def copied_config(name: str, path: Path, drop: tuple[tuple[str, str], ...] = (), **changes: Any):
    """``examples/<name>.toml`` written to ``path`` with absolute targets and top-level changes.

    ``drop`` removes ``(section, key)`` pairs; ``changes`` replace top-level keys (a dict
    value replaces a whole section).
    """
    raw = tomllib.loads((EXAMPLES / f"{name}.toml").read_text(encoding="utf-8"))
    raw.update(changes)
    for section, key in TARGET_KEYS:
        value = raw.get(section, {}).get(key)
        if isinstance(value, str) and ".py:" in value:
            file, _, attr = value.rpartition(":")
            raw[section][key] = f"{(EXAMPLES / file).resolve()}:{attr}"
    for section, key in drop:
        raw[section].pop(key)
    path.write_text(tomli_w.dumps(raw), encoding="utf-8")
    return path


def load_example(name: str) -> ModuleType:
    """The example module ``examples/<name>.py``, imported from its file."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def accuracy(summary: dict[str, Any]) -> float:
    test = summary["test"]
    assert {"test_acc", "test_nll", "test_ece", "test_brier"} <= set(test), test
    acc = test["test_acc"]
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0, acc
    assert math.isfinite(test["test_nll"]) and test["test_nll"] > 0
    return acc


def study_results(out: Path) -> tuple[list[tuple[str, str, int, str]], str]:
    """Every run of the study in ``out`` (variant, data, seed, status) and the report's verdict."""
    with sqlite3.connect(out / "results.sqlite") as db:
        runs = db.execute("SELECT variant, data, seed, status FROM run").fetchall()
    page = (out / "report.html").read_text(encoding="utf-8")
    found = re.search(r"<p class='verdict'>(.*?)</p>", page, re.S)
    assert found, "report.html has no verdict paragraph"
    return runs, html.unescape(found.group(1))


# -- one run of each example ---------------------------------------------------------------


def test_sequence_cnn_learns_the_waveforms(tmp_path: Path) -> None:
    summary = run_example("sequence_cnn", tmp_path)
    # measured: 0.50-0.64 after 2 epochs (n=1200, seeds 0-2); chance is 0.25
    assert accuracy(summary) > 0.35
    assert summary["config"]["early_stopping"]["enabled"] is True


def test_token_transformer_runs_through_its_step_hook(tmp_path: Path) -> None:
    summary = run_example("token_transformer", tmp_path, "data.args.n=600")
    # two epochs are too few to beat chance reliably (0.93 after the configured 10)
    accuracy(summary)
    assert summary["config"]["task"]["step"].endswith("token_transformer.py:step")
    assert summary["config"]["scheduler"]["name"] == "OneCycleLR"
    assert summary["steps"] == 2 * math.ceil(420 / 64)


def test_diabetes_regression_explains_variance(tmp_path: Path) -> None:
    summary = run_example("diabetes_regression", tmp_path, "epochs=5")
    test = summary["test"]
    assert {"test_mse", "test_mae", "test_r2"} <= set(test), test
    assert test["test_mse"] > 0 and test["test_mae"] > 0
    # measured: R^2 0.35-0.46 after 5 epochs (0.53 after the configured 40)
    assert 0.0 < test["test_r2"] < 1.0
    assert any((tmp_path / "diabetes_regression" / "checkpoints").iterdir())


def test_lazy_files_writes_and_reads_its_folder(tmp_path: Path) -> None:
    root = tmp_path / "items"
    summary = run_example("lazy_files", tmp_path, f'data.args.root="{root}"')
    # measured: 0.76-0.81 after 2 epochs (seeds 0-2); chance is 0.25
    assert accuracy(summary) > 0.5
    assert len(list(root.glob("item_*.npy"))) == 600
    assert (root / "labels.csv").read_text(encoding="utf-8").startswith("file,label")


def test_token_transformer_without_step_is_one_line_error(tmp_path: Path) -> None:
    config = copied_config(
        "token_transformer", tmp_path / "no_step.toml", drop=(("task", "step"),), epochs=1
    )
    proc = trainwell("run", str(config), "--out", str(tmp_path / "out"), "--quiet", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "step" in lines[0]


# -- studies ---------------------------------------------------------------------------------


def test_sequence_cnn_ablation_study(tmp_path: Path) -> None:
    raw = tomllib.loads((EXAMPLES / "sequence_cnn.toml").read_text(encoding="utf-8"))
    spec, grid = raw["ablation"], raw["ablation"]["grid"]
    data_args = {**raw["data"]["args"], "n": 400}
    config = copied_config(
        "sequence_cnn", tmp_path / "study.toml", epochs=2,
        data={**raw["data"], "args": data_args},
    )  # fmt: skip
    config_raw = tomllib.loads(config.read_text(encoding="utf-8"))
    assert Path(config_raw["model"]["target"].rpartition(":")[0]).is_file()
    out = tmp_path / "study"
    proc = trainwell("ablate", str(config), "--jobs", "2", "--out", str(out), "--quiet",
                     cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs, verdict = study_results(out)
    variants = 1 + sum(len(v) for k, v in grid.items() if not k.startswith("data."))
    planned = variants * len(grid["data.train_fraction"]) * spec["seeds"]
    assert len(runs) == planned
    assert {status for *_, status in runs} == {"done"}, runs
    assert {seed for _, _, seed, _ in runs} == set(range(spec["seeds"]))
    assert "NLL" in verdict
    assert "NLL" in proc.stdout


def test_regression_study_verdict_names_mse(tmp_path: Path) -> None:
    ablation = {"name": "diabetes-small", "seeds": 2, "grid": {"l2": [1e-3]}}
    config = copied_config(
        "diabetes_regression", tmp_path / "study.toml", epochs=2, ablation=ablation,
        checkpoint={"enabled": False},
    )  # fmt: skip
    out = tmp_path / "study"
    proc = trainwell("ablate", str(config), "--jobs", "2", "--out", str(out), "--quiet",
                     cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs, verdict = study_results(out)
    assert len(runs) == 4 and {status for *_, status in runs} == {"done"}, runs
    assert "MSE" in verdict
    assert "NLL" not in verdict


# -- the example modules themselves (in process, no training) -----------------------------


def test_example_data_is_deterministic_given_the_seed() -> None:
    waves = load_example("sequence_cnn")
    a, b = (
        waves.make_datasets(n=80, length=32, seed=3),
        waves.make_datasets(n=80, length=32, seed=3),
    )
    for left, right in zip(a, b, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(left.tensors, right.tensors, strict=True))
    other = waves.make_datasets(n=80, length=32, seed=4)
    assert not torch.equal(a[0].tensors[0], other[0].tensors[0])
    tokens = load_example("token_transformer")
    one, two = tokens.a_before_b(50, seed=1), tokens.a_before_b(50, seed=1)
    assert torch.equal(one.tokens, two.tokens) and one.targets == two.targets


def test_token_labels_say_whether_a_comes_first() -> None:
    tokens = load_example("token_transformer")
    data = tokens.a_before_b(200, seed=0)
    for row, label in zip(data.tokens, data.targets, strict=True):
        first_a = int((row == tokens.A).nonzero()[0])
        first_b = int((row == tokens.B).nonzero()[0])
        assert label == int(first_a < first_b)
    assert 80 <= sum(data.targets) <= 120


def test_diabetes_is_standardized_on_the_training_split_only() -> None:
    diabetes = load_example("diabetes_regression")
    train, val, test = diabetes.make_datasets(seed=0)
    x, y = train.tensors
    assert x.dtype == y.dtype == torch.float32 and y.shape == (len(train),)
    assert torch.allclose(x.mean(0), torch.zeros(10), atol=1e-5)
    assert torch.allclose(y.std(unbiased=False), torch.tensor(1.0), atol=1e-5)
    assert abs(float(val.tensors[1].mean())) > 1e-4  # not standardized on its own
    assert len(train) + len(val) + len(test) == 442


def test_lazy_folder_targets_match_the_files(tmp_path: Path) -> None:
    lazy = load_example("lazy_files")
    folder = lazy.make_datasets(root=str(tmp_path / "items"), n=40, n_classes=4)
    assert folder.targets == [int(folder[i][1]) for i in range(len(folder))]
    assert [folder.targets.count(c) for c in range(4)] == [10] * 4
    again = lazy.make_datasets(root=str(tmp_path / "items"), n=40, n_classes=4)
    assert torch.equal(again[3][0], folder[3][0])
    with pytest.raises(ValueError, match="generated with"):
        lazy.make_datasets(root=str(tmp_path / "items"), n=40, n_classes=4, noise=0.5)
