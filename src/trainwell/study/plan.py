"""Ablation studies: a base config and its variants x data sizes x seeds, in worker processes.

The ``[ablation]`` section of a run config describes the study::

    [ablation]
    mode = "one-at-a-time"          # or "grid": every combination of the grid keys
    seeds = 3                       # or {min = 3, max = 10}: more seeds where undecided
    metric = "val_nll"              # chosen on (validation), compared by its test twin
    correction = "holm"             # or "bh" (Benjamini-Hochberg) or "none"
    [ablation.grid]                 # strength grids, one variant per value
    l2 = [1e-4, 1e-3]               # short names: l1 l2 weight_decay dropout.p clip.max_norm ...
    "model.dropout" = [0.2, 0.5]    # or any dotted config key
    "data.train_fraction" = [0.1, 0.3, 1.0]   # data.* keys are crossed with every variant
    [ablation.variants.ema]         # named variants switch several keys at once
    "ema.enabled" = true

``plan_study`` turns it into every (variant, data size, seed) run, each with its full
config; :mod:`trainwell.study.checks` validates them before anything trains, and
:mod:`trainwell.study.execute` trains them. With ``[logging]``, :func:`study_logging` makes
the study one MLflow experiment (and one TensorBoard folder) and each planned run is named
and tagged by its variant, data size and seed. A malformed section is a
:class:`~trainwell.app.config.ConfigError` with one line per problem: a key of the
section that does not exist, a value of the wrong type, a grid key that is neither a
short name nor a config key, a grid entry that is not a non-empty list, two variants
with one label, a ``metric`` the validation does not report or whose direction is
unknown, a ``correction`` other than holm / bh / none.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from trainwell.app.config import ConfigError, RunConfig, validate
from trainwell.app.config_files import apply_overrides
from trainwell.study.executors import resource_problems

ALIASES = {
    "l1": "regularization.l1",
    "l2": "regularization.l2",
    "max_norm": "regularization.max_norm",
    "weight_decay": "optimizer.weight_decay",
    "lr": "optimizer.lr",
    "dropout.p": "dropout.p",
    "dropout": "dropout.p",
    "clip.max_norm": "gradients.clip.max_norm",
    "clip.value": "gradients.clip.value",
    "clip.mode": "gradients.clip.mode",
    "accumulate": "gradients.accumulate",
    "early_stopping": "early_stopping.enabled",
    "patience": "early_stopping.patience",
    "ema": "ema.enabled",
    "swa": "swa.enabled",
    "train_fraction": "data.train_fraction",
    "train_size": "data.train_size",
}
SPEC_KEYS = {"name", "mode", "seeds", "grid", "variants", "base", "metric", "correction",
             "resources"}  # fmt: skip
MODES = ("one-at-a-time", "grid")
CORRECTIONS = ("holm", "bh", "none")
METRIC_NAME = re.compile(r"val_[A-Za-z0-9_]+")


@dataclass
class PlannedRun:
    """One run of a study: its variant and data labels, seed and full raw config.

    ``origin`` maps each config key the run changes to where the ``[ablation]`` section
    says so (``"ablation.grid.l2 = 0.001"``, ``"ablation.variants.ema"``), for messages.
    """

    variant: str
    data: str
    seed: int
    overrides: dict[str, Any]
    raw: dict[str, Any] = field(repr=False)
    origin: dict[str, str] = field(default_factory=dict, repr=False)


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resolve_key(key: str) -> str:
    """The dotted config key of a grid key or its short name.

    Example:
        >>> resolve_key("l2"), resolve_key("clip.max_norm"), resolve_key("model.dropout")
        ('regularization.l2', 'gradients.clip.max_norm', 'model.dropout')
    """
    return ALIASES.get(key, key)


def unknown_key(dotted: str) -> str | None:
    """Why ``dotted`` is not a key of the run config, or None when it is one.

    A key inside a free-form table (``model.args.width``) is the user's and always known.

    Example:
        >>> unknown_key("model.dropout") is None, unknown_key("model.args.width") is None
        (True, True)
        >>> unknown_key("early_stopping.patience.max")
        'early_stopping.patience is a value, not a table'
    """
    model: type[BaseModel] = RunConfig
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth])
        if part not in model.model_fields or (depth == 0 and part == "ablation"):
            keys = ", ".join(k for k in model.model_fields if k != "ablation")
            return f"{where or 'the config'} has no key {part!r}; it has: {keys}"
        annotation = model.model_fields[part].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
            continue
        if typing.get_origin(annotation) is dict or depth == len(parts) - 1:
            return None
        return f"{'.'.join(parts[: depth + 1])} is a value, not a table"
    return None


def _shown(value: Any) -> str:
    """A value as TOML spells it (strings quoted, ``true``), for messages."""
    return json.dumps(value, default=str)


def _label(overrides: dict[str, Any]) -> str:
    parts = []
    for key, value in overrides.items():
        aliases = [a for a, k in ALIASES.items() if k == key]
        short = min(aliases, key=len) if aliases else key
        shown = (
            "on"
            if value is True
            else "off"
            if value is False
            else f"{value:g}"
            if isinstance(value, float)
            else str(value)
        )
        parts.append(f"{short}={shown}")
    return ", ".join(parts)


def _with_implied(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides plus what they need to take effect (a clip threshold switches clipping on)."""
    out = dict(overrides)
    gradients = raw.get("gradients")
    clip = gradients.get("clip") if isinstance(gradients, dict) else None
    clip_mode = clip.get("mode", "none") if isinstance(clip, dict) else "none"
    if "gradients.clip.mode" not in out and clip_mode == "none":
        if "gradients.clip.max_norm" in out:
            out["gradients.clip.mode"] = "norm"
        elif "gradients.clip.value" in out:
            out["gradients.clip.mode"] = "value"
    return out


def base_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The study's base run config: ``raw`` without ``[ablation]``, with ``ablation.base``."""
    spec = raw.get("ablation", {})
    base = copy.deepcopy({k: v for k, v in raw.items() if k != "ablation"})
    table = spec.get("base", {}) if isinstance(spec, dict) else {}
    return apply_overrides(base, _flatten(table) if isinstance(table, dict) else {})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _keys_problems(where: str, table: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    """``{config key: key as written}`` of a table of config keys, and what is wrong in it."""
    keys: dict[str, str] = {}
    problems: list[str] = []
    for written in _flatten(table):
        key = resolve_key(written)
        if key == "seed":
            problems.append(f"{where}.seed: seeds come from ablation.seeds (or --seeds)")
            continue
        why = unknown_key(key)
        if why is not None:
            if "." not in written:
                short = ", ".join(sorted(ALIASES))
                why = (
                    f"unknown key; short names: {short}; or a dotted config key like model.dropout"
                )
            problems.append(f"{where}.{written}: {why}")
            continue
        if key in keys:
            problems.append(
                f"{where}: {keys[key]!r} and {written!r} both set {key}; keep one of them"
            )
            continue
        keys[key] = written
    return keys, problems


def _read_spec(spec: Any, seeds: int | None) -> tuple[dict[str, Any], list[str]]:
    """The ``[ablation]`` section checked: its parts, and one line per problem in it."""
    if not isinstance(spec, dict):
        return {}, [f"ablation must be a table ([ablation]), got {_shown(spec)}"]
    problems = []
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        problems.append(
            f"ablation: unknown key(s) {sorted(unknown)}; accepted: {sorted(SPEC_KEYS)}"
        )
    name = spec.get("name", "study")
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        problems.append(f"ablation.name must be a non-empty string of at most 200 characters, "
                        f"got {_shown(name)}")  # fmt: skip
    mode = spec.get("mode", "one-at-a-time")
    if mode not in MODES:
        problems.append(f"ablation.mode must be 'one-at-a-time' or 'grid', got {_shown(mode)}")
    metric = spec.get("metric", "val_nll")
    if not isinstance(metric, str) or not METRIC_NAME.fullmatch(metric):
        problems.append(
            'ablation.metric must be a validation metric name such as "val_nll", '
            f'"val_acc", "val_loss", "val_mse" or "val_<your metric>", got {_shown(metric)}'
        )
    correction = spec.get("correction", "holm")
    if correction not in CORRECTIONS:
        problems.append(
            f"ablation.correction must be 'holm', 'bh' or 'none', got {_shown(correction)}"
        )
    problems += resource_problems(spec.get("resources"))
    n_seeds = seeds if seeds is not None else spec.get("seeds", 3)
    max_seeds = n_seeds
    if isinstance(n_seeds, dict) and seeds is None:
        extra = set(n_seeds) - {"min", "max"}
        n_seeds, max_seeds = n_seeds.get("min"), n_seeds.get("max")
        if extra or not (_is_int(n_seeds) and _is_int(max_seeds) and 2 <= n_seeds <= max_seeds):
            problems.append(
                "ablation.seeds: {min = ..., max = ...} needs integers with 2 <= min <= max, "
                f"got {_shown(spec['seeds'])}"
            )
            n_seeds = max_seeds = 1
    elif not _is_int(n_seeds) or n_seeds < 1:
        where = "seeds" if seeds is not None else "ablation.seeds"
        problems.append(f"{where}: seeds must be a positive integer, got {_shown(n_seeds)}")
    tables: dict[str, dict[str, Any]] = {}
    for key in ("grid", "variants", "base"):
        tables[key] = spec.get(key, {})
        if not isinstance(tables[key], dict):
            problems.append(f"ablation.{key} must be a table, got {_shown(tables[key])}")
            tables[key] = {}
    parts: dict[str, Any] = {"mode": mode, "seeds": n_seeds, "max_seeds": max_seeds,
                             "grid": {}, "variants": {}}  # fmt: skip
    written, found = _keys_problems("ablation.grid", tables["grid"])
    problems += found
    flat = _flatten(tables["grid"])
    for key, as_written in written.items():
        values = flat[as_written]
        if not isinstance(values, list) or not values:
            problems.append(
                f"ablation.grid.{as_written} must be a non-empty list of values, "
                f"got {_shown(values)}"
            )
            continue
        parts["grid"][key] = (as_written, values)
    for name, table in tables["variants"].items():
        if not isinstance(table, dict):
            problems.append(
                f"ablation.variants.{name} must be a table of config keys, got {_shown(table)}"
            )
            continue
        if name == "base":
            problems.append("ablation.variants.base: 'base' names the base config; rename it")
            continue
        written, found = _keys_problems(f"ablation.variants.{name}", table)
        problems += found
        parts["variants"][name] = {k: _flatten(table)[w] for k, w in written.items()}
    problems += _keys_problems("ablation.base", tables["base"])[1]
    return parts, problems


def seed_bounds(raw: dict[str, Any], seeds: int | None = None) -> tuple[int, int]:
    """``(min, max)`` seeds per run: ``seeds = 3`` (or ``seeds=3``) is ``(3, 3)``, fixed;
    ``seeds = {min = 3, max = 10}`` adds seeds to undecided comparisons
    (:mod:`trainwell.study.sequential`).

    Example:
        >>> seed_bounds({"ablation": {"seeds": {"min": 3, "max": 10}}}), seed_bounds({})
        ((3, 10), (3, 3))
    """
    spec, problems = _read_spec(raw.get("ablation", {}), seeds)
    if problems:
        raise ConfigError("\n".join(problems))
    return spec["seeds"], spec["max_seeds"]


def plan_study(
    raw: dict[str, Any], seeds: int | None = None, *, all_seeds: bool = False
) -> list[PlannedRun]:
    """Every run of the study the ``[ablation]`` section of ``raw`` describes.

    Variants whose config equals the base config (e.g. ``l2 = 0`` when the base has
    no L2) are dropped: they are the base run. Seeds are ``seed, seed+1, ...``; with
    ``seeds = {min, max}`` the ``min`` first ones, or all ``max`` with ``all_seeds``
    (seed-major, so the first runs are the same either way). A
    malformed section raises :class:`~trainwell.app.config.ConfigError`, one line per
    problem (it is a ``ValueError``); the run configs themselves are checked by
    :func:`trainwell.study.checks.check_study`.

    Example:
        >>> runs = plan_study({"ablation": {"seeds": 2, "grid": {"l2": [0, 1e-3]}}})
        >>> [(r.variant, r.seed) for r in runs]
        [('base', 0), ('l2=0.001', 0), ('base', 1), ('l2=0.001', 1)]
        >>> plan_study({"ablation": {"grid": {"l3": [0.1]}, "seeds": 0}})
        Traceback (most recent call last):
        ...
        trainwell.app.config.ConfigError: ablation.seeds: seeds must be a positive integer, got 0
        ablation.grid.l3: unknown key; short names: accumulate, clip.max_norm, clip.mode, clip.value, dropout, dropout.p, early_stopping, ema, l1, l2, lr, max_norm, patience, swa, train_fraction, train_size, weight_decay; or a dotted config key like model.dropout
    """  # noqa: E501
    spec, problems = _read_spec(raw.get("ablation", {}), seeds)
    if problems:
        raise ConfigError("\n".join(problems))
    base = base_config(raw)
    if "metric" in raw.get("ablation", {}):
        from trainwell.study.statistics import primary_metric

        try:
            primary_metric(base, raw["ablation"]["metric"])
        except ValueError as err:
            raise ConfigError(str(err)) from None
    grid = spec["grid"]
    data_axes = {k: v for k, v in grid.items() if k.startswith("data.")}
    axes = {k: v for k, v in grid.items() if not k.startswith("data.")}

    def origin(key: str, value: Any) -> str:
        return f"ablation.grid.{grid[key][0]} = {_shown(value)}"

    # (label or "", overrides, {config key: where the section sets it})
    variants: list[tuple[str, dict[str, Any], dict[str, str]]] = [("base", {}, {})]
    if spec["mode"] == "grid" and axes:
        for combo in itertools.product(*(values for _, values in axes.values())):
            chosen = dict(zip(axes, combo, strict=True))
            variants.append(("", chosen, {k: origin(k, v) for k, v in chosen.items()}))
    else:
        for key, (_, values) in axes.items():
            variants += [("", {key: v}, {key: origin(key, v)}) for v in values]
    for name, table in spec["variants"].items():
        variants.append((name, table, dict.fromkeys(table, f"ablation.variants.{name}")))
    datas = [
        dict(zip(data_axes, combo, strict=True))
        for combo in itertools.product(*(values for _, values in data_axes.values()))
    ]
    base_seed = base.get("seed", 0)
    base_seed = base_seed if _is_int(base_seed) else 0  # a bad seed is the base config's error
    runs: list[PlannedRun] = []
    data_labels = [_label(data) for data in datas]
    clashes = [
        f"ablation.grid: two data sizes are both labelled {label!r}; make the values differ"
        for label in dict.fromkeys(data_labels)
        if data_labels.count(label) > 1
    ]
    for seed_index in range(spec["max_seeds"] if all_seeds else spec["seeds"]):
        for data in datas or [{}]:
            data_label = _label(data) or "all data"
            data_origin = {k: origin(k, v) for k, v in data.items()}
            seen: dict[str, str] = {}  # config -> label
            for name, given, where in variants:
                overrides = _with_implied(base, given)
                cfg = apply_overrides(copy.deepcopy(base), {**data, **overrides})
                cfg["seed"] = base_seed + seed_index
                key = json.dumps(_canonical(cfg), sort_keys=True, default=str)
                if key in seen:
                    continue
                label = name or _label(given)
                if label in seen.values():
                    clashes.append(
                        f"ablation: two different variants are both labelled {label!r}; "
                        "rename the named variant or make the grid values differ"
                    )
                seen[key] = label
                _name_run(cfg, label, data_label, base_seed + seed_index)
                runs.append(PlannedRun(label, data_label, base_seed + seed_index, overrides,
                                       cfg, {**data_origin, **where}))  # fmt: skip
    if clashes:
        raise ConfigError("\n".join(dict.fromkeys(clashes)))
    return runs


def _logs(raw: dict[str, Any]) -> bool:
    """Whether a raw config's ``[logging]`` sends metrics anywhere."""
    table = raw.get("logging")
    return isinstance(table, dict) and bool(table.get("tensorboard") or table.get("mlflow"))


def _name_run(raw: dict[str, Any], variant: str, data: str, seed: int) -> None:
    """Name a logged run ``variant/data/seed<k>`` and tag it with all three (in place)."""
    if not _logs(raw):
        return
    table = raw["logging"]
    tags = table.get("tags") if isinstance(table.get("tags"), dict) else {}
    table["tags"] = {**tags, "variant": variant, "data": data, "seed": str(seed)}
    table["run_name"] = f"{variant}/{data}/seed{seed}"


def study_logging(raw: dict[str, Any], name: str, out: Path) -> dict[str, Any]:
    """``raw`` with the study's ``[logging]``: one MLflow experiment named after the study
    (unless ``logging.experiment`` names one), every run tagged ``study = name``, and
    ``tensorboard = true`` made the folder ``out/tensorboard`` (one subfolder per run).

    Each planned run is then named ``variant/data/seed<k>`` and tagged with its
    ``variant``, ``data`` and ``seed`` (:func:`plan_study`); the names and folders travel
    in the runs' configs, so worker processes and Ray tasks log where this process says.
    A missing TensorBoard or MLflow, or an MLflow store that cannot be opened, fails here,
    before anything trains (the experiment is created here, once). ``raw`` is changed in
    place; a study without ``[logging]`` is left as it is.
    """
    if not _logs(raw):
        return raw
    table = raw["logging"]
    if table.get("tensorboard") is True:
        table["tensorboard"] = str(Path(out).resolve() / "tensorboard")
    if table.get("mlflow"):
        table.setdefault("experiment", name)
    tags = table.get("tags")
    table["tags"] = {**(tags if isinstance(tags, dict) else {}), "study": name}
    from trainwell.app.run_logging import check_logging

    check_logging(validate(base_config(raw)))
    return raw


def _canonical(raw: dict[str, Any]) -> Any:
    """The validated config as a dict (so ``l2 = 0`` equals no l2); raw when invalid."""
    try:
        return validate(copy.deepcopy(raw)).model_dump(mode="json")
    except ValueError:
        return raw
