"""`AdminClient`: the operator's calls (AdminService), made with the server's admin key."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from memsvc.client.connection import Connection
from memsvc.client.errors import from_rpc_error
from memsvc.client.retry import RetryPolicy
from memsvc.proto.v1 import memsvc_pb2 as pb
from memsvc.proto.v1 import memsvc_pb2_grpc as pb_grpc

T = TypeVar("T")

_TIERS = {"host": pb.TIER_HOST, "disk": pb.TIER_DISK}


class AdminClient:
    """What one server node holds: resident sessions, eviction, counters, audit events."""

    def __init__(
        self,
        address: str,
        admin_key: str,
        *,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float | None = 60.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.connection = Connection(address, admin_key, tls, root_certificates)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._channel = self.connection.channel()
        self.stub = pb_grpc.AdminServiceStub(self._channel)

    def resident(self) -> list[pb.ResidentSession]:
        """Sessions resident on the node, least recently used first."""
        response = self._call(self.stub.ListResident, pb.ListResidentRequest(), idempotent=True)
        return list(response.sessions)

    def evict(self, session_id: str, tier: str = "disk") -> None:
        """Moves a resident session's state to `tier` ("disk" or "host") now."""
        request = pb.EvictSessionRequest(session_id=session_id, tier=_TIERS[tier])
        self._call(self.stub.EvictSession, request, idempotent=True)

    def stats(self) -> pb.Stats:
        return self._call(self.stub.GetStats, pb.GetStatsRequest(), idempotent=True)

    def events(
        self, tenant_id: str = "", *, kind: str = "", session_id: str = "", limit: int = 100
    ) -> list[pb.Event]:
        """Audit events, newest first: of `tenant_id` (empty: every tenant), filtered by
        `kind` ("mitigation", "corruption", ...) and `session_id` when given."""
        request = pb.ListEventsRequest(
            tenant_id=tenant_id, kind=kind, session_id=session_id, limit=limit
        )
        return list(self._call(self.stub.ListEvents, request, idempotent=True).events)

    def _call(self, method: Callable[..., T], request: Any, *, idempotent: bool) -> T:
        """One call to this node (no failover: admin calls are about one node), repeated
        per `retry` on UNAVAILABLE if idempotent; typed errors."""
        delays = self.retry.delays() if idempotent else iter(())
        while True:
            try:
                return method(request, metadata=self.connection.metadata, timeout=self.timeout)
            except grpc.RpcError as error:
                delay = next(delays, None) if RetryPolicy.retryable(error) else None
                if delay is None:
                    raise from_rpc_error(error) from None
                time.sleep(delay)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
