"""Fixtures of the session-manager suites: a tiny engine, real databases, managers on a data dir.

Nothing is mocked: SQLite files and PostgreSQL schemas (``tests/conftest.py``),
the real filesystem under ``tmp_path``, the in-process tracker or a real Redis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from memsvc.engine import StreamingEngine
from memsvc.sessions.api import SessionObserver
from memsvc.sessions.manager import ManagerConfig, SessionManager
from memsvc.store import metadata
from memsvc.store.database import Database, sqlite_url
from memsvc.store.hot_state import HotStateTracker, InProcessHotStateTracker
from memsvc.store.models import Base
from tests.engine.conftest import tiny_model

MakeManager = Callable[..., SessionManager]


@pytest.fixture(scope="package")
def engine() -> StreamingEngine:
    """The tiny float64 model of the engine tests (every branch moves the logits)."""
    return StreamingEngine(tiny_model(seed=0), max_segment=64)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def _with_schema(url: str) -> Database:
    database = Database.from_url(url)
    Base.metadata.create_all(database.engine)
    return database


@pytest.fixture
def database(data_dir: Path) -> Iterator[Database]:
    """The embedded SQLite database in the data directory, with the schema."""
    data_dir.mkdir(parents=True, exist_ok=True)
    database = _with_schema(sqlite_url(data_dir))
    yield database
    database.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_database(request: pytest.FixtureRequest, data_dir: Path) -> Iterator[Database]:
    """Each backend in turn: the embedded SQLite file, then a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        data_dir.mkdir(parents=True, exist_ok=True)
        url = sqlite_url(data_dir)
    else:
        url = request.getfixturevalue("postgres_url")
    database = _with_schema(url)
    yield database
    database.dispose()


@pytest.fixture
def make_manager(
    engine: StreamingEngine, data_dir: Path, request: pytest.FixtureRequest
) -> Iterator[MakeManager]:
    """Builds managers: on the test's data dir and ``database`` unless told otherwise, with
    the in-process tracker and no observer; keyword arguments are ManagerConfig fields. All
    closed at the end."""
    managers: list[SessionManager] = []

    default_engine = engine

    def make(
        *,
        database: Database | None = None,
        tracker: HotStateTracker | None = None,
        engine: StreamingEngine | None = None,
        observer: SessionObserver | None = None,
        **config: object,
    ) -> SessionManager:
        db = database if database is not None else request.getfixturevalue("database")
        settings = replace(ManagerConfig(data_dir=data_dir), **config)
        manager = SessionManager(
            settings,
            engine=engine or default_engine,
            database=db,
            tracker=tracker if tracker is not None else InProcessHotStateTracker(),
            observer=observer,
        )
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        manager.close()


def new_tenant(database: Database, name: str = "acme", max_sessions: int = 1000) -> str:
    """A tenant's id."""
    with database.unit_of_work() as db:
        tenant, _ = metadata.create_tenant(db, name, max_sessions=max_sessions)
        return tenant.id


def random_batches(count: int, seed: int, low: int = 1, high: int = 20) -> list[list[int]]:
    """``count`` token batches of random lengths in [low, high) (byte ids)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=generator).tolist()
    return [torch.randint(0, 256, (n,), generator=generator).tolist() for n in lengths]
