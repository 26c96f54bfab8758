"""The ``trainwell`` command line: run, resume, demo (and ablate / report / soup)."""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from trainwell.app.config import ConfigError, RunConfig
from trainwell.app.config_files import load_config, to_toml

app = typer.Typer(
    name="trainwell",
    help="Correct, fast and measurable model-optimization techniques for PyTorch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: section.key=value (repeatable)."),
]
OutOption = Annotated[Path | None, typer.Option("--out", "-o", help="Run directory to write.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


#: Set to 1 to get the full Python traceback of a failure (as ``--traceback`` does).
DEBUG_ENV = "TRAINWELL_DEBUG"
#: Per invocation: ``traceback`` (show it), ``training`` (a run's ``fit()`` has started).
_state = {"traceback": False, "training": False}


@app.callback()
def options(
    traceback: Annotated[
        bool,
        typer.Option(
            "--traceback", help=f"Print the full Python traceback of a failure (or {DEBUG_ENV}=1)."
        ),
    ] = False,
) -> None:
    """Correct, fast and measurable model-optimization techniques for PyTorch."""
    _state.update(traceback=traceback, training=False)


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error per problem (no traceback) and exit with ``code``.

    2: the input is refused (nothing was trained); 1: a run failed while training.
    """
    for line in str(message).splitlines() or ["error"]:
        typer.echo(f"trainwell: error: {line}", err=True)
    raise typer.Exit(code)


def describe(err: Exception) -> str:
    """The line(s) a user reads for ``err``: what failed and what to do; never a traceback."""
    from trainwell.checkpoints import CheckpointError
    from trainwell.integrations import MissingExtra

    if isinstance(err, MissingExtra):
        return str(err)
    if isinstance(err, OSError):
        where = err.filename or "a file"
        if err.errno == errno.ENOSPC:
            return (
                f"no space left on the device writing {where}: free space or choose another --out"
            )
        if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return f"cannot write {where}: {err.strerror}; choose a writable --out"
        return f"{where}: {err.strerror or err}"
    if isinstance(err, (ValueError, TypeError, CheckpointError)):
        text = str(err).strip() or type(err).__name__
        lines = text.splitlines()
        return text if len(lines) > 1 else lines[0][:500]  # a ConfigError: one line each
    first = next(iter(str(err).strip().splitlines()), "")[:300]  # torch: a C++ stack follows
    return f"{type(err).__name__}: {first} (rerun with --traceback to see where it failed)"


def exit_status(err: Exception) -> int:
    """2: the input is refused -- a bad config, data, argument or user-code contract
    (``ValueError`` / ``TypeError``, even when found at the first batch), or anything
    before training started; 1: a run that failed while training (a full disk, a crash
    in the model). A missing optional extra is refused input too."""
    from trainwell.integrations import MissingExtra

    refused = isinstance(err, (ValueError, TypeError, MissingExtra))
    return 1 if _state["training"] and not refused else 2


def one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command so that any failure is one line and an exit status, never a traceback:
    see :func:`exit_status`. ``--traceback`` / ``TRAINWELL_DEBUG=1`` re-raise."""

    @functools.wraps(command)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):  # usage errors: typer's own
            raise
        except Exception as err:
            if _state["traceback"] or os.environ.get(DEBUG_ENV, "0") not in ("", "0"):
                raise
            fail(describe(err), exit_status(err))

    return guarded


class _TrainingStarted:
    """A ``fit()`` callback: from its first batch on, a failure exits 1, not 2."""

    def on_fit_start(self) -> None:
        _state["training"] = True


def results_table(title: str, rows: dict[str, float]) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in rows.items():
        if key.endswith("_hash"):  # a fingerprint for soups, not a result
            continue
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    return table


def _default_out(config_path: Path, config: RunConfig) -> Path:
    """``runs/<config file name>-seed<seed>``: named after the config, never after the data."""
    return Path("runs") / f"{config_path.stem}-seed{config.seed}"


def execute(
    config: RunConfig, out: Path, quiet: bool, resume: bool | Path = False, overwrite: bool = False
) -> None:
    """Train one run, write its directory and print its results table.

    A run refused before training (bad data, a model target that fails) leaves no run
    directory behind; one that fails during training keeps what it has so far.
    """
    from trainwell.app.run_dir import claim, write_text
    from trainwell.app.runner import RunFailed, train, write_failed_run, write_run_dir
    from trainwell.distributed import is_main_process

    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; give a directory for the run's files")
    created = _first_missing(out)
    wrote_config = not resume and not (out / "config.toml").exists()
    if not resume and is_main_process():
        claim(out, config, overwrite)
        write_text(out / "config.toml", to_toml(config))  # first: `resume` finds it
    try:
        if config.ensemble.members > 1:
            execute_ensemble(config, out)
            return
        result, model = train(
            config, out_dir=out, progress=not quiet, resume=resume, callbacks=(_TrainingStarted(),)
        )
    except RunFailed as err:
        if is_main_process():
            write_failed_run(out, config, err)
        fail(f"{err} (what the run has so far is in {out})", 1)
    except Exception:
        if not _state["training"] and is_main_process():
            _forget(out, created, wrote_config)
        raise
    if not is_main_process():
        return  # under DDP only rank 0 writes files and prints
    write_run_dir(out, config, result, model)
    rows = {
        **result.test,
        **result.extra,
        "epochs": result.epochs_run,
        "stop": result.stop_reason,
        "seconds": result.seconds,
    }
    data = config.data.target if config.data.target and ":" in config.data.target else None
    name = data.rpartition(":")[2] if data else config.data.source
    console.print(results_table(f"trainwell run: {name} ({out})", rows))


def _first_missing(out: Path) -> Path | None:
    """The outermost folder of ``out`` that does not exist yet (None: ``out`` exists)."""
    missing = None
    for folder in [out, *out.parents]:
        if folder.exists():
            return missing
        missing = folder
    return missing


def _forget(out: Path, created: Path | None, wrote_config: bool) -> None:
    """Undo a refused run: remove the folders it created, or the config.toml it wrote."""
    import shutil

    if created is not None and out.is_dir() and {p.name for p in out.iterdir()} <= {"config.toml"}:
        shutil.rmtree(out, ignore_errors=True)
        for folder in out.parents:  # the empty folders made for it, up to the first one
            if folder == created.parent or any(folder.iterdir()):
                break
            folder.rmdir()
    elif wrote_config:
        (out / "config.toml").unlink(missing_ok=True)


def execute_ensemble(config: RunConfig, out: Path) -> None:
    """Train the ``[ensemble]`` members, write their files and print member vs ensemble."""
    import json

    from trainwell.app.ensemble_runner import train_ensemble, write_ensemble_outputs
    from trainwell.app.run_logging import member_logging

    result = train_ensemble(member_logging(config, out))
    summary = {"config": config.model_dump(mode="json"), **write_ensemble_outputs(out, result)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    ens = summary["ensemble"]
    table = Table(title=f"trainwell run: {config.ensemble.members}-member ensemble ({out})")
    columns = ["acc", "nll", "ece", "brier", "nll_ts", "ece_ts"]
    table.add_column("model")
    for column in columns:
        table.add_column(column, justify="right")
    named = [(f"member {i}", m) for i, m in enumerate(ens["members"])]
    for name, row in [
        *named,
        ("members (mean)", ens["members_mean"]),
        ("ensemble", ens["ensemble"]),
    ]:
        table.add_row(name, *(f"{row[c]:.4f}" for c in columns))
    console.print(table)
    console.print("_ts: after temperature scaling fitted on the validation split")


@app.command()
@one_line_errors
def run(
    config: Annotated[Path, typer.Argument(help="TOML config of the run.")],
    set_: SetOption = None,
    out: OutOption = None,
    quiet: QuietOption = False,
    nproc: Annotated[
        int,
        typer.Option(
            "--nproc", min=1, help="Processes for data-parallel (DDP) training via torchrun."
        ),
    ] = 1,
    overwrite: Annotated[
        bool, typer.Option(help="Replace another run's files in --out (default: refuse).")
    ] = False,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            min=0.001,
            help="Seconds a DDP collective may wait for a rank "
            "(distributed.timeout_s, default 120).",
        ),
    ] = None,
) -> None:
    """Train one configured run; write config, metrics.csv, weights, summary and curves."""
    set_ = [*(set_ or []), *([f"distributed.timeout_s={timeout}"] if timeout else [])]
    cfg = load_config(config, set_ or [])
    from trainwell.app.launch import env_world_size, launch

    if nproc > 1 and env_world_size() == 1:  # not yet under torchrun: re-launch through it
        if cfg.batch_size % nproc:
            fail(f"batch_size {cfg.batch_size} (global) must be divisible by --nproc {nproc}")
        args = ["run", str(config), *(f"--set={s}" for s in set_ or [])]
        args += [f"--out={out or _default_out(config, cfg)}"] + (["--quiet"] if quiet else [])
        args += ["--overwrite"] if overwrite else []
        raise typer.Exit(launch(nproc, args))  # ranks read distributed.timeout_s themselves
    execute(cfg, out or _default_out(config, cfg), quiet, overwrite=overwrite)


@app.command()
@one_line_errors
def resume(
    run_dir: Annotated[Path, typer.Argument(help="Directory of a run with checkpoints.")],
    quiet: QuietOption = False,
    restart: Annotated[
        bool, typer.Option(help="With no valid checkpoint, train again from epoch 0.")
    ] = False,
) -> None:
    """Continue a killed run from its newest valid checkpoint, with the config it was trained on.

    It says what it does: which checkpoint it resumed from and which corrupt ones it skipped.
    """
    from trainwell.app.run_dir import config_of_checkpoint, newest_valid_checkpoint

    path, skipped = newest_valid_checkpoint(run_dir)
    for line in skipped:
        typer.echo(f"trainwell: {line}", err=True)
    cfg = config_of_checkpoint(path) if path is not None else None
    if cfg is None:  # no checkpoint, or one written before checkpoints carried their config
        try:
            cfg = load_config(run_dir / "config.toml")
        except ConfigError as err:
            fail(f"{run_dir}: {err}")
    if path is None and not restart:
        fail(
            f"{run_dir}: no valid checkpoint to resume from; pass --restart to train it again "
            "from epoch 0 (its outputs are replaced)"
        )
    if path is None:
        typer.echo(f"trainwell: restarting {run_dir} from epoch 0", err=True)
        execute(cfg, run_dir, quiet, overwrite=True)
        return
    from trainwell.checkpoints import read_metadata

    epoch = int(read_metadata(path)["step"])
    typer.echo(
        f"trainwell: resumed after epoch {epoch + 1} of {cfg.epochs} ({path.name})", err=True
    )
    execute(cfg, run_dir, quiet, resume=path)


SeedsOption = Annotated[
    int | None, typer.Option("--seeds", min=1, help="Seeds per variant (default: ablation.seeds).")
]
JobsOption = Annotated[
    int | None,
    typer.Option(
        "--jobs",
        "-j",
        min=1,
        help="Runs at once: worker processes (one torch thread each), or Ray tasks in flight "
        "(default: what the cluster fits).",
    ),
]
ExecutorOption = Annotated[
    str,
    typer.Option(
        "--executor",
        help="Where runs train: local (worker processes, the default) or ray (one Ray task "
        "per run, asking for [ablation.resources]; pip install 'trainwell[ray]').",
    ),
]
AddressOption = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="Ray cluster to run on (HEAD:6379, or auto for the one on this machine); "
        "default: start Ray here. Only with --executor ray.",
    ),
]
DbOption = Annotated[
    str | None,
    typer.Option("--db", help="SQLAlchemy URL of the results store (default: DIR/results.sqlite)."),
]


def run_ablation(
    raw: dict,
    name: str | None,
    out: Path,
    seeds: int | None,
    jobs: int | None,
    db: str | None,
    quiet: bool,
    retry_failed: bool = False,
    executor: str = "local",
    address: str | None = None,
) -> None:
    """Check every planned run, run (or resume) the study into its store, then write and
    print its report; exit 1 when runs failed, naming the file with their messages."""
    import os

    from trainwell.study.checks import check_study
    from trainwell.study.execute import run_study
    from trainwell.study.failures import failure_summary
    from trainwell.study.plan import study_logging
    from trainwell.study.report import print_table, study_rows, write_report
    from trainwell.study.store import Store, default_url

    if executor not in ("local", "ray"):
        fail(f"--executor must be 'local' or 'ray', got {executor!r}")
    if address is not None and executor != "ray":
        fail(f"--address {address} names a Ray cluster: pass --executor ray too")
    check_study(raw, seeds)  # before anything is created or trained
    name = name or str(raw["ablation"].get("name", "study"))
    study_logging(raw, name, out)  # [logging]: one experiment, runs tagged; extras checked
    out.mkdir(parents=True, exist_ok=True)
    if executor == "local":
        jobs = jobs or max(1, min(4, os.cpu_count() or 1))
    store = Store(db or default_url(out))
    study = run_study(raw, store, name=name, seeds=seeds, jobs=jobs, progress=not quiet,
                      retry_failed=retry_failed, executor=executor, address=address)  # fmt: skip
    path = write_report(store, out, name)
    print_table(study_rows(store, name), console)
    console.print(f"wrote {path} and {out / 'summary.png'}")
    failed = failure_summary(store, study, out)
    if failed:
        fail(failed, 1)


@app.command()
@one_line_errors
def ablate(
    config: Annotated[Path, typer.Argument(help="TOML config with an \\[ablation] section.")],
    seeds: SeedsOption = None,
    jobs: JobsOption = None,
    out: OutOption = None,
    db: DbOption = None,
    quiet: QuietOption = False,
    retry_failed: Annotated[bool, typer.Option(help="Run failed runs again on resume.")] = False,
    executor: ExecutorOption = "local",
    address: AddressOption = None,
) -> None:
    """Train the base config and its variants over seeds; store results and write the report.

    Run it again after a kill and it resumes: finished runs are skipped.
    """
    from trainwell.app.config_files import absolute_targets, read_toml

    raw = absolute_targets(read_toml(config), config.resolve().parent)
    section = raw.get("ablation")
    if section is None:
        fail(
            f"{config}: no [ablation] section; add [ablation.grid] strengths or "
            "[ablation.variants.NAME] to compare against the base config"
        )
    name = str(section.get("name", config.stem)) if isinstance(section, dict) else ""
    run_ablation(
        raw,
        name,
        out or Path("runs") / f"{config.stem}-ablation",
        seeds,
        jobs,
        db,
        quiet,
        retry_failed,
        executor,
        address,
    )


@app.command()
@one_line_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="Directory of an ablation study.")],
    db: DbOption = None,
    study: Annotated[str | None, typer.Option(help="Study name (default: the newest).")] = None,
) -> None:
    """Rebuild report.html and summary.png of a study from its results store."""
    from trainwell.study.report import print_table, study_rows, write_report
    from trainwell.study.store import Store, default_url

    if db is None and not (run_dir / "results.sqlite").is_file():
        fail(f"{run_dir}: no results.sqlite here; pass --db URL for another store")
    store = Store(db or default_url(run_dir), create=False)
    path = write_report(store, run_dir, study)
    print_table(study_rows(store, study), console)
    console.print(f"wrote {path}")


@app.command()
@one_line_errors
def init(
    name: Annotated[
        str | None, typer.Argument(help="Example to write (default sequence_cnn; see --list).")
    ] = None,
    directory: Annotated[Path, typer.Option("--dir", help="Where to write it.")] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Replace files that exist.")] = False,
    list_all: Annotated[bool, typer.Option("--list", help="List the examples.")] = False,
) -> None:
    """Write an example config (and its model/data code) to start from."""
    from trainwell.app.starters import DEFAULT, available, write_example

    if list_all:
        for example, about in available().items():
            typer.echo(f"{example:20s} {about}")
        return
    written = write_example(name or DEFAULT, directory, force=force)
    config = written[0]
    typer.echo(f"wrote {', '.join(str(p) for p in written)}")
    typer.echo(f"next: trainwell run {config}   or   trainwell ablate {config}")


@app.command()
@one_line_errors
def demo(
    out: OutOption = None,
    seeds: SeedsOption = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Worker processes.")] = 2,
    quiet: QuietOption = False,
) -> None:
    """The embedded default ablation: every technique on a small digits subset (no download)."""
    from trainwell.study.demo import DEMO_TOML, demo_config

    out = out or Path("runs/demo")
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.toml").write_text(DEMO_TOML, encoding="utf-8")
    run_ablation(demo_config(), "demo", out, seeds, jobs, None, quiet)


@app.command()
@one_line_errors
def soup(
    run_dir: Annotated[Path, typer.Argument(help="Directory of a run with checkpoints.")],
    method: Annotated[str, typer.Option(help="greedy (Wortsman et al. 2022) or uniform.")] = (
        "greedy"
    ),
    out: OutOption = None,
) -> None:
    """Average the checkpoints a run kept into one model file (a model soup)."""
    from trainwell.app.soup_runner import soup_run

    found = soup_run(run_dir, method, out)
    for line in found.get("skipped", []):
        typer.echo(f"trainwell: {line}", err=True)
    table = Table(title=f"soup of {run_dir} (chosen: {', '.join(found['chosen'])})")
    for column in found["rows"][0]:
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in found["rows"]:
        table.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()))
    console.print(table)
    console.print(f"wrote {found['path']}")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: usage errors are one line too, like every other failure."""
    try:
        code = app(args=argv, standalone_mode=False)
    except KeyboardInterrupt:
        typer.echo("trainwell: interrupted", err=True)
        sys.exit(130)
    except typer.Abort:
        typer.echo("trainwell: aborted", err=True)
        sys.exit(1)
    except Exception as err:
        if not hasattr(err, "format_message") or not hasattr(err, "exit_code"):
            raise
        if type(err).__name__ == "NoArgsIsHelpError":  # bare `trainwell`: the help text
            typer.echo(err.format_message())
            sys.exit(0)
        command = getattr(getattr(err, "ctx", None), "command_path", "trainwell")
        message = " ".join(err.format_message().split())
        typer.echo(f"trainwell: error: {message} (see {command} --help)", err=True)
        sys.exit(err.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
