"""Checking a study before it trains: every planned run's config and the user's code at once.

A study that would fail in its third hour because one grid value is out of range fails
before its first run instead: :func:`check_study` plans every (variant, data size, seed)
run, validates each run's config against the schema, and imports the user code the
configs name (``model.target``, ``data.target``, ``task.loss``, ...) once. Every
problem is one line naming where the ``[ablation]`` section (or the base config) says
it, the variant and the config key; identical problems are listed once and the list
stops after :data:`MAX_PROBLEMS` lines.
"""

from __future__ import annotations

import copy
from typing import Any

from trainwell.app.config import TARGET_KEYS, ConfigError, RunConfig, validate
from trainwell.app.entry_points import EntryPointError, resolve_callable
from trainwell.study.plan import PlannedRun, base_config, plan_study

MAX_PROBLEMS = 10


def _problems(raw: dict[str, Any]) -> tuple[RunConfig | None, list[str]]:
    """The validated config, or None and its problems (one line each)."""
    try:
        return validate(copy.deepcopy(raw)), []
    except ConfigError as err:
        return None, str(err).splitlines()


def _where(run: PlannedRun, line: str) -> tuple[str, str]:
    """Where the study sets what ``line`` (``"key: problem"``) is about, and which run."""
    key = line.partition(":")[0]
    for changed, origin in run.origin.items():
        if changed == key or changed.startswith(f"{key}.") or key.startswith(f"{changed}."):
            if changed.startswith("data."):
                return origin, f"data size {run.data}"
            return origin, f"variant {run.variant}"
    return f"variant {run.variant!r}", run.data


def _targets(config: RunConfig) -> list[tuple[str, str]]:
    """The ``(config key, "module:name")`` pairs of the user code a config names."""
    pairs = []
    for dotted in TARGET_KEYS:
        section, _, key = dotted.partition(".")
        value = getattr(getattr(config, section), key)
        for target in value if isinstance(value, list) else [value]:
            if isinstance(target, str) and ":" in target:
                pairs.append((dotted, target))
    return pairs


def _capped(problems: list[str]) -> str:
    shown = problems[:MAX_PROBLEMS]
    if len(problems) > MAX_PROBLEMS:
        shown.append(f"... and {len(problems) - MAX_PROBLEMS} more problems")
    return "\n".join(shown)


def check_study(raw: dict[str, Any], seeds: int | None = None) -> list[PlannedRun]:
    """Every planned run of the study, once every one of them is known to be valid.

    Raises :class:`~trainwell.app.config.ConfigError` (a ``ValueError``) with one line
    per problem, before anything is written or trained: a malformed ``[ablation]``
    section, a base config or a variant whose config the schema refuses, user code that
    cannot be imported.

    Example:
        >>> study = {"epochs": 2, "ablation": {"grid": {"dropout.p": [0.2, 1.5]}}}
        >>> check_study(study)
        Traceback (most recent call last):
        ...
        trainwell.app.config.ConfigError: ablation.grid.dropout.p = 1.5 (variant dropout=1.5): dropout.p: input should be less than 1 (got 1.5)
        >>> len(check_study({"ablation": {"seeds": 2, "grid": {"dropout.p": [0.2]}}}))
        4
    """  # noqa: E501
    runs = plan_study(raw, seeds)
    _, base_problems = _problems(base_config(raw))
    problems = [f"base config: {line}" for line in base_problems]
    targets: dict[tuple[str, str], None] = {}
    seen: dict[tuple[str, str], str] = {}  # (where, problem) -> the line, listed once
    for run in runs:
        config, lines = _problems(run.raw)
        if config is not None:
            targets.update(dict.fromkeys(_targets(config)))
        for line in lines:
            if line in base_problems:
                continue
            where, which = _where(run, line)
            seen.setdefault((where, line), f"{where} ({which}): {line}")
    problems += seen.values()
    for key, target in targets:
        try:
            resolve_callable(key, target)
        except EntryPointError as err:
            problems.append(str(err))
    if problems:
        raise ConfigError(_capped(problems))
    return runs
