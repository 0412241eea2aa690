"""Engines, sessions and schema upgrades.

Callers open transactions themselves: ``with db.write() as s:`` for a unit of work that writes,
``with db.read() as s:`` for one that only reads. On SQLite a write transaction starts with
BEGIN IMMEDIATE, so two writers queue on the busy timeout instead of one failing with
"database is locked" when it upgrades a read lock; readers never block writers (WAL).
"""

from __future__ import annotations

import logging
import random
import time
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from .exceptions import DatabaseURLError
from .settings import home_dir, normalize_database_url, redact_url

log = logging.getLogger(__name__)
T = TypeVar("T")

# llmbatch.migrations, wherever it is installed (a wheel, or this repository in editable mode).
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# The newest migration's revision. A new migration moves it; tests/test_db.py holds the two equal.
SCHEMA_HEAD = "0008"
SQLITE_BUSY_TIMEOUT_MS = 30_000


def make_engine(url: str) -> Engine:
    """An engine for `url`; DatabaseURLError for a URL that cannot work, before anything connects."""
    url = normalize_database_url(url)
    try:
        if url.startswith("sqlite"):
            _check_sqlite_dir(url)
            engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
            _configure_sqlite(engine)
            return engine
        return create_engine(url, pool_pre_ping=True)
    except (NoSuchModuleError, ImportError) as exc:  # NoSuchModuleError is an ArgumentError: first
        scheme = url.split(":", 1)[0]
        raise DatabaseURLError(f"cannot use {redact_url(url)}: no driver for {scheme!r} is installed "
                               f"(llmbatch supports SQLite and PostgreSQL; {exc})") from exc
    except (ArgumentError, ValueError) as exc:  # ValueError: a port that is not a number
        raise DatabaseURLError(f"not a database URL: {redact_url(url)!r}; expected sqlite:///PATH or "
                               f"postgresql://USER@HOST:PORT/DB") from exc


def _check_sqlite_dir(url: str) -> None:
    """Create the default database's directory under LLMBATCH_HOME; refuse any other missing one.

    A typo in a path would otherwise quietly create directories and an empty database.
    """
    path = url.split("///", 1)[-1].split("?", 1)[0] if "///" in url else ""
    if not path or path == ":memory:" or path.startswith("file:"):
        return
    parent = Path(path).expanduser().parent.absolute()
    home = home_dir().absolute()
    if parent == home:
        parent.mkdir(parents=True, exist_ok=True)
    elif not parent.is_dir():
        raise DatabaseURLError(f"cannot open the SQLite database {path}: the directory {parent} does not exist")


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")  # = SQLITE_BUSY_TIMEOUT_MS
        cur.execute("PRAGMA synchronous=NORMAL")  # safe with WAL: a crash loses no committed txn
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        immediate = conn.get_execution_options().get("sqlite_begin") == "IMMEDIATE"
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def is_transient(exc: BaseException) -> bool:
    """A database error worth retrying: a lost connection, a lock, a serialization failure."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, OperationalError):
        return True
    text = str(getattr(exc, "orig", exc)).lower()
    return any(s in text for s in ("database is locked", "could not serialize", "deadlock detected"))


# How drivers say the server cannot be reached (psycopg, sqlite3), as opposed to a query that failed.
_UNREACHABLE = ("connection refused", "could not connect", "connection failed", "connection timed out",
                "timeout expired", "could not translate host name", "name or service not known", "no route to host",
                "server closed the connection", "connection is closed", "terminating connection",
                "connection reset", "unable to open database file", "the database system is starting up",
                "the database system is shutting down")


def driver_error(exc: BaseException) -> BaseException | None:
    """The database driver's own error behind exc (SQLAlchemy-wrapped, or raw from a cursor), else None."""
    import sqlite3
    import sys

    if isinstance(exc, DBAPIError):
        return exc.orig
    psycopg = sys.modules.get("psycopg")
    if isinstance(exc, sqlite3.Error) or (psycopg is not None and isinstance(exc, psycopg.Error)):
        return exc
    return None


def is_unavailable(exc: BaseException) -> bool:
    """The database cannot be reached at all (not: a deadlock, a lock, a missing table, bad SQL)."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    text = str(getattr(exc, "orig", exc)).lower()
    return any(s in text for s in _UNREACHABLE)


class Database:
    """One engine and its two session factories."""

    def __init__(self, url: str):
        self.url = normalize_database_url(url)
        self.engine = make_engine(self.url)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        writer = self.engine.execution_options(sqlite_begin="IMMEDIATE") if self.is_sqlite else self.engine
        self._write = sessionmaker(writer, expire_on_commit=False)
        self._read = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def write(self) -> Iterator[Session]:
        with self._write.begin() as session:
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._read.begin() as session:
            yield session

    def retrying(self, fn: Callable[[Session], T], *, write: bool = True, attempts: int = 10,
                 base_delay: float = 0.25) -> T:
        """Run ``fn`` in a transaction, retrying the whole transaction on transient errors.

        The transaction either commits whole or not at all, so a retry never half-writes. With
        the defaults a worker rides out about half a minute of database outage.
        """
        begin = self.write if write else self.read
        for attempt in range(attempts):
            try:
                with begin() as session:
                    return fn(session)
            except Exception as exc:
                if attempt == attempts - 1 or not is_transient(exc):
                    raise
                delay = min(base_delay * 2**attempt, 5.0) * (0.5 + random.random())
                log.warning("database busy or unreachable (%s); retrying in %.1fs", type(exc).__name__, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    # -- schema --------------------------------------------------------------

    @cached_property
    def alembic_config(self):
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.attributes["engine"] = self.engine
        return cfg

    def upgrade(self, revision: str = "head") -> None:
        from alembic import command

        command.upgrade(self.alembic_config, revision)

    def schema_is_current(self) -> bool:
        """One small query, without importing Alembic: every command asks this before it starts."""
        with self.engine.connect() as conn:
            if not inspect(conn).has_table("alembic_version"):
                return False
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [SCHEMA_HEAD]

    def ensure_schema(self) -> None:
        """Create or upgrade the schema if needed, so nobody has to run a migration by hand."""
        if self.schema_is_current():
            return
        try:
            self.upgrade()
        except Exception:
            # Another process (a second worker, a submit) may have upgraded it at the same moment.
            if not self.schema_is_current():
                raise

    def dispose(self) -> None:
        self.engine.dispose()
