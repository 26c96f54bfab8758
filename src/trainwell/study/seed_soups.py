"""Soups of a study's seeds: one model averaged from seed runs that share a start.

A soup averages the weights of models fine-tuned from the same starting weights (Wortsman
et al. 2022, "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time"). A variant's seed runs qualify when they
start from one initialization (equal ``init_hash``, the
:func:`trainwell.app.runner.weights_fingerprint` of the model before training: e.g. a
``model.target`` that loads one pretrained checkpoint) and train on one data split. Every
done run stores its fingerprint and, for models of at most :data:`WEIGHTS_LIMIT` state
values, its final weights (safetensors bytes, never pickle) in the store's ``weights``
table. A built-in model (``model.kind``) is initialized from the run's own seed, so its
seeds never share a start: its weights are not kept (the demo's store stays small).

For each data size and variant with >= 2 done seed runs that qualify, the model is
rebuilt from the run config (:func:`trainwell.app.runner.model_for`), each seed's weights
are loaded, and two soups are made:

* the greedy soup (their Recipe 1, :func:`trainwell.averaging.soups.greedy_soup`): the
  seeds sorted by the study's validation metric (``[ablation] metric``; default NLL, or
  MSE for regression), best first; each next seed is kept when the uniform average of the
  kept ones plus it, ``theta = (1/k) sum_{i in soup} theta_i``, is not worse on the
  *validation* split. The test split never takes part in the choice.
* the uniform soup, ``theta = (1/n) sum_i theta_i`` over every seed.

Parameters and float buffers are averaged; integer buffers (BatchNorm's
``num_batches_tracked``) are taken from one member, never averaged as floats
(:func:`trainwell.averaging.weights.average_weights`). BatchNorm statistics are stale after
averaging, and recalibrating can also hurt: every candidate soup is scored on validation
as averaged and after :func:`trainwell.averaging.weights.update_bn` on the training split,
and the better one counts. Soups and their single members are scored on test like the
ensembles of seeds (:func:`trainwell.study.seed_ensembles.score_outputs`: NLL, ECE and
accuracy of probabilities; MSE for regression), on the same common test items. A soup is
one model: its inference cost is 1x. Where no soup is made, the row's ``note`` says why.
"""

from __future__ import annotations

import base64
import copy
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from trainwell.study.seed_ensembles import (
    aligned,
    common_items,
    decode_predictions,
    encode_predictions,
    headline,
    indices_of_test_split,
    score_outputs,
)

#: the final weights of a model with at most this many state values (parameters and
#: buffers) are kept: at most 16 MB of float32 per run
WEIGHTS_LIMIT = 4_000_000
SPLITS = ("train", "val", "test")


def encode_weights(model: nn.Module, keep: bool = True) -> dict[str, Any]:
    """A trained model's final weights for a run's payload: base64 safetensors bytes.

    ``{"format": "safetensors", "values": n, "data": base64 text or None}``; ``data`` is
    None when not ``keep``, above :data:`WEIGHTS_LIMIT` values or for a state that is not
    all tensors.

    Example:
        >>> stored = encode_weights(nn.Linear(3, 2))
        >>> stored["values"], sorted(decode_weights(base64.b64decode(stored["data"])))
        (8, ['bias', 'weight'])
    """
    from safetensors.torch import save

    state = model.state_dict()
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    values = sum(int(t.numel()) for t in tensors.values())
    data = None
    if keep and values <= WEIGHTS_LIMIT and len(tensors) == len(state):
        # clones: safetensors refuses tensors that share memory (tied weights)
        blob = save({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()})
        data = base64.b64encode(blob).decode("ascii")
    return {"format": "safetensors", "values": values, "data": data}


def decode_weights(blob: bytes) -> dict[str, torch.Tensor]:
    """The state dict in stored safetensors bytes (data only: loading runs no code)."""
    from safetensors.torch import load

    return load(blob)


def no_soup_reason(group: list[dict[str, Any]], fingerprints: dict[int, dict]) -> str | None:
    """Why the seed runs ``group`` cannot make a soup, or None when their stored
    fingerprints and weights allow one (one ``init_hash``, every run's weights kept)."""
    found = [fingerprints.get(r["id"]) for r in group]
    if any(f is None or f.get("init_hash") is None for f in found):
        return (
            "no soup: the store holds no starting-weights fingerprint for these runs "
            "(they finished before trainwell kept one)"
        )
    starts = {f["init_hash"] for f in found}
    if len(starts) > 1:
        return (
            f"no soup: its {len(group)} seeds start from {len(starts)} different "
            "initializations, and a soup needs runs that share an initialization (e.g. "
            "fine-tunes of one checkpoint: a model.target that loads it)"
        )
    missing = [f for f in found if not f["kept"]]
    if missing:
        size = max(int(f["n_values"] or 0) for f in missing)
        return (
            f"no soup: weights not kept (the model holds {size:,} values; trainwell keeps "
            f"the weights of models up to {WEIGHTS_LIMIT:,})"
        )
    return None


def _split_tensors(splits: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [splits.tensors(s) for s in SPLITS]


def shared_split(configs: Sequence[Any]) -> bool:
    """Whether every run of ``configs`` trained, validated and tested on one data split.

    True when they draw the split with one seed (``data.split_seed``); for a
    ``data.target`` entry point also when the splits it gives are equal item for item.
    """
    from trainwell.app.runner import load_data

    if len({c.data.data_seed(c.seed) for c in configs}) == 1:
        return True
    d = configs[0].data
    if not (d.target and ":" in d.target):
        return False
    try:
        first = _split_tensors(load_data(configs[0]))
        for config in configs[1:]:
            other = _split_tensors(load_data(config))
            if not all(
                torch.equal(a, b) for pair, mine in zip(other, first, strict=True)
                for a, b in zip(pair, mine, strict=True)
            ):  # fmt: skip
                return False
    except (TypeError, RuntimeError):  # items that are not (input, target) tensor pairs
        return False
    return True


@dataclass
class Soups:
    """The greedy and uniform soups of some members, and their validation scores."""

    greedy: nn.Module
    chosen: list[int]
    history: list[dict[str, Any]]
    uniform: nn.Module
    uniform_recalibrated: bool
    val: dict[str, Any] = field(default_factory=dict)


def _better(a: float, b: float, higher: bool) -> bool:
    """``a`` strictly better than ``b`` (NaN is never better)."""
    return (a > b) if higher else (a < b)


def _best_of_recalibration(
    soup: nn.Module, score: Callable[[nn.Module], float], train: Any, forward: Any, higher: bool
) -> tuple[nn.Module, bool, float]:
    """``(soup, recalibrated, val score)``: as averaged or after ``update_bn`` on
    ``train``, whichever is better on validation (as averaged on a tie)."""
    from trainwell.averaging.weights import update_bn

    raw = score(soup)
    calibrated = copy.deepcopy(soup)
    if update_bn(calibrated, train, forward) == 0:
        return soup, False, raw
    recal = score(calibrated)
    return (calibrated, True, recal) if _better(recal, raw, higher) else (soup, False, raw)


def make_soups(
    models: Sequence[nn.Module],
    splits: Any,
    task: Any,
    step: Any,
    key: str,
    higher: bool,
    batch_size: int = 512,
) -> Soups:
    """The greedy soup (chosen on ``splits``' validation split by ``key``) and the uniform
    soup of ``models``, each BatchNorm-recalibrated on the training split where that scores
    better on validation. ``key`` is a name :func:`trainwell.training.evaluation.evaluate`
    reports (``val_loss``, ``val_acc``, ``val_mse``, ...); ``higher`` its direction."""
    from trainwell.app.tasks import validation_metrics
    from trainwell.averaging.soups import greedy_soup, uniform_soup
    from trainwell.training.evaluation import evaluate

    val, train = splits.loader("val", 512), splits.loader("train", batch_size)
    metrics = validation_metrics(task)

    def score(model: nn.Module) -> float:
        return evaluate(model, val, task.loss, "cpu", step=step, metrics=metrics)[key]

    def forward(model: nn.Module, batch: Any) -> None:
        step(model, batch, task.loss)

    mode = "max" if higher else "min"
    greedy, chosen, history = greedy_soup(
        list(models), score, mode=mode, recalibrate_bn=train, forward=forward
    )
    uniform, recalibrated, uniform_val = _best_of_recalibration(
        uniform_soup(list(models)), score, train, forward, higher
    )
    scores = {h["index"]: h["ingredient_score"] for h in history}
    val = {
        "members": [scores[i] for i in range(len(models))],
        "greedy": next(h["soup_score"] for h in reversed(history) if h["accepted"]),
        "uniform": uniform_val,
    }
    return Soups(greedy, chosen, history, uniform, recalibrated, val)


def _test_outputs(model: nn.Module, splits: Any, task: Any, step: Any, indices: Any) -> Any:
    """``(outputs, targets, indices)`` of a model on the test split, as stored predictions
    are (probabilities for classification), or a ``ValueError``."""
    from trainwell.training.evaluation import predict

    outputs, targets = predict(
        model, splits.loader("test", 512), "cpu", step=step, loss_fn=task.loss
    )
    stored = encode_predictions(outputs, targets, task.kind, indices)
    if stored is None:
        raise ValueError("its test outputs are too large or not one row per test item")
    return decode_predictions(stored)


def _items(common: Any, indices: np.ndarray | None) -> tuple[Any, bool]:
    """The test items to score on (``aligned``'s ``common``) and whether they are the
    data size's common items (the ensembles'); else the whole shared test split."""
    if common is None:
        return None, True
    known = isinstance(common, list) and common and indices is not None
    if known and set(common) <= {int(i) for i in indices}:
        return common, True
    return None, False


def _member(config: Any, splits: Any, blob: bytes) -> nn.Module:
    from trainwell.app.runner import model_for

    model = model_for(config, splits)
    model.load_state_dict(decode_weights(blob))
    return model.eval()


def _scored(
    group: list[dict[str, Any]],
    load_weights: Callable[[list[int]], dict[int, bytes]],
    common: Any,
    metric: str | None,
) -> dict[str, Any]:
    """The soup row's scores for seed runs that share a start and a split."""
    from trainwell.app.config import validate
    from trainwell.app.runner import load_data, step_of, task_of
    from trainwell.study.statistics import primary_metric

    raw = json.loads(group[0]["config"])
    config = validate(raw)
    splits, task, step = load_data(config), task_of(config), step_of(config)
    primary = primary_metric(raw, metric)
    blobs = load_weights([r["id"] for r in group])
    models = [_member(config, splits, blobs[r["id"]]) for r in group]
    soups = make_soups(models, splits, task, step, primary.key, primary.higher, config.batch_size)
    indices = indices_of_test_split(config)
    items, is_common = _items(common, indices)
    outputs = [_test_outputs(m, splits, task, step, indices) for m in models]
    outputs += [
        _test_outputs(m, splits, task, step, indices) for m in (soups.greedy, soups.uniform)
    ]
    scored, target = aligned(outputs, items)
    singles = [score_outputs(o, target, task.kind) for o in scored[: len(models)]]
    return {
        "kind": task.kind,
        "items": len(target),
        "common": is_common,
        "selection": primary.name,
        "member_scores": singles,
        "member_mean": {k: float(np.mean([s[k] for s in singles])) for k in singles[0]},
        "greedy": score_outputs(scored[-2], target, task.kind),
        "uniform": score_outputs(scored[-1], target, task.kind),
        "chosen": [group[i]["seed"] for i in soups.chosen],
        "recalibrated": {
            "greedy": next(h["recalibrated"] for h in reversed(soups.history) if h["accepted"]),
            "uniform": soups.uniform_recalibrated,
        },
        "val": soups.val,
    }


def seed_soups(
    runs: list[dict[str, Any]],
    fingerprints: dict[int, dict[str, Any]],
    load_weights: Callable[[list[int]], dict[int, bytes]],
    predictions: dict[int, dict] | None = None,
    metric: str | None = None,
) -> list[dict[str, Any]]:
    """One row per data size and variant with >= 2 done seed runs: its soups, or why not.

    ``fingerprints`` and ``load_weights`` are the store's ``Store.fingerprints(study_id)``
    and ``Store.weights``;
    ``predictions`` (the store's) give the common test items the ensembles are scored on;
    ``metric`` is the study's ``[ablation] metric`` (the greedy soup's validation metric).
    Each row: ``data``, ``variant``, ``members``, ``seeds`` and either ``note`` or
    ``kind``, ``items``, ``common`` (scored on the ensembles' common test items),
    ``selection``, ``member_scores``, ``member_mean``, ``greedy``, ``uniform`` (test
    scores), ``chosen`` (the greedy soup's seeds, in the order added), ``recalibrated``
    and ``val`` (validation scores of the members and of both soups).
    """
    from trainwell.app.config import ConfigError
    from trainwell.study.failures import error_line

    done = [r for r in runs if r.get("status") == "done"]
    commons = common_items(done, predictions or {})
    out: list[dict[str, Any]] = []
    for data in dict.fromkeys(r["data"] for r in done):
        sized = [r for r in done if r["data"] == data]
        for variant in dict.fromkeys(r["variant"] for r in sized):
            group = [r for r in sized if r["variant"] == variant]
            if len(group) < 2:
                continue
            row: dict[str, Any] = {"data": data, "variant": variant, "members": len(group),
                                   "seeds": [r["seed"] for r in group]}  # fmt: skip
            try:
                row.update(_soup_row(group, fingerprints, load_weights, commons, data, metric))
            except (ConfigError, ValueError, TypeError, ImportError, OSError, RuntimeError) as err:
                row["note"] = f"no soup: {error_line(err)}"
            out.append(row)
    return out


def _soup_row(
    group: list[dict[str, Any]],
    fingerprints: dict[int, dict[str, Any]],
    load_weights: Callable[[list[int]], dict[int, bytes]],
    commons: dict[str, Any],
    data: str,
    metric: str | None,
) -> dict[str, Any]:
    from trainwell.app.config import validate

    note = no_soup_reason(group, fingerprints)
    if note is not None:
        return {"note": note}
    if not shared_split([validate(json.loads(r["config"])) for r in group]):
        return {
            "note": "no soup: its seeds share an initialization but each draws its own data "
            "split (inputs scaled and held out differently); set data.split_seed so every "
            "seed shares one split"
        }
    with torch.random.fork_rng():  # update_bn may run dropout: reproducible reports
        torch.manual_seed(0)
        return _scored(group, load_weights, commons.get(data, False), metric)


def soups_beat_every_single(
    soups: list[dict[str, Any]],
    ensembles: list[dict[str, Any]],
    chosen: dict[str, str],
    metric: str | None = None,
) -> list[str]:
    """One sentence per data size where a soup of seeds beats every single technique.

    Only the soups of ``chosen[data]``, the variant chosen on validation, are candidates
    (the better of its greedy and uniform soup; never the best soup on test); the soup
    must beat the best variant's mean single member (lowest ``metric``; default
    :func:`~trainwell.study.seed_ensembles.headline`), on the common test items of the
    ensembles (soups scored on other items are not compared). A greedy soup of one seed
    is that run alone, not a soup: it is never claimed.
    """
    sentences = []
    for data in dict.fromkeys(r["data"] for r in soups):
        made = [r for r in soups if r["data"] == data and r.get("common")]
        singles_here = [r for r in [*ensembles, *made] if r["data"] == data]
        made = [r for r in made if r["variant"] == chosen.get(data)]
        if not made:
            continue
        key = metric or headline(made[0]["kind"])
        singles = [r for r in singles_here if key in r.get("member_mean", {})]
        pairs = [(r, w) for r in made for w in ("greedy", "uniform") if key in r[w]]
        pairs = [(r, w) for r, w in pairs if w == "uniform" or len(r["chosen"]) > 1]
        if not singles or not pairs:
            continue
        best_single = min(singles, key=lambda r: r["member_mean"][key])
        row, which = min(pairs, key=lambda p: p[0][p[1]][key])
        value, single = row[which][key], best_single["member_mean"][key]
        if math.isfinite(value) and value < single:
            k = len(row["chosen"]) if which == "greedy" else row["members"]
            sentences.append(
                f"With {data}, the {which} soup of {row['variant']}'s seeds ({k} of "
                f"{row['members']} averaged) beats every single technique on test "
                f"{key.removeprefix('test_')}: {value:.4g} vs {single:.4g} for the best single "
                f"run ({best_single['variant']}, mean member), on {row['items']} common test "
                "items, at 1x the inference cost (a soup is one model)."
            )
    return sentences
