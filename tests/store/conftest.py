from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from memsvc.store.database import Database, sqlite_url
from memsvc.store.models import Base


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each backend: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path)
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    """A database with the schema (the models' DDL; migrations are held equal to it separately)."""
    db = Database.from_url(database_url)
    Base.metadata.create_all(db.engine)
    yield db
    db.dispose()
