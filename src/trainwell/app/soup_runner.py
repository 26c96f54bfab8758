"""Souping a run: average the checkpoints a run kept into one model (``trainwell soup``).

Ingredients are the model weights of every valid checkpoint in ``RUN_DIR/checkpoints``
that belongs to the run's config (same config hash; a corrupt one is skipped).
``greedy`` follows Wortsman et al. 2022 (add an ingredient only if the validation score
-- accuracy, or MSE for regression -- of the running average does not get worse);
``uniform`` averages them all. Each
ingredient's and the soup's validation and test metrics are reported, so a user sees
whether souping helped rather than assuming it. Every checkpoint left out is named, in the
words ``trainwell resume`` uses ("skipped corrupt ckpt-... (why)").
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from safetensors.torch import save

from trainwell.app.config_files import load_config
from trainwell.app.run_dir import HASH_KEY, config_hash, write_bytes
from trainwell.app.runner import load_data, model_for, step_of, task_of, test_metrics
from trainwell.app.tasks import higher_is_better, validation_metrics
from trainwell.averaging.soups import greedy_soup, uniform_soup
from trainwell.checkpoints import CheckpointError, load, read_metadata
from trainwell.training.evaluation import evaluate

_CHECKPOINT = re.compile(r"ckpt-(\d+)\.safetensors")


def _step(path: Path) -> int | None:
    """The step in a checkpoint's file name, None for other files."""
    match = _CHECKPOINT.fullmatch(path.name)
    return int(match.group(1)) if match else None


def _weights_of_run(folder: Path, own: str) -> tuple[list[tuple[Path, dict]], list[str]]:
    """The model weights of each checkpoint in ``folder`` of the config hashed ``own``.

    Returns ``(path, weights)`` pairs, oldest step first, and a line for each checkpoint
    skipped: corrupt or unreadable (as ``trainwell resume`` words it), another config's
    (never mixed into this run's soup), or without model weights.
    """
    files = [p for p in folder.iterdir() if _step(p) is not None] if folder.is_dir() else []
    found, skipped = [], []
    for path in sorted(files, key=_step):
        try:
            if read_metadata(path).get(HASH_KEY, own) != own:
                skipped.append(f"skipped {path.name} (another config's checkpoint)")
                continue
            state = load(path)
        except (CheckpointError, OSError) as err:
            skipped.append(f"skipped corrupt {path.name} ({err})")
            continue
        weights = state.get("model") if isinstance(state, dict) else None
        if not isinstance(weights, dict):
            skipped.append(f"skipped {path.name} (it holds no model weights)")
            continue
        found.append((path, weights))
    return found, skipped


def soup_run(run_dir: Path, method: str = "greedy", out: Path | None = None) -> dict[str, Any]:
    """Soup the checkpoints of ``run_dir``; write the soup and return the scores.

    The result holds ``rows`` (metrics per ingredient and for the soup), ``chosen`` (the
    checkpoints in the soup), ``path`` (the soup file) and ``skipped`` (a line per
    checkpoint left out, for the CLI to print).
    """
    if method not in {"greedy", "uniform"}:
        raise ValueError(f"--method must be 'greedy' or 'uniform', got {method!r}")
    if out is not None and Path(out).is_dir():
        example = Path(out) / "soup.safetensors"
        raise ValueError(f"--out: {out} is a directory; give a file path such as {example}")
    config = load_config(run_dir / "config.toml")
    found, skipped = _weights_of_run(run_dir / "checkpoints", config_hash(config))
    if len(found) < 2:
        left_out = f"; {'; '.join(skipped)}" if skipped else ""
        raise ValueError(
            f"{run_dir}: soup needs at least 2 checkpoints, found {len(found)} "
            f"(raise checkpoint.keep_last){left_out}"
        )
    splits = load_data(config)
    val = splits.loader("val", 512)
    paths, ingredients = [], []
    for path, weights in found:
        model = model_for(config, splits)
        model.load_state_dict(weights)
        paths.append(path)
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
    weights = save({k: v.detach().contiguous() for k, v in soup.state_dict().items()})
    write_bytes(out, lambda f: f.write(weights))  # atomic, like every file of a run
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
    return {
        "rows": rows,
        "chosen": [Path(paths[i]).name for i in chosen],
        "path": str(out),
        "skipped": skipped,
    }
