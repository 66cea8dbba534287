"""What a server runs on: the model, the metadata database and the hot-state tracker.

Embedded defaults need only a data directory (SQLite there, an in-process
tracker); a cluster passes PostgreSQL and Redis URLs. Every failure to set one
up is a `SetupError` whose message says what to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import redis
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from memsvc.store import migrate
from memsvc.store.database import Database, sqlite_url
from memsvc.store.hot_state import HotStateTracker, InProcessHotStateTracker, RedisHotStateTracker

if TYPE_CHECKING:
    from memsvc.engine import StreamingEngine


class SetupError(RuntimeError):
    """A backend could not be set up (missing model, unmigrated database, no Redis)."""


def check_model_dir(model_dir: Path) -> None:
    """SetupError unless model_dir holds a model (config.json and model.safetensors)."""
    # Imported here, as in load_engine: `memsvc tenants` opens the database without torch.
    from memsvc.model.io import CONFIG_FILE, WEIGHTS_FILE

    if not all((model_dir / name).is_file() for name in (CONFIG_FILE, WEIGHTS_FILE)):
        raise SetupError(
            f"no model at {model_dir} (a directory with {CONFIG_FILE} and {WEIGHTS_FILE}): "
            "train one with `memsvc train` or pass --model"
        )


def load_engine(model_dir: Path, device: str = "cpu") -> StreamingEngine:
    from memsvc.engine import StreamingEngine
    from memsvc.model.io import load_model

    check_model_dir(model_dir)
    return StreamingEngine(load_model(model_dir, device))


def open_database(data_dir: Path, database_url: str | None) -> Database:
    """The embedded SQLite in data_dir, migrated to the newest schema on open; or the
    database at database_url, which must already be migrated (`memsvc db upgrade`),
    since several servers may share it and only one should change its schema."""
    if database_url is None:
        data_dir.mkdir(parents=True, exist_ok=True)
        url = sqlite_url(data_dir)
        migrate.upgrade(url)
        return Database.from_url(url)
    url = make_url(database_url)
    if url.drivername == "postgresql":  # the bare scheme means psycopg2, which is not installed
        url = url.set(drivername="postgresql+psycopg")
    try:
        current, head = migrate.current_revision(url), migrate.head_revision()
    except OperationalError as error:
        raise SetupError(f"the database does not answer: {error.orig}") from None
    if current != head:
        raise SetupError(
            f"the database is at schema revision {current}, this server needs {head}: "
            "run `memsvc db upgrade` first"
        )
    return Database.from_url(url)


def open_tracker(redis_url: str | None, namespace: str = "memsvc") -> HotStateTracker:
    """Redis at redis_url (checked with a PING), or the in-process tracker of one node."""
    if redis_url is None:
        return InProcessHotStateTracker()
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        client.ping()
    except redis.RedisError as error:
        raise SetupError(f"Redis at {redis_url} does not answer: {error}") from None
    return RedisHotStateTracker(client, namespace)
