"""Engines, units of work for the metadata database: SQLite embedded, PostgreSQL in production."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_FILENAME = "memsvc.db"
SQLITE_BUSY_TIMEOUT_MS = 10_000


def sqlite_url(data_dir: Path) -> str:
    """The URL of the embedded database in ``data_dir``."""
    return f"sqlite:///{(Path(data_dir) / SQLITE_FILENAME).absolute()}"


def create_engine_for(url: str | URL, *, echo: bool = False) -> Engine:
    """An engine for ``url``; SQLite ones are configured as ``_configure_sqlite`` describes."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(parsed, echo=echo)
        event.listen(engine, "connect", _configure_sqlite)
        event.listen(engine, "begin", _begin_immediate)
        return engine
    return create_engine(parsed, echo=echo, pool_pre_ping=True)


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers run beside the writer; FULL makes a committed checkpoint
    # row survive power loss (the WAL is truncated behind it); foreign keys are
    # off in SQLite unless asked for on every connection.
    dbapi_connection.isolation_level = None  # we issue BEGIN ourselves, see below
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    finally:
        cursor.close()


def _begin_immediate(connection: Any) -> None:
    # pysqlite defers BEGIN to the first write, so a read-then-write unit of work
    # (quota check, fence check) would read outside its transaction. BEGIN
    # IMMEDIATE takes the write lock up front: units of work are serialised,
    # which SQLite does for writers anyway, and waits honour busy_timeout.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


class Database:
    """An engine and the factory of its units of work."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def from_url(cls, url: str | URL, *, echo: bool = False) -> Database:
        """Connects lazily to ``url`` (e.g. ``postgresql+psycopg://postgres@127.0.0.1/memsvc``)."""
        return cls(create_engine_for(url, echo=echo))

    @classmethod
    def embedded(cls, data_dir: Path) -> Database:
        """The default: a SQLite file in ``data_dir`` (created if missing)."""
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        return cls.from_url(sqlite_url(data_dir))

    @contextmanager
    def unit_of_work(self) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back if it raises.

        Rows returned from it stay readable afterwards (they are not expired on
        commit) but are detached: change them only inside a unit of work.
        """
        with self._sessions.begin() as session:
            yield session

    def dispose(self) -> None:
        """Closes every pooled connection."""
        self.engine.dispose()
