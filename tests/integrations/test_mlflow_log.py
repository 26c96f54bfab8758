"""MLflowLogger in a hand-written fit(), read back with MLflow's own client (a file: store)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("mlflow")

from trainwell import GradMonitor, fit  # noqa: E402
from trainwell.checkpoints import CheckpointManager  # noqa: E402
from trainwell.integrations.mlflow_log import (  # noqa: E402
    MLflowLogger,
    client_for,
    metric_name,
    saved_run_id,
)


def _problem():
    torch.manual_seed(0)
    x, y = torch.randn(48, 4), torch.randn(48, 1)
    data = DataLoader(TensorDataset(x, y), batch_size=8)  # 6 optimizer steps per epoch
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    return net, data, torch.optim.SGD(net.parameters(), lr=0.05)


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A 2-epoch fit logged to a new run, then 'resumed' from its checkpoint for 2 more."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = (root / "mlruns").as_uri()
    net, data, opt = _problem()
    monitor, manager = GradMonitor(net, every=4), CheckpointManager(root / "ckpt", keep_last=5)
    params = {"optimizer": {"lr": 0.05, "name": "sgd"}, "model": {"hidden": [8]}, "task": None}
    first = MLflowLogger(uri, "hand-written", run_name="r", run_id_path=root / "run.json",
                         params=params, tags={"kind": "test"}, every_n_steps=4,
                         monitor=monitor)  # fmt: skip
    fit(net, data, data, opt, F.mse_loss, epochs=2, monitor=monitor, checkpoints=manager,
        callbacks=[first])  # fmt: skip
    net, data, opt = _problem()
    monitor = GradMonitor(net, every=4)
    again = MLflowLogger(uri, "hand-written", run_id=saved_run_id(root / "run.json"),
                         params=params, every_n_steps=4, monitor=monitor)  # fmt: skip
    result = fit(net, data, data, opt, F.mse_loss, epochs=4, monitor=monitor,
                 checkpoints=manager, resume=True, callbacks=[again])  # fmt: skip
    again.log_test({"test_mse": 0.5})
    again.log_files([root / "run.json"], {"notes.txt": "hello"})
    again.close()
    return client_for(uri), first, again, result


def test_a_resumed_fit_continues_the_same_run(logged):
    client, first, again, result = logged
    assert again.run_id == first.run_id
    exp = client.get_experiment_by_name("hand-written")
    assert len(client.search_runs([exp.experiment_id])) == 1
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r"
    assert run.data.tags["kind"] == "test"
    for key in ("train_loss", "val_loss", "lr"):
        expected = [(row["epoch"], row[key]) for row in result.history]
        assert _history(client, first.run_id, key) == expected, key
    assert [s for s, _ in _history(client, first.run_id, "step/loss")] == [4, 8, 12, 16, 20, 24]
    grads = [(row["step"] + 1, row["grad_norm"]) for row in result.grad_history]
    assert _history(client, first.run_id, "grad/grad_norm") == grads  # floats as logged
    assert [s for s, _ in grads] == [1, 5, 9, 13, 17, 21]  # each row once, the resume included
    assert run.data.metrics["test_mse"] == 0.5


def test_params_are_the_flattened_config_and_files_are_artifacts(logged):
    client, first, _, _ = logged
    run = client.get_run(first.run_id)
    assert run.data.params == {
        "optimizer.lr": "0.05", "optimizer.name": "sgd", "model.hidden": "[8]", "task": "null"
    }  # fmt: skip
    assert {a.path for a in client.list_artifacts(first.run_id)} == {"run.json", "notes.txt"}
    saved = json.loads((first.run_id_path).read_text())
    assert saved["run_id"] == first.run_id and saved["tracking_uri"].startswith("file:")


def test_names_mlflow_refuses_are_made_valid():
    assert metric_name("update_ratio/(root)", "grad/") == "grad/update_ratio._root_"
    assert metric_name("val acc:top-1") == "val acc_top-1"


def test_a_store_that_cannot_be_opened_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    logger = MLflowLogger((blocker / "mlruns").as_uri(), "x")
    with pytest.raises((ValueError, OSError)) as found:
        logger.start()
    assert "\n" not in str(found.value)
