"""`MemoryServer`: the grpc.aio server over one SessionManager, its operations, and its
graceful stop.

Operations: one `ServiceMetrics` per server, served at /metrics on
`metrics_port` (0: not served); every RPC is counted and timed (an
interceptor); each acknowledged append feeds the stream metrics and its
session's guard (`StreamGuards`), whose mitigations are applied through the
manager; the resident-session gauge is refreshed every GAUGE_PERIOD_S; and, with
`canary_interval_s`, a recall canary runs (`ServiceCanary`).

Stopping (SIGTERM): the canary stops (its session is deleted), health turns
NOT_SERVING, idle streams are ended (UNAVAILABLE), no new calls are accepted,
in-flight calls get the grace period to finish, the scheduler finishes the
chunks it holds, and the manager checkpoints every resident session as it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from memsvc.obs.guard import GuardConfig
from memsvc.obs.metrics import ServiceMetrics, start_metrics_server
from memsvc.obs.thresholds import default_guard_config
from memsvc.proto.v1 import memsvc_pb2 as pb
from memsvc.proto.v1 import memsvc_pb2_grpc as pb_grpc
from memsvc.server.admin import AdminServicer
from memsvc.server.auth import Authenticator
from memsvc.server.canary import ServiceCanary
from memsvc.server.decoding import DecodingInterceptor
from memsvc.server.guards import StreamGuards
from memsvc.server.limits import Limits
from memsvc.server.rpc_metrics import RpcMetricsInterceptor
from memsvc.server.scheduler import Scheduler, SchedulerConfig
from memsvc.server.servicer import MemoryServicer
from memsvc.store.database import Database

if TYPE_CHECKING:
    from memsvc.sessions.manager import SessionManager

log = structlog.get_logger(__name__)

SERVICE_NAMES = tuple(service.full_name for service in pb.DESCRIPTOR.services_by_name.values())
GAUGE_PERIOD_S = 1.0


@dataclass(frozen=True)
class ServerConfig:
    """How the server listens and what it allows."""

    address: str = "0.0.0.0:50051"
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key, serve TLS
    tls_key: Path | None = None
    admin_key: str | None = None  # None: AdminService refuses every call
    max_message_bytes: int = 4 << 20
    shutdown_grace_s: float = 10.0
    auth_cache_ttl_s: float = 30.0
    # Pings keep long idle streams alive through proxies and find dead peers.
    keepalive_s: float = 60.0
    metrics_port: int = 0  # serve /metrics (Prometheus) on this port; 0: not served
    metrics_address: str = "0.0.0.0"
    canary_interval_s: float = 0.0  # seconds between recall canary rounds; 0: no canary
    # How the model thread's steps are cut and shared, and the generation limits.
    scheduling: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and its key")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be a port or 0, got {self.metrics_port}")
        if self.canary_interval_s < 0:
            raise ValueError("canary_interval_s must be >= 0 (0: no canary)")

    def grpc_options(self) -> list[tuple[str, int]]:
        keepalive_ms = int(self.keepalive_s * 1000)
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", keepalive_ms),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # Clients (the SDK pings every 30 s) may ping this often without being cut off.
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]


class MemoryServer:
    """Serves `manager` over gRPC; the tenants' keys are checked against `database`.

    `metrics` is the server's recorder (a new one if None): give the same one to the
    SessionManager as its observer, so that evictions, restores, checkpoints and log
    fsyncs are timed too. `guard_config` sets the session guards' thresholds
    (`default_guard_config` of the served model if None).
    """

    def __init__(
        self,
        manager: SessionManager,
        database: Database,
        config: ServerConfig,
        vocab_size: int,
        *,
        metrics: ServiceMetrics | None = None,
        guard_config: GuardConfig | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else ServiceMetrics()
        self.guard_config = guard_config or default_guard_config(manager.engine)
        self._database = database
        self._manager = manager
        self._auth = Authenticator(database, config.admin_key, config.auth_cache_ttl_s)
        # One limit on a request's tokens: the manager's (ManagerConfig.max_tokens_per_append).
        most_tokens = manager.config.max_tokens_per_append
        self._limits = Limits(vocab_size, config.max_message_bytes, most_tokens)
        self._health = health.aio.HealthServicer()
        self._stopping = asyncio.Event()
        self.scheduler: Scheduler | None = None  # runs the model work; set by start()
        self._server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None  # where /metrics is served, once started
        self._metrics_http: WSGIServer | None = None
        self._gauges: asyncio.Task[None] | None = None
        self.canary: ServiceCanary | None = None

    async def start(self) -> int:
        """Binds and starts serving; returns the port (useful with port 0)."""
        engine = self._manager.engine
        guards = StreamGuards(self._manager, self.metrics, self.guard_config, engine.chunk_size)
        self.scheduler = Scheduler(
            self._manager, guards, self.config.scheduling, self.metrics.decode_batch
        )
        self.scheduler.start()
        server = grpc.aio.server(
            options=self.config.grpc_options(),
            interceptors=[RpcMetricsInterceptor(self.metrics), DecodingInterceptor()],
        )
        pb_grpc.add_MemoryServiceServicer_to_server(
            MemoryServicer(
                self._manager, self.scheduler, self._auth, self._limits, self._stopping, guards
            ),
            server,
        )
        pb_grpc.add_AdminServiceServicer_to_server(
            AdminServicer(self._manager, self._auth, guards), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        if self.config.tls_cert is not None and self.config.tls_key is not None:
            credentials = grpc.ssl_server_credentials(
                [(self.config.tls_key.read_bytes(), self.config.tls_cert.read_bytes())]
            )
            self.port = server.add_secure_port(self.config.address, credentials)
        else:
            self.port = server.add_insecure_port(self.config.address)
        if self.config.metrics_port:
            self._metrics_http = start_metrics_server(
                self.config.metrics_port, self.metrics.registry, self.config.metrics_address
            )
            self.metrics_port = self._metrics_http.server_port
        self._gauges = asyncio.get_running_loop().create_task(self._refresh_gauges())
        await server.start()
        self._server = server
        if self.config.canary_interval_s > 0:
            self.canary = ServiceCanary(
                self._manager,
                self.scheduler,
                guards,
                self.metrics,
                self._database,
                self.config.canary_interval_s,
            )
            await self.canary.start()
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        _freeze_startup_objects()
        log.info(
            "server_started",
            address=self.config.address,
            port=self.port,
            tls=self.config.tls_cert is not None,
            metrics_port=self.metrics_port,
            norm_bound=self.guard_config.norm_bound,
        )
        return self.port

    async def stop(self) -> None:
        """The graceful stop of the module docstring; returns once state is durable."""
        assert self._server is not None and self.scheduler is not None
        log.info("server_stopping", grace_s=self.config.shutdown_grace_s)
        if self.canary is not None:
            await self.canary.stop()
        await self._health.enter_graceful_shutdown()
        self._stopping.set()
        await self._server.stop(self.config.shutdown_grace_s)
        await self.scheduler.close()
        await asyncio.to_thread(self._manager.close)
        if self._gauges is not None:
            self._gauges.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gauges
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        gc.unfreeze()  # what the server held may be collected again (tests start many)
        log.info("server_stopped")

    async def _refresh_gauges(self) -> None:
        """Sessions resident per tier, from the manager's books, every GAUGE_PERIOD_S."""
        while True:
            stats = await asyncio.to_thread(self._manager.stats)
            self.metrics.set_sessions({tier.value: n for tier, n in stats.resident.items()})
            await asyncio.sleep(GAUGE_PERIOD_S)

    async def serve_until_signalled(self) -> None:
        """Starts, serves until SIGTERM or SIGINT, then stops gracefully."""
        await self.start()
        signalled = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, signalled.set)
        await signalled.wait()
        await self.stop()


def _freeze_startup_objects() -> None:
    """Moves every object alive once the server is up (modules, the model, the clients'
    stubs: hundreds of thousands) out of the garbage collector's generations, so that a
    full collection walks only what serving created since. Without it a generation-2
    collection here took 110-130 ms, with every thread stopped: each session's append
    in flight waited for it (docs/BENCHMARKS.md, the noisy neighbour)."""
    gc.collect()
    gc.freeze()
