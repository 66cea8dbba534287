"""What the server and client suites share: a tiny model on disk, a real server on
loopback (in a thread of the test process, or as a `memsvc serve` child process),
and tenants in its real metadata database. Nothing is mocked.

Fixtures are defined here and imported by tests/server/conftest.py and
tests/client/conftest.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from memsvc.engine import StreamingEngine
from memsvc.model.io import save_model
from memsvc.model.model import MAGModel
from memsvc.model.tokenizer import VOCAB_SIZE
from memsvc.obs.guard import GuardConfig
from memsvc.obs.metrics import ServiceMetrics
from memsvc.proto.v1 import memsvc_pb2_grpc as pb_grpc
from memsvc.server.app import MemoryServer, ServerConfig
from memsvc.server.backends import load_engine, open_database
from memsvc.sessions.manager import ManagerConfig, SessionManager
from memsvc.store import metadata
from memsvc.store.database import Database
from memsvc.store.hot_state import InProcessHotStateTracker
from memsvc.train.recipe import model_config

ADMIN_KEY = "admin-key-for-tests"
MAX_MESSAGE_BYTES = 256 << 10
MAX_TOKENS_PER_REQUEST = 4096


def save_tiny_model(directory: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny model (seconds per test), saved as a model directory."""
    torch.manual_seed(seed)
    return save_model(MAGModel(model_config("tiny")).eval(), directory)


@dataclass(frozen=True)
class TenantKey:
    tenant_id: str
    name: str
    api_key: str

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),)


def create_tenant(database: Database, name: str, **quotas: int) -> TenantKey:
    with database.unit_of_work() as db:
        tenant, api_key = metadata.create_tenant(db, name, **quotas)
    return TenantKey(tenant.id, tenant.name, api_key)


class ServerThread:
    """A MemoryServer on 127.0.0.1 (a free port), its event loop on a thread of this process."""

    def __init__(
        self,
        manager: SessionManager,
        database: Database,
        config: ServerConfig,
        **options: Any,
    ) -> None:
        self._args = (manager, database, config, VOCAB_SIZE)
        self._options = options  # MemoryServer's keyword arguments
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.server: MemoryServer | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        self.port = self.run(self._start())
        return self

    def stop(self) -> None:
        assert self.server is not None
        self.run(self.server.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()

    def run(self, coroutine: Any) -> Any:
        """Runs a coroutine on the server's loop and returns its result."""
        return self.submit(coroutine).result(60)

    def submit(self, coroutine: Any) -> concurrent.futures.Future[Any]:
        """Starts a coroutine on the server's loop."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    async def _start(self) -> int:
        self.server = MemoryServer(*self._args, **self._options)
        return await self.server.start()


@dataclass
class Service:
    """A running in-process server with two tenants, and raw stubs onto it."""

    thread: ServerThread
    database: Database
    manager: SessionManager
    data_dir: Path
    alice: TenantKey
    bob: TenantKey
    channel: grpc.Channel

    @property
    def address(self) -> str:
        return self.thread.address

    @property
    def stub(self) -> pb_grpc.MemoryServiceStub:
        return pb_grpc.MemoryServiceStub(self.channel)

    @property
    def admin(self) -> pb_grpc.AdminServiceStub:
        return pb_grpc.AdminServiceStub(self.channel)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="session")
def engine(model_dir: Path) -> StreamingEngine:
    return load_engine(model_dir)


def start_service(
    data_dir: Path,
    engine: StreamingEngine,
    config: ServerConfig | None = None,
    manager_class: type[SessionManager] = SessionManager,
    *,
    metrics: ServiceMetrics | None = None,
    guard_config: GuardConfig | None = None,
) -> Service:
    """A server on embedded defaults in data_dir (which may hold an earlier server's data),
    with two new tenants; `metrics` observes the manager as well as the server."""
    database = open_database(data_dir, None)
    manager = manager_class(
        ManagerConfig(data_dir=data_dir, max_tokens_per_append=MAX_TOKENS_PER_REQUEST),
        engine=engine,
        database=database,
        tracker=InProcessHotStateTracker(),
        observer=metrics,
    )
    config = config or ServerConfig(
        address="127.0.0.1:0",
        admin_key=ADMIN_KEY,
        max_message_bytes=MAX_MESSAGE_BYTES,
        shutdown_grace_s=5.0,
    )
    thread = ServerThread(
        manager, database, config, metrics=metrics, guard_config=guard_config
    ).start()
    alice = create_tenant(database, f"alice-{secrets.token_hex(4)}")
    bob = create_tenant(database, f"bob-{secrets.token_hex(4)}")
    channel = grpc.insecure_channel(
        thread.address, options=[("grpc.max_send_message_length", 4 * MAX_MESSAGE_BYTES)]
    )
    return Service(thread, database, manager, data_dir, alice, bob, channel)


def stop_service(service: Service) -> None:
    service.channel.close()
    service.thread.stop()
    service.database.dispose()


@pytest.fixture
def service(tmp_path: Path, engine: StreamingEngine) -> Iterator[Service]:
    """A server on embedded defaults (SQLite and files under tmp_path)."""
    running = start_service(tmp_path / "data", engine)
    yield running
    stop_service(running)
