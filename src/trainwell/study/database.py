"""Opening the results database of a study from its URL, every failure as one line.

A results store is any SQLAlchemy URL: ``sqlite:///DIR/results.sqlite`` (the default) or
``postgresql://user@host/db`` (psycopg 3, else psycopg2, from ``pip install
'trainwell[postgres]'``). What can go wrong before the first query is said in one line
that names the database and what to do: a malformed URL, an unknown database or driver,
a driver that is not installed, a SQLite file in a directory that does not exist, a file
that is not a SQLite database, a server that cannot be reached. Messages never show a
password.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

POSTGRES_MISSING = (
    "postgresql needs the psycopg driver, which is not installed: pip install 'trainwell[postgres]'"
)
EXAMPLES = "use sqlite:///path/to/results.sqlite or postgresql://user@host/db"
CONNECT_TIMEOUT_S = 10  # PostgreSQL: a server that does not answer fails in seconds, not never


class StoreError(ValueError):
    """A results store that cannot be opened; ``str()`` is one line."""


def shown(url: str | URL) -> str:
    """``url`` as messages show it: a SQLite file as its path, passwords as ``***``.

    Example:
        >>> shown("postgresql://me:secret@db.lan/results"), shown("sqlite:///runs/x.sqlite")
        ('postgresql://me:***@db.lan/results', 'runs/x.sqlite')
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", str(url))
    if parsed.get_backend_name() == "sqlite" and sqlite_file(parsed) is not None:
        return str(sqlite_file(parsed))
    return parsed.render_as_string(hide_password=True)


def sqlite_file(url: URL) -> Path | None:
    """The file of a SQLite URL; None for an in-memory database or a ``file:`` URI."""
    database = url.database
    if database in (None, "", ":memory:") or url.query.get("mode") == "memory":
        return None
    if database.startswith("file:") or url.query.get("uri"):
        return None
    return Path(database)


def _parse(url: object) -> URL:
    if not isinstance(url, str) or "://" not in url:
        raise StoreError(f"db url must be a SQLAlchemy URL like sqlite:///path.db, got {url!r}")
    try:
        return make_url(url)
    except (ArgumentError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        message = f"{shown(url)} is not a valid database URL ({reason}); {EXAMPLES}"
        raise StoreError(message) from None


def _with_driver(url: URL) -> URL:
    """``postgresql://`` mapped to the installed driver (psycopg 3, else psycopg2)."""
    if url.drivername not in ("postgresql", "postgres"):
        return url
    for module in ("psycopg", "psycopg2"):
        if importlib.util.find_spec(module) is not None:
            return url.set(drivername=f"postgresql+{module}")
    raise StoreError(POSTGRES_MISSING)


def _unknown(url: URL) -> StoreError:
    backend, _, driver = url.drivername.partition("+")
    known_backend = True
    try:
        make_url(f"{backend}://").get_dialect()
    except NoSuchModuleError:
        known_backend = False
    if driver and known_backend:
        return StoreError(
            f"{shown(url)}: unknown database driver {driver!r} for {backend}; "
            f"leave it out ({backend}://...) to use the default one"
        )
    return StoreError(f"{shown(url)}: unknown database {backend!r}; {EXAMPLES}")


def _check_sqlite_file(path: Path, create: bool) -> None:
    if path.is_dir():
        raise StoreError(f"results store {path} is a directory; give the path of a file")
    if not path.parent.is_dir():
        raise StoreError(
            f"results store {path}: the directory {path.parent} does not exist; create it first"
        )
    if not create and not path.is_file():
        raise StoreError(f"results store {path} does not exist")


def open_engine(url: str, *, create: bool = True) -> Engine:
    """The engine of ``url`` (nothing connects yet); :class:`StoreError` when it cannot work.

    With ``create=False`` a SQLite file must exist already (reading a study never makes an
    empty store by mistake).

    Example:
        >>> open_engine("sqlite://").dialect.name
        'sqlite'
        >>> open_engine("nosuchdb://host/x")
        Traceback (most recent call last):
        ...
        trainwell.study.database.StoreError: nosuchdb://host/x: unknown database 'nosuchdb'; use sqlite:///path/to/results.sqlite or postgresql://user@host/db
    """  # noqa: E501
    parsed = _parse(url)
    target = _with_driver(parsed)
    connect_args: dict = {}
    if target.get_backend_name() == "sqlite":
        connect_args["timeout"] = 60
        path = sqlite_file(target)
        if path is not None:
            _check_sqlite_file(path, create)
    elif target.get_backend_name() == "postgresql" and "connect_timeout" not in target.query:
        connect_args["connect_timeout"] = CONNECT_TIMEOUT_S
    try:
        return create_engine(target, connect_args=connect_args)
    except NoSuchModuleError:
        raise _unknown(target) from None
    except ArgumentError as err:  # e.g. sqlite://relative (two slashes short)
        reason = str(err).strip().splitlines()[0]
        raise StoreError(f"{reason}; {EXAMPLES}") from None
    except ImportError as err:
        if target.get_backend_name() == "postgresql":
            raise StoreError(POSTGRES_MISSING) from None
        missing = getattr(err, "name", None) or str(err)
        raise StoreError(
            f"{shown(url)}: the database driver for {target.get_backend_name()} is not "
            f"installed (no module {missing!r}); install it with pip"
        ) from None


def _reason(err: DBAPIError) -> str:
    """The driver's own words, first line only (psycopg repeats a hint and every address)."""
    text = str(err.orig if err.orig is not None else err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    first = first.rpartition("failed: ")[2] or first  # 'connection ... failed: Connection refused'
    return re.sub(r"^(FATAL|ERROR):\s*", "", first).strip()


@contextlib.contextmanager
def connection_errors(url: str) -> Iterator[None]:
    """Turn a failure to open or read the database into one :class:`StoreError` line."""
    try:
        yield
    except DBAPIError as err:
        parsed = make_url(url)
        reason = _reason(err)
        if parsed.get_backend_name() == "sqlite":
            if "file is not a database" in reason:
                raise StoreError(
                    f"{shown(url)} is not a trainwell results store (not a SQLite database)"
                ) from None
            raise StoreError(f"cannot open the results store {shown(url)}: {reason}") from None
        if err.statement is not None:  # connected, and then a query failed
            raise StoreError(f"the results store {shown(url)} failed: {reason}") from None
        where = f"{parsed.host or 'localhost'}:{parsed.port or _default_port(parsed)}"
        raise StoreError(
            f"cannot connect to the results store at {where} ({shown(url)}): {reason}"
        ) from None


def _default_port(url: URL) -> int | str:
    return {"postgresql": 5432, "mysql": 3306, "mssql": 1433}.get(url.get_backend_name(), "?")
