"""Ablation studies: a base config and its variants x data sizes x seeds, in worker processes.

The ``[ablation]`` section of a run config describes the study::

    [ablation]
    mode = "one-at-a-time"          # or "grid": every combination of the grid keys
    seeds = 3
    [ablation.grid]                 # strength grids, one variant per value
    l2 = [1e-4, 1e-3]               # short names: l1 l2 weight_decay dropout.p clip.max_norm ...
    "model.dropout" = [0.2, 0.5]    # or any dotted config key
    "data.train_fraction" = [0.1, 0.3, 1.0]   # data.* keys are crossed with every variant
    [ablation.variants.ema]         # named variants switch several keys at once
    "ema.enabled" = true

``plan_study`` turns it into every (variant, data size, seed) run, each with its full
config; :mod:`trainwell.study.execute` trains them.
"""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from trainwell.app.config import apply_overrides, validate

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
SPEC_KEYS = {"name", "mode", "seeds", "grid", "variants", "base"}


@dataclass
class PlannedRun:
    """One run of a study: its variant and data labels, seed and full raw config."""

    variant: str
    data: str
    seed: int
    overrides: dict[str, Any]
    raw: dict[str, Any] = field(repr=False)


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
    clip_mode = raw.get("gradients", {}).get("clip", {}).get("mode", "none")
    if "gradients.clip.mode" not in out and clip_mode == "none":
        if "gradients.clip.max_norm" in out:
            out["gradients.clip.mode"] = "norm"
        elif "gradients.clip.value" in out:
            out["gradients.clip.mode"] = "value"
    return out


def plan_study(raw: dict[str, Any], seeds: int | None = None) -> list[PlannedRun]:
    """Every run of the study the ``[ablation]`` section of ``raw`` describes.

    Variants whose config equals the base config (e.g. ``l2 = 0`` when the base has
    no L2) are dropped: they are the base run. Seeds are ``seed, seed+1, ...``.

    Example:
        >>> runs = plan_study({"ablation": {"seeds": 2, "grid": {"l2": [0, 1e-3]}}})
        >>> [(r.variant, r.seed) for r in runs]
        [('base', 0), ('l2=0.001', 0), ('base', 1), ('l2=0.001', 1)]
    """
    spec = raw.get("ablation", {})
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ValueError(
            f"ablation: unknown key(s) {sorted(unknown)}; accepted: {sorted(SPEC_KEYS)}"
        )
    mode = spec.get("mode", "one-at-a-time")
    if mode not in ("one-at-a-time", "grid"):
        raise ValueError(f"ablation.mode must be 'one-at-a-time' or 'grid', got {mode!r}")
    n_seeds = int(seeds if seeds is not None else spec.get("seeds", 3))
    if n_seeds < 1:
        raise ValueError(f"seeds must be a positive integer, got {n_seeds}")
    base = {k: v for k, v in raw.items() if k != "ablation"}
    base = apply_overrides(copy.deepcopy(base), _flatten(spec.get("base", {})))
    grid = {resolve_key(k): v for k, v in _flatten(spec.get("grid", {})).items()}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(
                f"ablation.grid.{key} must be a non-empty list of values, got {values!r}"
            )
    data_axes = {k: v for k, v in grid.items() if k.startswith("data.")}
    axes = {k: v for k, v in grid.items() if not k.startswith("data.")}
    variants: list[tuple[str, dict[str, Any]]] = [("base", {})]
    if mode == "grid" and axes:
        for combo in itertools.product(*axes.values()):
            variants.append(("", dict(zip(axes, combo, strict=False))))
    else:
        variants += [("", {k: v}) for k, values in axes.items() for v in values]
    for name, table in spec.get("variants", {}).items():
        if not isinstance(table, dict):
            raise ValueError(f"ablation.variants.{name} must be a table of config keys")
        variants.append((name, {resolve_key(k): v for k, v in _flatten(table).items()}))
    datas = [
        dict(zip(data_axes, combo, strict=False))
        for combo in itertools.product(*data_axes.values())
    ]
    base_seed = int(base.get("seed", 0))
    runs: list[PlannedRun] = []
    for seed_index in range(n_seeds):
        for data in datas or [{}]:
            data_label = _label(data) or "all data"
            seen: list[str] = []
            for name, given in variants:
                overrides = _with_implied(base, given)
                cfg = apply_overrides(copy.deepcopy(base), {**data, **overrides})
                cfg["seed"] = base_seed + seed_index
                key = json.dumps(_canonical(cfg), sort_keys=True, default=str)
                if key in seen:
                    continue
                seen.append(key)
                label = name or _label(given)
                runs.append(PlannedRun(label, data_label, base_seed + seed_index, overrides, cfg))
    return runs


def _canonical(raw: dict[str, Any]) -> Any:
    """The validated config as a dict (so ``l2 = 0`` equals no l2); raw when invalid."""
    try:
        return validate(copy.deepcopy(raw)).model_dump(mode="json")
    except ValueError:
        return raw
