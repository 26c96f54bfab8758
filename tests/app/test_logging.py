"""``[logging]`` for `trainwell run`, `resume` and `ablate`, read back with TensorBoard's
reader and MLflow's client: values equal metrics.csv / the results store, a resumed run
continues its MLflow run and TensorBoard folder, a study is one experiment of tagged runs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from trainwell.app.config_files import load_config, to_toml
from trainwell.app.run_dir import claim, write_text  # noqa: E402
from trainwell.app.runner import train, write_run_dir  # noqa: E402
from trainwell.cli import app  # noqa: E402
from trainwell.integrations.fit_logging import flatten  # noqa: E402
from trainwell.integrations.mlflow_log import client_for, saved_run_id  # noqa: E402
from trainwell.study.store import Store, default_url  # noqa: E402

runner = CliRunner()
RUN = """
epochs = 4
batch_size = 32
[data]
source = "wine"
[model]
hidden = [16]
[gradients]
monitor = true
monitor_every = 5
[checkpoint]
enabled = true
keep_last = 10
[logging]
tensorboard = true
mlflow = "file:./mlruns"
every_n_steps = 3
"""
STUDY = """
epochs = 2
batch_size = 32
[data]
train_size = 120
[model]
hidden = [16]
[logging]
tensorboard = true
mlflow = "{uri}"
[ablation]
name = "tiny"
seeds = 2
[ablation.grid]
l2 = [1e-3]
"""


class _InterruptAt:
    """Ctrl-C at the start of optimizer step ``step`` (before the loggers see it)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, step: int, info: dict) -> None:
        if step == self.step:
            raise KeyboardInterrupt


def _csv(path: Path) -> list[dict[str, float]]:
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def _scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """`trainwell run` interrupted in epoch 2 of 4 (wine: 4 steps an epoch), then
    `trainwell resume` from another directory; its run directory and first MLflow run id."""
    root = tmp_path_factory.mktemp("logged")
    (root / "c.toml").write_text(RUN)
    cwd = Path.cwd()
    os.chdir(root)  # file:./mlruns is relative to the current directory
    try:
        config = load_config(root / "c.toml")
    finally:
        os.chdir(cwd)
    out = root / "run"
    claim(out, config)
    write_text(out / "config.toml", to_toml(config))
    result, model = train(config, out_dir=out, callbacks=(_InterruptAt(9),))
    assert result.stop_reason == "interrupted" and result.epochs_run == 2
    write_run_dir(out, config, result, model)
    first = saved_run_id(out / "mlflow_run.json")
    done = runner.invoke(app, ["resume", str(out), "-q"])
    assert done.exit_code == 0, done.output
    return out, first, client_for(config.logging.mlflow), config


def test_a_relative_mlflow_uri_is_kept_absolute_in_the_run_directory(resumed):
    out, _, _, config = resumed
    assert config.logging.mlflow == (out.parent / "mlruns").as_uri()
    assert load_config(out / "config.toml").logging.mlflow == config.logging.mlflow


def test_resume_continues_the_mlflow_run_and_every_epoch_equals_metrics_csv(resumed):
    out, first, client, _ = resumed
    assert saved_run_id(out / "mlflow_run.json") == first
    experiment = client.get_experiment_by_name("trainwell")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [first]
    run = client.get_run(first)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    rows = _csv(out / "metrics.csv")
    assert len(rows) == 4
    for key in rows[0]:
        if key != "epoch":
            assert _history(client, first, key) == [(int(r["epoch"]), r[key]) for r in rows], key
    assert [s for s, _ in _history(client, first, "step/loss")] == [3, 6, 9, 12, 15]
    grads = [(int(r["step"]) + 1, r["grad_norm"]) for r in _csv(out / "grad_norms.csv")]
    assert _history(client, first, "grad/grad_norm") == grads
    summary = json.loads((out / "summary.json").read_text())
    for key, value in summary["test"].items():
        assert _history(client, first, key)[-1] == (3, value), key


def test_params_are_the_config_and_the_run_files_are_artifacts(resumed):
    out, first, client, config = resumed
    run = client.get_run(first)
    dumped = flatten(config.model_dump(mode="json", exclude={"ablation", "logging"}))
    expected = {k: v if isinstance(v, str) else json.dumps(v) for k, v in dumped.items()}
    assert run.data.params == expected
    assert run.data.params["optimizer.lr"] == "0.001" and run.data.params["epochs"] == "4"
    assert run.data.tags["run_dir"] == str(out.resolve())
    artifacts = {a.path for a in client.list_artifacts(first)}
    assert artifacts == {"config.toml", "metrics.csv", "grad_norms.csv", "summary.json",
                         "curves.png"}  # fmt: skip


def test_tensorboard_appends_to_the_run_directory_folder(resumed):
    out, *_ = resumed
    folder = out / "tensorboard"
    rows = _csv(out / "metrics.csv")
    for key in ("train_loss", "val_loss", "val_acc", "lr"):
        found = _scalars(folder, f"epoch/{key}")
        assert [s for s, _ in found] == [0, 1, 2, 3], key
        assert [v for _, v in found] == pytest.approx([r[key] for r in rows], rel=1e-6), key
    assert [s for s, _ in _scalars(folder, "step/loss")] == [3, 6, 9, 12, 15]
    summary = json.loads((out / "summary.json").read_text())
    tested = _scalars(folder, "test/test_acc")  # the interrupted run's at epoch 1, then the end
    assert tested[-1] == (3, pytest.approx(summary["test"]["test_acc"])) and len(tested) == 2


def test_a_study_is_one_experiment_of_runs_tagged_variant_data_seed(tmp_path):
    uri = (tmp_path / "mlruns").as_uri()
    (tmp_path / "s.toml").write_text(STUDY.format(uri=uri))
    out = tmp_path / "study"
    args = ["ablate", str(tmp_path / "s.toml"), "--out", str(out), "-q", "-j", "2"]
    done = runner.invoke(app, args)  # -j 2: the runs train in worker processes
    assert done.exit_code == 0, done.output
    client = client_for(uri)
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    tags = {(r.data.tags["variant"], r.data.tags["data"], r.data.tags["seed"]) for r in runs}
    assert len(runs) == 4 and tags == {
        (v, "all data", s) for v in ("base", "l2=0.001") for s in ("0", "1")
    }  # fmt: skip
    assert {r.data.tags["study"] for r in runs} == {"tiny"}
    store = Store(default_url(out), create=False)
    stored = {(r["variant"], str(r["seed"])): r for r in store.runs(store.study_id("tiny"))}
    for run in runs:
        mine = stored[(run.data.tags["variant"], run.data.tags["seed"])]
        logged = [v for _, v in _history(client, run.info.run_id, "val_loss")]
        assert logged == mine["history"]["val_loss"]
        assert run.data.metrics["test_acc"] == mine["final"]["test_acc"]
        assert run.data.params["regularization.l2"] == str(mine["overrides"].get(
            "regularization.l2", 0.0))  # fmt: skip
        folder = out / "tensorboard" / run.info.run_name.replace("/", "_").replace(" ", "_")
        found = [v for _, v in _scalars(folder, "epoch/val_loss")]
        assert found == pytest.approx(logged, rel=1e-6)
        assert "config.toml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert len(list((out / "tensorboard").iterdir())) == 4


def test_ensemble_members_log_into_the_run_directory_named_by_member(tmp_path, monkeypatch):
    """An ``[ensemble]`` run's members train without run directories of their own: each is
    its own MLflow run ``<run>/member<i>`` and TensorBoard folder under RUN_DIR, never in
    the current directory."""
    uri = (tmp_path / "mlruns").as_uri()
    (tmp_path / "e.toml").write_text(
        'epochs = 2\n[data]\nsource = "wine"\n[model]\nhidden = [8]\n[ensemble]\n'
        f'members = 2\n[logging]\ntensorboard = true\nmlflow = "{uri}"\n'
    )
    monkeypatch.chdir(tmp_path)
    done = runner.invoke(app, ["run", "e.toml", "--out", "ens", "-q"])
    assert done.exit_code == 0, done.output
    assert not (tmp_path / "tensorboard").exists()
    assert sorted(p.name for p in (tmp_path / "ens" / "tensorboard").iterdir()) == [
        "ens_member0", "ens_member1"]  # fmt: skip
    client = client_for(uri)
    runs = client.search_runs([client.get_experiment_by_name("trainwell").experiment_id])
    assert sorted((r.info.run_name, r.data.tags["member"]) for r in runs) == [
        ("ens/member0", "0"), ("ens/member1", "1")]  # fmt: skip
    for run in runs:
        assert len(_history(client, run.info.run_id, "val_loss")) == 2


@pytest.mark.parametrize(
    ("setting", "key"),
    [("logging.tensorboard=3", "logging.tensorboard"), ("logging.mlflow=true", "logging.mlflow"),
     ("logging.every_n_steps=-1", "logging.every_n_steps"), ("logging.tb=true", "logging.tb")],
)  # fmt: skip
def test_a_bad_logging_value_is_one_line_and_exit_2(tmp_path, setting, key):
    (tmp_path / "x.toml").write_text("")
    done = runner.invoke(app, ["run", str(tmp_path / "x.toml"), "--set", setting])
    lines = done.output.strip().splitlines()
    assert done.exit_code == 2 and len(lines) == 1, done.output
    assert lines[0].startswith(f"trainwell: error: {key}:")


def test_a_bad_logging_value_fails_a_study_before_it_trains(tmp_path):
    (tmp_path / "s.toml").write_text(STUDY.format(uri="file:./m").replace("true", "0", 1))
    done = runner.invoke(app, ["ablate", str(tmp_path / "s.toml"), "--out", str(tmp_path / "o")])
    assert done.exit_code == 2 and "logging.tensorboard" in done.output
    assert not (tmp_path / "o").exists()


MISSING = """
import json, sys
sys.modules[{module!r}] = None  # as if it were not installed
from typer.testing import CliRunner
from trainwell.cli import app
found = []
for args in {commands!r}:
    done = CliRunner().invoke(app, args)
    found.append([done.exit_code, done.output])
print(json.dumps(found))
"""


@pytest.mark.parametrize(
    ("module", "setting"),
    [("mlflow", 'mlflow = "file:./m"'), ("tensorboard", "tensorboard = true")],
)
def test_a_missing_extra_is_one_line_and_exit_2_before_anything_trains(tmp_path, module, setting):
    run = tmp_path / "run.toml"
    run.write_text(f"epochs = 1\n[logging]\n{setting}\n")
    study = tmp_path / "study.toml"
    study.write_text(f"epochs = 1\n[logging]\n{setting}\n[ablation]\nseeds = 1\n")
    commands = [["run", str(run), "--out", str(tmp_path / "r"), "-q"],
                ["ablate", str(study), "--out", str(tmp_path / "s"), "-q"]]  # fmt: skip
    script = textwrap.dedent(MISSING.format(module=module, commands=commands))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120, check=True)  # fmt: skip
    for code, output in json.loads(done.stdout.strip().splitlines()[-1]):
        lines = output.strip().splitlines()
        assert code == 2 and len(lines) == 1, output
        needs = f"needs {module}, which is not installed: pip install 'trainwell[{module}]'"
        assert needs in lines[0]
    assert not (tmp_path / "r").exists() and not (tmp_path / "s" / "results.sqlite").exists()
