"""A throwaway PostgreSQL server for tests: initdb into a temporary folder, start, stop.

``server()`` yields a SQLAlchemy URL of a fresh database, or raises
``Unavailable`` with the reason (no binaries, no driver, root without a user to run
the server as) so a fixture can skip with it. As root the server runs as the
``postgres`` (or ``nobody``) user through ``runuser``, since PostgreSQL refuses root.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

BIN_DIRS = [Path(f"/usr/lib/postgresql/{v}/bin") for v in (17, 16, 15, 14, 13)]


class Unavailable(RuntimeError):
    """PostgreSQL cannot be started here; the message says why."""


def _bin_dir() -> Path:
    env = os.environ.get("TRAINWELL_PG_BIN")
    candidates = [Path(env)] if env else []
    found = shutil.which("initdb")
    candidates += [*([Path(found).parent] if found else []), *BIN_DIRS]
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    raise Unavailable("PostgreSQL binaries (initdb, pg_ctl) not found")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _user() -> list[str]:
    """The command prefix that runs the server as a non-root user ([] when not root)."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        raise Unavailable("running as root and runuser is missing: PostgreSQL refuses root")
    import pwd

    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return [runuser, "-u", name, "--"]
    raise Unavailable("running as root with no postgres/nobody user: PostgreSQL refuses root")


@contextlib.contextmanager
def server() -> Iterator[str]:
    """Start a PostgreSQL server in a temporary folder; yield the URL of database ``test``."""
    if importlib.util.find_spec("psycopg") is None:
        raise Unavailable(
            "the PostgreSQL driver is not installed: pip install 'trainwell[postgres]'"
        )
    bin_dir, prefix = _bin_dir(), _user()
    root = Path(tempfile.mkdtemp(prefix="trainwell-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if prefix:  # the server's user must own its folders
        user = prefix[2]
        subprocess.run(["chown", "-R", user, str(root)], check=True)
        root.chmod(0o755)
    port = _free_port()
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}

    def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*prefix, *cmd], env=env, capture_output=True, text=True, check=check, timeout=60
        )

    try:
        try:
            run(
                str(bin_dir / "initdb"), "-D", str(data), "-U", "test", "--auth=trust", "-E", "UTF8"
            )
        except subprocess.CalledProcessError as err:
            raise Unavailable(f"initdb failed: {err.stderr.strip()[-300:]}") from err
        options = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
        options += " -c max_connections=100"
        started = run(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-w",
                      "-l", str(root / "log.txt"), "start", check=False)  # fmt: skip
        if started.returncode != 0:
            log = (root / "log.txt").read_text(errors="replace")[-500:]
            raise Unavailable(f"pg_ctl start failed: {started.stderr.strip()} {log}")
        try:
            yield create_database(f"postgresql://test@127.0.0.1:{port}/postgres", "test")
        finally:
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop",
                check=False)  # fmt: skip
    finally:
        for _ in range(3):
            shutil.rmtree(root, ignore_errors=True)
            if not root.exists():
                break
            time.sleep(0.2)


def create_database(url: str, name: str) -> str:
    """A new empty database on the server of ``url``; its URL."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return url.rsplit("/", 1)[0] + f"/{name}"


def open_fresh_stores(urls: list[str], barrier, results) -> None:
    """A process that opens each of ``urls`` when all its peers do (the creation race).

    It creates the study and plans four runs, then puts the run ids (or the error) on
    ``results``. It loads ``trainwell/study/store.py`` on its own, without the
    ``trainwell`` package and so without torch: ten of these start in a second.
    """
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "src" / "trainwell" / "study" / "store.py"
    spec = importlib.util.spec_from_file_location("_trainwell_store_alone", path)
    assert spec is not None and spec.loader is not None
    store_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(store_module)
    out: list = []
    for url in urls:
        barrier.wait(timeout=120)
        try:
            store = store_module.Store(url)
            study_id = store.study("study", {"seeds": 2})
            out.append([store.plan(study_id, "base", "all", s, s, {}, "{}") for s in range(4)])
        except Exception as err:  # noqa: BLE001 - reported to the test
            out.append(f"{type(err).__name__}: {err}")
    results.put(out)
