"""Souping a run: average the checkpoints a run kept into one model (``trainwell soup``).

Ingredients are the model weights of every valid checkpoint in ``RUN_DIR/checkpoints``
that belongs to the run's config (same config hash; a corrupt one is skipped).
``greedy`` follows Wortsman et al. 2022 (add an ingredient only if the validation score
-- accuracy, or MSE for regression -- of the running average does not get worse);
``uniform`` averages them all. Each
ingredient's and the soup's validation and test metrics are reported, so a user sees
whether souping helped rather than assuming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from trainwell.app.config import load_config
from trainwell.app.run_dir import HASH_KEY, config_hash
from trainwell.app.runner import load_data, model_for, step_of, task_of, test_metrics
from trainwell.app.tasks import higher_is_better, validation_metrics
from trainwell.averaging.soups import greedy_soup, uniform_soup
from trainwell.checkpoints import CheckpointManager, load, read_metadata, verify
from trainwell.training.evaluation import evaluate


def soup_run(run_dir: Path, method: str = "greedy", out: Path | None = None) -> dict[str, Any]:
    """Soup the checkpoints of ``run_dir``; write the soup and return the scores."""
    if method not in {"greedy", "uniform"}:
        raise ValueError(f"--method must be 'greedy' or 'uniform', got {method!r}")
    config = load_config(run_dir / "config.toml")
    manager = CheckpointManager(run_dir / "checkpoints")
    own = config_hash(config)
    paths = []
    for info in manager.checkpoints():  # only this run's checkpoints: never another config's
        if read_metadata(info.path).get(HASH_KEY, own) == own and verify(info.path):
            paths.append(info.path)
    if len(paths) < 2:
        raise ValueError(
            f"{run_dir}: soup needs at least 2 checkpoints, found {len(paths)} "
            "(raise checkpoint.keep_last)"
        )
    splits = load_data(config)
    val = splits.loader("val", 512)
    ingredients = []
    for path in paths:
        model = model_for(config, splits)
        model.load_state_dict(load(path)["model"])
        ingredients.append(model)

    task, step = task_of(config), step_of(config)
    key = "val_acc" if task.kind == "classification" else "val_mse"
    mode = "max" if higher_is_better(key) else "min"

    def score(model) -> float:
        metrics = validation_metrics(task)
        return evaluate(model, val, task.loss, "cpu", step=step, metrics=metrics)[key]

    if method == "greedy":
        soup, chosen, _ = greedy_soup(ingredients, score, mode=mode)
    else:
        soup, chosen = uniform_soup(ingredients), list(range(len(ingredients)))
    out = out or run_dir / f"soup-{method}.safetensors"
    save_file({k: v.detach().contiguous() for k, v in soup.state_dict().items()}, str(out))
    rows = [
        {"model": Path(p).name, key: score(m), **test_metrics(m, splits, "cpu", task, step)}
        for p, m in zip(paths, ingredients, strict=True)
    ]
    rows.append(
        {
            "model": f"{method} soup",
            key: score(soup),
            **test_metrics(soup, splits, "cpu", task, step),
        }
    )
    return {"rows": rows, "chosen": [Path(paths[i]).name for i in chosen], "path": str(out)}
