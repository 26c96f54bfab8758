"""Ensembles of a study's seeds: each variant's seed runs are independently trained members.

Every done run keeps its test-split predictions (class probabilities, or regression
outputs) in the store's ``predictions`` table, with the indices of its test items in the
dataset. By default a run's split is drawn from its seed, so seeds see different test
splits: the ensemble of a variant's seeds is scored on the items that are in the test
split of *every* run of that data size (never in any member's training split), and its
members are scored on the same items. That common set shrinks with every seed; with
``data.split_seed`` set, every seed shares one split and the whole test split counts.
For classification the ensemble averages probabilities and is scored on NLL, ECE and
accuracy beside the mean single member; for regression it averages the outputs and is
scored on MSE. Its inference cost is the number of members.

Weight soups of the same seeds, where they share an initialization, are
:mod:`trainwell.study.seed_soups`'s; they are scored on the same common test items
(:func:`common_items`).
"""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np

#: at most this many predicted values are kept as float32; up to ``FLOAT16_LIMIT`` as
#: float16, and beyond that no predictions are kept (the payload and the store stay small)
FLOAT32_LIMIT = 1_000_000
FLOAT16_LIMIT = 8_000_000


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _unb64(text: str, dtype: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype)


def indices_of_test_split(config: Any) -> np.ndarray | None:
    """The dataset rows of a run's test split, in the order its test loader yields them.

    None for a ``data.target = "module:function"`` source, whose split trainwell does not
    draw. Mirrors :func:`trainwell.app.data.load_splits`.
    """
    from trainwell.app.data import split_indices
    from trainwell.app.data_files import read_source

    d = config.data
    if d.target and ":" in d.target:
        return None
    found = read_source(d.source, d.target)
    labels = None
    if config.task.kind == "classification":
        y = found.y[:, 0] if found.y.ndim == 2 and found.y.shape[1] == 1 else found.y
        labels = np.unique(y, return_inverse=True)[1].reshape(-1)
    seed = d.data_seed(config.seed)
    _, _, test = split_indices(len(found.y), labels, d.val_fraction, d.test_fraction, seed)
    return np.asarray(test)


def encode_predictions(
    outputs: Any, targets: Any, kind: str, indices: np.ndarray | None
) -> dict[str, Any] | None:
    """A run's test predictions for its payload: base64 arrays, compact and JSON-safe.

    ``outputs`` are logits (classification: stored as softmax probabilities; one logit per
    item, as ``bce_with_logits`` trains, is the two-class ``[1 - sigmoid, sigmoid]``) or
    regression outputs. Stored as float32 up to ``FLOAT32_LIMIT`` values, float16 up to
    ``FLOAT16_LIMIT``; None (nothing kept) beyond, or for outputs that are not one row
    per test item.
    """
    import torch

    outputs = torch.as_tensor(outputs).detach().float().cpu()
    targets = torch.as_tensor(targets).detach().cpu()
    if outputs.dim() == 1:
        outputs = outputs[:, None]
    if outputs.dim() != 2 or len(outputs) != len(targets):
        return None
    if indices is not None and len(indices) != len(outputs):
        indices = None
    if kind == "classification":
        if outputs.shape[1] == 1:  # one logit z per item (bce_with_logits): P(1) = sigmoid(z)
            outputs = torch.cat([torch.zeros_like(outputs), outputs], dim=1)
        outputs = torch.softmax(outputs, dim=1)
    size = outputs.numel()
    if size > FLOAT16_LIMIT:
        return None
    dtype = "float32" if size <= FLOAT32_LIMIT else "float16"
    target = targets.numpy()
    target = target.astype("int32" if kind == "classification" else "float32").reshape(
        len(target), -1
    )
    return {
        "kind": kind,
        "dtype": dtype,
        "shape": list(outputs.shape),
        "values": _b64(outputs.numpy().astype(dtype)),
        "targets": _b64(target),
        "target_dtype": str(target.dtype),
        "indices": None if indices is None else _b64(np.asarray(indices, dtype="int64")),
    }


def decode_predictions(
    stored: dict[str, Any],
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(outputs (n, k) float32, targets (n, ...), dataset indices or None)``."""
    n, k = stored["shape"]
    values = _unb64(stored["values"], stored["dtype"]).astype("float32").reshape(n, k)
    targets = _unb64(stored["targets"], stored["target_dtype"]).reshape(n, -1)
    if stored["kind"] == "classification":
        targets = targets[:, 0]
    indices = stored.get("indices")
    return values, targets, None if indices is None else _unb64(indices, "int64")


def score_outputs(outputs: np.ndarray, targets: np.ndarray, kind: str) -> dict[str, float]:
    """Test NLL, ECE and accuracy of probabilities (classification), or MSE of outputs."""
    import torch

    from trainwell import metrics

    out, y = (
        torch.from_numpy(np.ascontiguousarray(outputs, dtype=np.float64)),
        torch.as_tensor(targets),
    )
    if kind == "classification":
        out = out / out.sum(dim=1, keepdim=True)  # float16 / float32 rounding
        return {
            "test_nll": metrics.nll(out, y.long(), kind="probs"),
            "test_ece": metrics.ece(out, y.long(), kind="probs"),
            "test_acc": metrics.accuracy(out, y.long()),
        }
    return {"test_mse": metrics.mse(out.reshape(y.shape), y.double())}


def aligned(members: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]], common: Any) -> Any:
    """Each member's outputs and the targets on the common items, in one order."""
    if common is None:  # no indices: every member scored the same test set, row by row
        return [m[0] for m in members], members[0][1]
    out, target = [], None
    for values, targets, indices in members:
        where = {int(i): r for r, i in enumerate(indices)}
        rows = np.array([where[int(i)] for i in common], dtype=np.int64)
        out.append(values[rows])
        target = targets[rows]
    return out, target


def _common(group: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]) -> Any:
    """The dataset indices in every run's test split; None: align by row; False: cannot."""
    if all(m[2] is not None for m in group):
        common = set(int(i) for i in group[0][2])
        for m in group[1:]:
            common &= set(int(i) for i in m[2])
        return sorted(common)
    first = group[0][1]
    if all(len(m[1]) == len(first) and np.array_equal(m[1], first) for m in group):
        return None
    return False


def _sized_common(sized: list[dict[str, Any]], decoded: dict[int, Any], predictions: dict) -> Any:
    """The common test items of one data size's runs (:func:`_common`), False when their
    predictions are of different kinds or widths."""
    kinds = {predictions[r["id"]]["kind"] for r in sized}
    shapes = {decoded[r["id"]][0].shape[1] for r in sized}
    return _common(list(decoded.values())) if len(kinds) == 1 and len(shapes) == 1 else False


def common_items(runs: list[dict[str, Any]], predictions: dict[int, dict]) -> dict[str, Any]:
    """Per data size, the dataset indices of the test items every done run with kept
    predictions was tested on (sorted), None (no indices: align row by row) or False
    (no common test set): the items :func:`seed_ensembles` scores on."""
    done = [r for r in runs if r.get("status") == "done" and r["id"] in predictions]
    out = {}
    for data in dict.fromkeys(r["data"] for r in done):
        sized = [r for r in done if r["data"] == data]
        decoded = {r["id"]: decode_predictions(predictions[r["id"]]) for r in sized}
        out[data] = _sized_common(sized, decoded, predictions)
    return out


def seed_ensembles(runs: list[dict[str, Any]], predictions: dict[int, dict]) -> list[dict]:
    """One row per data size and variant with >= 2 done seed runs that kept predictions.

    Each row: ``data``, ``variant``, ``kind``, ``members`` (= the inference-cost
    multiple), ``items`` (common test items), ``member_mean`` and ``member_scores`` (the
    single members), ``ensemble`` (mean of probabilities, or of outputs), or ``note``
    when no common test set exists. All variants of a data size are scored on the same
    items (those in the test split of every run of that size).
    """
    done = [r for r in runs if r.get("status") == "done" and r["id"] in predictions]
    out: list[dict[str, Any]] = []
    for data in dict.fromkeys(r["data"] for r in done):
        sized = [r for r in done if r["data"] == data]
        decoded = {r["id"]: decode_predictions(predictions[r["id"]]) for r in sized}
        kinds = {predictions[r["id"]]["kind"] for r in sized}
        common = _sized_common(sized, decoded, predictions)
        for variant in dict.fromkeys(r["variant"] for r in sized):
            group = [r for r in sized if r["variant"] == variant]
            if len(group) < 2:
                continue
            row: dict[str, Any] = {
                "data": data,
                "variant": variant,
                "kind": next(iter(kinds)),
                "members": len(group),
                "seeds": [r["seed"] for r in group],
            }
            if common is False or (common is not None and not common):
                row["note"] = (
                    "no test item is in the test split of every run of this data size "
                    "(each seed draws its own split)"
                )
                out.append(row)
                continue
            members, target = aligned([decoded[r["id"]] for r in group], common)
            singles = [score_outputs(m, target, row["kind"]) for m in members]
            row["items"] = len(target)
            row["member_scores"] = singles
            row["member_mean"] = {k: float(np.mean([s[k] for s in singles])) for k in singles[0]}
            row["ensemble"] = score_outputs(np.mean(np.stack(members), axis=0), target, row["kind"])
            out.append(row)
    return out


def headline(kind: str) -> str:
    """The test metric a ``kind`` of study compares ensembles and soups on (lower is better).

    Example:
        >>> headline("classification"), headline("regression")
        ('test_nll', 'test_mse')
    """
    return "test_mse" if kind == "regression" else "test_nll"


def beats_every_single(
    rows: list[dict[str, Any]], chosen: dict[str, str], metric: str | None = None
) -> list[str]:
    """One sentence per data size where an ensemble of seeds beats every single technique.

    The ensemble is that of ``chosen[data]``, the variant chosen on validation (never the
    best ensemble on test: choosing on test and reporting on test would flatter it); it
    must beat the best mean single member on test (lowest ``metric``; default
    :func:`headline`: NLL, or MSE for regression), on the same common test items -- a
    minimum over the singles that can only make the claim harder.
    """
    sentences = []
    for data in dict.fromkeys(r["data"] for r in rows):
        scored = [r for r in rows if r["data"] == data and "ensemble" in r]
        key = metric or (headline(scored[0]["kind"]) if scored else "test_nll")
        scored = [r for r in scored if key in r["ensemble"]]
        picked = [r for r in scored if r["variant"] == chosen.get(data)]
        if not picked:
            continue
        best_single = min(scored, key=lambda r: r["member_mean"][key])
        ens_row = picked[0]
        single, ensemble = best_single["member_mean"][key], ens_row["ensemble"][key]
        if math.isfinite(ensemble) and ensemble < single:
            sentences.append(
                f"With {data}, the ensemble of the {ens_row['members']} seeds of "
                f"{ens_row['variant']} (the variant chosen on validation) beats every single "
                f"technique on test {key.removeprefix('test_')}: {ensemble:.4g} vs "
                f"{single:.4g} for the best single run ({best_single['variant']}, mean "
                f"member), on {ens_row['items']} common test items, at "
                f"{ens_row['members']}x the inference cost."
            )
    return sentences


def run_predictions(config: Any, model: Any) -> dict[str, Any] | None:
    """A trained run's test predictions (:func:`encode_predictions`), or None when the run
    has none to keep (too large, or outputs that are not one row per test item)."""
    from trainwell.app.runner import load_data, resolve_device, step_of, task_of
    from trainwell.training.evaluation import predict

    splits = load_data(config)  # deterministic in the seed: the split the run was tested on
    task = task_of(config)
    outputs, targets = predict(
        model,
        splits.loader("test", 512),
        resolve_device(config.device),
        step=step_of(config),
        loss_fn=task.loss,
    )
    return encode_predictions(outputs, targets, config.task.kind, indices_of_test_split(config))
