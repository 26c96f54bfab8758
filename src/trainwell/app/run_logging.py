"""Where one run's metrics go: the ``[logging]`` section made into ``fit()`` callbacks.

``tensorboard`` and ``mlflow`` each become a logger of :mod:`trainwell.integrations`; a
run directory keeps its MLflow run id (``mlflow_run.json``) so that ``resume`` continues
the same MLflow run, and its files are uploaded as artifacts once written. Everything is
checked before training (:func:`check_logging`), and only rank 0 logs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from trainwell.app.config import RunConfig
from trainwell.app.config_files import to_toml

#: The run directory's files uploaded as MLflow artifacts (not the weights: they can be large).
ARTIFACTS = ("config.toml", "metrics.csv", "grad_norms.csv", "summary.json", "curves.png")


def check_logging(config: RunConfig) -> None:
    """Fail before anything trains when ``[logging]`` cannot work: a missing extra raises
    :class:`~trainwell.integrations.MissingExtra`, an MLflow store that cannot be opened
    a ``ValueError`` (its experiment is created here, once, not by parallel runs)."""
    log = config.logging
    if log.tensorboard:
        from trainwell.integrations.tensorboard_log import require_tensorboard

        require_tensorboard()
    if log.mlflow is not None:
        from trainwell.integrations.mlflow_log import prepare_experiment

        prepare_experiment(log.mlflow, log.experiment or "trainwell")


def run_name(config: RunConfig, out_dir: Path | None) -> str:
    """``logging.run_name``, else the run directory's name, else ``run-seed<seed>``."""
    if config.logging.run_name:
        return config.logging.run_name
    return out_dir.name if out_dir is not None else f"run-seed{config.seed}"


def tensorboard_dir(config: RunConfig, out_dir: Path | None) -> Path:
    """``RUN_DIR/tensorboard`` for ``tensorboard = true``; else one folder per run (named
    after :func:`run_name`) in the folder given (``./tensorboard`` without a run dir).

    Example:
        >>> from trainwell.app.config_files import load_config
        >>> config = load_config(None, ["logging.tensorboard='/tb'", "logging.run_name='a/b c'"])
        >>> tensorboard_dir(config, Path("runs/x")).as_posix()
        '/tb/a_b_c'
    """
    folder = config.logging.tensorboard
    if folder is True and out_dir is not None:
        return out_dir / "tensorboard"
    name = re.sub(r"[^\w.=,+-]+", "_", run_name(config, out_dir)).strip("_") or "run"
    return Path(folder if isinstance(folder, str) else "tensorboard") / name


def build_loggers(
    config: RunConfig, out_dir: Path | None, resume: bool | Path, monitor: Any = None
) -> list[Any]:
    """The ``fit()`` callbacks that ``[logging]`` asks for (none on ranks other than 0).

    With a run directory, the MLflow run id is kept in ``RUN_DIR/mlflow_run.json`` and a
    resumed run continues that MLflow run. The MLflow run is opened here, so a store
    that refuses it fails before training.
    """
    from trainwell.distributed import is_main_process

    log = config.logging
    if not log.enabled or not is_main_process():
        return []
    name, loggers = run_name(config, out_dir), []
    params = config.model_dump(mode="json", exclude={"ablation", "logging"})
    if log.tensorboard:
        from trainwell.integrations.tensorboard_log import TensorBoardLogger

        loggers.append(TensorBoardLogger(tensorboard_dir(config, out_dir), params=params,
                                         every_n_steps=log.every_n_steps, monitor=monitor,
                                         text=to_toml(config)))  # fmt: skip
    if log.mlflow is not None:
        from trainwell.app.run_dir import MLFLOW_RUN_FILE
        from trainwell.integrations.mlflow_log import MLflowLogger, saved_run_id

        path = out_dir / MLFLOW_RUN_FILE if out_dir is not None else None
        where = {"run_dir": str(out_dir.resolve())} if out_dir is not None else {}
        logger = MLflowLogger(
            log.mlflow, log.experiment or "trainwell", run_name=name, params=params,
            run_id=saved_run_id(path) if path is not None and resume else None,
            run_id_path=path, tags={**log.tags, **where}, every_n_steps=log.every_n_steps,
            monitor=monitor,
        )  # fmt: skip
        logger.start()
        loggers.append(logger)
    return loggers


def log_test(loggers: list[Any], metrics: dict[str, float], config_text: str | None) -> None:
    """Give every logger the test metrics; ``config_text``: a run without a run directory
    (a study's) also uploads its config as ``config.toml``."""
    for logger in loggers:
        logger.log_test(metrics)
        if config_text is not None and hasattr(logger, "log_files"):
            logger.log_files([], {"config.toml": config_text})
        logger.close()


def close_loggers(loggers: list[Any], status: str) -> None:
    """End every logger's run with ``status`` (a run that failed: ``"FAILED"``); a logger
    that fails to is ignored, so the run's own error is the one raised."""
    import contextlib

    for logger in loggers:
        with contextlib.suppress(Exception):
            logger.close(status)


def upload_run_files(out_dir: Path, config: RunConfig) -> None:
    """Upload the run directory's files (:data:`ARTIFACTS`) to the run's MLflow run."""
    if config.logging.mlflow is None:
        return
    from trainwell.app.run_dir import MLFLOW_RUN_FILE
    from trainwell.integrations.mlflow_log import log_artifacts, saved_run_id

    run_id = saved_run_id(out_dir / MLFLOW_RUN_FILE)
    if run_id is not None:
        log_artifacts(config.logging.mlflow, run_id, [out_dir / name for name in ARTIFACTS])


def member_logging(config: RunConfig, out_dir: Path) -> RunConfig:
    """An ``[ensemble]`` run's ``[logging]`` for its members, which train without a run
    directory of their own: TensorBoard under ``RUN_DIR/tensorboard/<member run>`` (not the
    current directory) and MLflow runs named ``<run dir name>/member<i>``
    (:func:`member_run`)."""
    log = config.logging
    if not log.enabled:
        return config
    update: dict[str, Any] = {"run_name": log.run_name or out_dir.name}
    if log.tensorboard is True:
        update["tensorboard"] = str(out_dir.resolve() / "tensorboard")
    return config.model_copy(update={"logging": log.model_copy(update=update)})


def member_run(config: RunConfig, index: int) -> RunConfig:
    """Member ``index`` of an ensemble: its own logged run, named ``<run>/member<i>`` and
    tagged ``member = i``."""
    log = config.logging
    if not log.enabled:
        return config
    name = f"{log.run_name or 'ensemble'}/member{index}"
    tags = {**log.tags, "member": str(index)}
    return config.model_copy(
        update={"logging": log.model_copy(update={"run_name": name, "tags": tags})}
    )
