"""Opening a results store: every URL, driver, file or server problem is one line."""

from __future__ import annotations

import importlib.util
import socket
import sqlite3
import sys
import time

import pytest

from trainwell.study.database import StoreError
from trainwell.study.store import Store

EXAMPLES = "use sqlite:///path/to/results.sqlite or postgresql://user@host/db"


def _error(url: str, **kwargs) -> str:
    with pytest.raises(StoreError) as caught:
        Store(url, **kwargs)
    message = str(caught.value)
    assert len(message.splitlines()) == 1, message
    assert "secret" not in message  # passwords are never shown
    return message


BAD_URLS = [
    ("results.sqlite", "db url must be a SQLAlchemy URL like sqlite:///path.db, got "
     "'results.sqlite'"),
    ("://x", "://x is not a valid database URL (Could not parse SQLAlchemy URL from given URL "
     "string); " + EXAMPLES),
    ("postgresql://me:secret@h:port/db", "postgresql://me:***@h:port/db is not a valid database "
     "URL (invalid literal for int() with base 10: 'port'); " + EXAMPLES),
    ("sqlite://relative.sqlite", "Invalid SQLite URL: sqlite://relative.sqlite; " + EXAMPLES),
    ("nosuchdb://me:secret@host/x", "nosuchdb://me:***@host/x: unknown database 'nosuchdb'; "
     + EXAMPLES),
    ("postgresql+nosuchdriver://me:secret@h/db", "postgresql+nosuchdriver://me:***@h/db: unknown "
     "database driver 'nosuchdriver' for postgresql; leave it out (postgresql://...) to use the "
     "default one"),
    ("mysql://me:secret@h/db", "mysql://me:***@h/db: the database driver for mysql is not "
     "installed (no module 'MySQLdb'); install it with pip"),
]  # fmt: skip


@pytest.mark.parametrize(("url", "expected"), BAD_URLS)
def test_bad_urls(url, expected):
    if url.startswith("mysql") and importlib.util.find_spec("MySQLdb") is not None:
        pytest.skip("MySQLdb is installed here")
    assert _error(url) == expected


def test_sqlite_files_that_are_not_results_stores(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a database\n", encoding="utf-8")
    with sqlite3.connect(tmp_path / "other.sqlite") as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
    sqlite3.connect(tmp_path / "empty.sqlite").close()
    (tmp_path / "folder").mkdir()
    cases = {
        "sqlite:///notes.txt": "notes.txt is not a trainwell results store (not a SQLite database)",
        "sqlite:///other.sqlite": "other.sqlite is not a trainwell results store (no study table)",
        "sqlite:///missing/dir/results.sqlite": "results store missing/dir/results.sqlite: the "
        "directory missing/dir does not exist; create it first",
        "sqlite:///folder": "results store folder is a directory; give the path of a file",
    }
    for url, expected in cases.items():
        assert _error(url) == expected
    with sqlite3.connect(tmp_path / "other.sqlite") as conn:  # and it was not written to
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert names == {"users"}
    assert not (tmp_path / "missing").exists()


def test_reading_a_store_never_creates_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sqlite3.connect(tmp_path / "empty.sqlite").close()
    assert _error("sqlite:///new.sqlite", create=False) == "results store new.sqlite does not exist"
    assert not (tmp_path / "new.sqlite").exists()
    assert _error("sqlite:///empty.sqlite", create=False) == (
        "empty.sqlite is not a trainwell results store (no study table; it is empty)"
    )
    Store("sqlite:///made.sqlite").study("one", {})
    assert Store("sqlite:///made.sqlite", create=False).study_names() == ["one"]


def test_no_such_study_lists_the_ones_there(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = Store("sqlite:///results.sqlite")
    with pytest.raises(ValueError, match=r"^no study in the results store results.sqlite; "
                       r"its studies: none yet$"):  # fmt: skip
        store.study_id()
    store.study("first", {})
    store.study("second", {})
    with pytest.raises(ValueError) as caught:
        store.study_id("third")
    assert str(caught.value) == (
        "no study 'third' in the results store results.sqlite; its studies: 'first', 'second'"
    )


@pytest.mark.parametrize("url", ["postgresql://me@localhost/db", "postgres://me@localhost/db",
                                 "postgresql+psycopg://me@localhost/db"])  # fmt: skip
def test_a_postgresql_url_without_the_driver_is_one_line(monkeypatch, url):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "psycopg2", None)
    assert _error(url) == (
        "postgresql needs the psycopg driver, which is not installed: "
        "pip install 'trainwell[postgres]'"
    )


def test_an_unreachable_postgresql_server_is_one_line_naming_host_and_port():
    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is None:
        pytest.skip("no PostgreSQL driver installed")
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    message = _error(f"postgresql://me:secret@127.0.0.1:{port}/db?connect_timeout=3")
    assert time.monotonic() - started < 10
    assert message.startswith(f"cannot connect to the results store at 127.0.0.1:{port} (")
    assert message.lower().endswith("connection refused")
