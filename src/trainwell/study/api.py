"""Studies from Python: ``trainwell.ablate(config, model=..., data=..., loss=...)``.

The same study ``trainwell ablate CONFIG.toml`` runs, from a notebook or a script, without
writing TOML: ``config`` is a dict (the TOML as Python) or a path, and the model, data,
loss and batch hook can be Python callables instead of ``"module:name"`` strings.

Worker processes (``jobs > 1``) import every callable by its module and name, so define
them at the top level of a module (a ``.py`` file next to the notebook); a callable from a
script's ``__main__`` is imported from the script's file (keep its top-level code under
``if __name__ == "__main__":``). With ``jobs = 1`` the study runs in this process, and
callables defined in a notebook work too.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainwell.app.config_files import absolute_targets, read_toml
from trainwell.app.entry_points import reference
from trainwell.study.checks import check_study
from trainwell.study.execute import run_study
from trainwell.study.failures import FailedRun, failed_runs, failure_summary
from trainwell.study.plan import study_logging
from trainwell.study.report import study_rows, verdict, write_report
from trainwell.study.store import Store, default_url


@dataclass
class StudyResult:
    """What a study found: one row per (data size, variant), every run, the report file.

    ``failures`` lists the runs that failed with their one-line errors (also written to
    ``failures.txt`` next to the report); empty when every run finished.
    """

    rows: list[dict[str, Any]]
    runs: list[dict[str, Any]]
    report: Path
    store: str
    verdict: str
    failures: list[FailedRun] = field(default_factory=list)

    def dataframe(self) -> Any:
        """The rows as a pandas DataFrame (pandas is optional: ImportError names it)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("StudyResult.dataframe() needs pandas: pip install pandas") from None
        flat = []
        for row in self.rows:
            out = {k: v for k, v in row.items() if k not in ("metrics", "failed", "stops")}
            for key, value in list(out.items()):
                if isinstance(value, tuple) and len(value) == 2:
                    out[key], out[f"{key}_ci"] = value
            out["failed"] = len(row["failed"])
            flat.append(out)
        return pd.DataFrame(flat)


def _with_code(
    raw: dict[str, Any], code: dict[str, Callable[..., Any] | str | None], in_process: bool
) -> dict[str, Any]:
    """``raw`` with each given callable (or string) as the target of its config key."""
    for dotted, value in code.items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        target = reference(value, dotted, allow_main=in_process)
        raw.setdefault(section, {})[key] = target
    return raw


def ablate(
    config: dict[str, Any] | str | Path,
    *,
    model: Callable[..., Any] | str | None = None,
    data: Callable[..., Any] | str | None = None,
    loss: Callable[..., Any] | str | None = None,
    step: Callable[..., Any] | str | None = None,
    out: str | Path | None = None,
    seeds: int | None = None,
    jobs: int = 1,
    db: str | None = None,
    name: str | None = None,
    progress: bool = False,
    retry_failed: bool = False,
) -> StudyResult:
    """Run (or resume) an ablation study and return its results.

    Args:
        config: the run config with its ``[ablation]`` section, as a dict or a TOML path.
        model: the model class or factory (``[model] target``); called with
            ``[model.args]`` plus ``n_features`` / ``n_classes`` / ``n_outputs`` /
            ``input_shape`` where its signature names them.
        data: the datasets function (``[data] target``).
        loss: the loss function (``[task] loss``).
        step: the batch hook (``[task] step``).
        out: the study directory (default ``runs/<name>-ablation``).
        seeds: seeds per variant (default ``ablation.seeds``).
        jobs: worker processes; 1 trains in this process.
        db: SQLAlchemy URL of the results store (default ``out/results.sqlite``).
        name: the study's name (default ``ablation.name`` or ``"study"``).
        progress: show a progress bar.
        retry_failed: run failed runs again when resuming.

    Returns:
        A :class:`StudyResult`: ``rows`` (means, intervals and paired differences per
        variant and data size), ``runs``, ``report`` (the HTML file), ``verdict``,
        ``failures``, and ``dataframe()`` when pandas is installed.

    Raises:
        ConfigError: (a ``ValueError``) before anything is written or trained, one line
            per problem, when the ``[ablation]`` section or a planned run's config is
            invalid or the user code cannot be imported.
        ValueError: when the results store cannot be opened (one line).
    """
    if isinstance(config, (str, Path)):
        path = Path(config)
        raw = absolute_targets(read_toml(path), path.resolve().parent)
    elif isinstance(config, dict):
        raw = absolute_targets(copy.deepcopy(config), Path.cwd())
    else:
        raise TypeError(f"config must be a dict or a path to a TOML file; got {type(config)}")
    code = {"model.target": model, "data.target": data, "task.loss": loss, "task.step": step}
    raw = _with_code(raw, code, in_process=jobs == 1)
    check_study(raw, seeds)  # before any directory or store exists
    name = name or str(raw.get("ablation", {}).get("name", "study"))
    out = Path(out) if out is not None else Path("runs") / f"{name}-ablation"
    study_logging(raw, name, out)  # [logging]: one experiment, runs tagged; extras checked
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {out} is a file; give a directory for the study's files")
    out.mkdir(parents=True, exist_ok=True)
    store = Store(db or default_url(out))
    study = run_study(raw, store, name=name, seeds=seeds, jobs=jobs, progress=progress,
                      retry_failed=retry_failed)  # fmt: skip
    report = write_report(store, out, name)
    failure_summary(store, study, out)  # writes failures.txt when runs failed
    runs = store.runs(study)
    rows = study_rows(store, name)
    return StudyResult(rows, runs, report, store.url, verdict(rows), failed_runs(store, study))
