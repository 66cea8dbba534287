"""`memsvc.v1.AdminService`: what this node holds, for the operator (admin key only)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc

from memsvc.obs.capping import capped
from memsvc.proto.v1 import memsvc_pb2 as pb
from memsvc.proto.v1 import memsvc_pb2_grpc as pb_grpc
from memsvc.server import convert
from memsvc.server.auth import Authenticator
from memsvc.server.guards import StreamGuards
from memsvc.server.status import rpc
from memsvc.sessions.api import InvalidRequestError, SessionNotFoundError

if TYPE_CHECKING:
    from memsvc.sessions.manager import SessionManager

Context = grpc.aio.ServicerContext

DEFAULT_EVENTS = 100
MAX_EVENTS = 1000


class AdminServicer(pb_grpc.AdminServiceServicer):
    def __init__(self, manager: SessionManager, auth: Authenticator, guards: StreamGuards) -> None:
        self._manager = manager
        self._auth = auth
        self._guards = guards

    @rpc
    async def ListResident(
        self, request: pb.ListResidentRequest, context: Context
    ) -> pb.ListResidentResponse:
        self._auth.require_admin(context)
        resident = await asyncio.to_thread(self._manager.resident)
        resident.sort(key=lambda r: r.last_access)
        rate = self._guards.updates_per_1k_tokens
        return pb.ListResidentResponse(
            sessions=[convert.resident_session(r, rate(r.session_id)) for r in resident]
        )

    @rpc
    async def EvictSession(
        self, request: pb.EvictSessionRequest, context: Context
    ) -> pb.EvictSessionResponse:
        self._auth.require_admin(context)
        tier = convert.eviction_tier(request.tier)
        resident = await asyncio.to_thread(self._manager.resident)
        owner = next((r.tenant_id for r in resident if r.session_id == request.session_id), None)
        if owner is None:
            raise SessionNotFoundError(f"session {capped(request.session_id)} is not resident here")
        await asyncio.to_thread(self._manager.evict, owner, request.session_id, tier)
        return pb.EvictSessionResponse()

    @rpc
    async def GetStats(self, request: pb.GetStatsRequest, context: Context) -> pb.Stats:
        self._auth.require_admin(context)
        return convert.stats(await asyncio.to_thread(self._manager.stats))

    @rpc
    async def ListEvents(
        self, request: pb.ListEventsRequest, context: Context
    ) -> pb.ListEventsResponse:
        self._auth.require_admin(context)
        limit = request.limit or DEFAULT_EVENTS
        if limit > MAX_EVENTS:
            raise InvalidRequestError(f"limit {limit} is over {MAX_EVENTS}")
        events = await asyncio.to_thread(
            self._manager.events,
            request.tenant_id or None,
            kind=request.kind,
            session_id=request.session_id,
            limit=limit,
        )
        return pb.ListEventsResponse(events=[convert.event(e) for e in events])
