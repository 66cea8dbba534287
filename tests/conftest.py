"""Fixtures for the suites that use real services: PostgreSQL and Redis. Nothing is mocked.

PostgreSQL: ``DATABASE_URL``, else the local server as ``postgres``, else as
``root`` (trust auth). Each test gets a fresh schema in a database private to
the test session, both dropped afterwards.
Redis: ``REDIS_URL``, else redis://127.0.0.1:6379/0, else a ``redis-server``
started on a free port for the test session. Each test gets its own key
namespace, deleted afterwards. A missing service fails the tests, never skips them.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

POSTGRES_CANDIDATES = (
    "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "postgresql+psycopg://root@127.0.0.1:5432/test",
)
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread in every test (set again before each, so a test that changes
    it cannot leak into the next; servers started as processes choose their own). The
    suite's models are tiny, so their ops are all dispatch; a second thread only contends,
    and with the other core busy it made them many times slower: the million-token memory
    test took 67 s (5.6 ms a chunk) beside a training, 0.7 ms a chunk on one thread; a
    timed server step took seconds instead of milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _postgres_url(raw: str) -> URL:
    url = make_url(raw)
    # A bare postgresql:// would pick psycopg2, which the project does not install.
    return url.set(drivername="postgresql+psycopg") if url.drivername == "postgresql" else url


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[Engine]:
    """An autocommit engine on the PostgreSQL server, for creating and dropping test databases."""
    env = os.environ.get("DATABASE_URL")
    candidates = [env] if env else list(POSTGRES_CANDIDATES)
    failures = []
    for raw in candidates:
        engine = create_engine(_postgres_url(raw), isolation_level="AUTOCOMMIT", poolclass=NullPool)
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except OperationalError as error:
            failures.append(f"{raw}: {error.orig}")
            engine.dispose()
            continue
        yield engine
        engine.dispose()
        return
    pytest.fail(
        "PostgreSQL is not reachable (set DATABASE_URL to a server where the user may "
        "CREATE DATABASE):\n" + "\n".join(failures)
    )


@pytest.fixture(scope="session")
def postgres_database(postgres_admin: Engine) -> Iterator[URL]:
    """A PostgreSQL database of this test session's own, dropped at its end."""
    name = f"memsvc_test_{secrets.token_hex(6)}"
    with postgres_admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield postgres_admin.url.set(database=name)
    finally:
        with postgres_admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def postgres_url(postgres_database: URL) -> Iterator[str]:
    """The URL of an empty PostgreSQL schema of this test's own, dropped afterwards.

    The schema is the connection's whole ``search_path``, so to the code under
    test it looks like an empty database (and costs milliseconds, not a CREATE DATABASE).
    """
    schema = f"t_{secrets.token_hex(6)}"
    admin = create_engine(postgres_database, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = postgres_database.update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _redis_answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
    finally:
        client.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A reachable Redis: the configured one, or a private redis-server for this test session."""
    url = os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
    if _redis_answers(url):
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            f"Redis is not reachable at {url} and no redis-server binary is on PATH: "
            "start Redis or point REDIS_URL at one"
        )
    port = _free_port()
    workdir: Path = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while not _redis_answers(url):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server on port {port} did not start (exit {server.poll()})")
            time.sleep(0.05)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client that decodes responses to str."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def redis_namespace(redis_client: redis.Redis) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    namespace = f"memsvc-test-{secrets.token_hex(6)}"
    yield namespace
    keys = list(redis_client.scan_iter(match=f"{namespace}:*", count=1000))
    if keys:
        redis_client.delete(*keys)
