"""`memsvc.v1.MemoryService`: translate the request, check the caller and limits, delegate.

Model work goes through the `Scheduler` (batched, on the model thread); the
rest (SQL, checkpoint and export files) runs on worker threads. Errors are
raised, and `status.rpc` turns them into status codes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import TYPE_CHECKING

import grpc
import structlog

from memsvc.engine import SamplingParams
from memsvc.obs.capping import capped
from memsvc.proto.v1 import memsvc_pb2 as pb
from memsvc.proto.v1 import memsvc_pb2_grpc as pb_grpc
from memsvc.server import convert
from memsvc.server.auth import Authenticator, Tenant
from memsvc.server.guards import StreamGuards
from memsvc.server.limits import Limits, RateLimiter, checked_tokens
from memsvc.server.read_ahead import ReadAhead
from memsvc.server.scheduler import AppendChain, PartialAppendError, Scheduler
from memsvc.server.status import ShuttingDownError, check_deadline, rpc
from memsvc.sessions.api import AppendResult, InvalidRequestError

if TYPE_CHECKING:
    from memsvc.sessions.manager import SessionManager

DEFAULT_EXPORT_CHUNK_BYTES = 1 << 20
_MESSAGE_OVERHEAD_BYTES = 1024  # framing of a chunk message, well above what protobuf adds

Context = grpc.aio.ServicerContext


class MemoryServicer(pb_grpc.MemoryServiceServicer):
    """Sessions and their streams, for the tenant whose key each call carries."""

    def __init__(
        self,
        manager: SessionManager,
        scheduler: Scheduler,
        auth: Authenticator,
        limits: Limits,
        stopping: asyncio.Event,
        guards: StreamGuards | None = None,
    ) -> None:
        self._manager = manager
        self._scheduler = scheduler
        self._guards = guards  # forgets the guard of a deleted session
        self._auth = auth
        self._limits = limits
        self._rate = RateLimiter()
        self._stopping = stopping  # set when the server begins to shut down

    # ---- sessions ----------------------------------------------------------------------

    @rpc
    async def CreateSession(self, request: pb.CreateSessionRequest, context: Context) -> pb.Session:
        tenant = await self._caller(context)
        info = await asyncio.to_thread(self._manager.create, tenant.tenant_id, request.name)
        return convert.session(info)

    @rpc
    async def GetSession(self, request: pb.GetSessionRequest, context: Context) -> pb.Session:
        tenant = await self._caller(context, request.session_id)
        info = await asyncio.to_thread(self._manager.get, tenant.tenant_id, request.session_id)
        return convert.session(info)

    @rpc
    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: Context
    ) -> pb.ListSessionsResponse:
        tenant = await self._caller(context)
        infos = await asyncio.to_thread(self._manager.list, tenant.tenant_id)
        return pb.ListSessionsResponse(sessions=[convert.session(info) for info in infos])

    @rpc
    async def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: Context
    ) -> pb.DeleteSessionResponse:
        tenant = await self._caller(context, request.session_id)
        await self._scheduler.ordered(
            request.session_id, self._manager.delete, tenant.tenant_id, request.session_id
        )
        if self._guards is not None:
            self._scheduler.call_soon(self._guards.forget, request.session_id)
        return pb.DeleteSessionResponse()

    # ---- streaming ---------------------------------------------------------------------

    @rpc
    async def Append(self, request: pb.AppendRequest, context: Context) -> pb.AppendAck:
        tenant = await self._caller(context, request.session_id)
        timeout = check_deadline(context)
        result = await self._append(tenant, request.session_id, request.input, "input", timeout)
        return convert.append_ack(result)

    @rpc
    async def Query(self, request: pb.QueryRequest, context: Context) -> pb.QueryAnswer:
        tenant = await self._caller(context, request.session_id)
        return await self._query(tenant, request.session_id, request.prompt, context)

    @rpc
    async def Generate(
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GeneratedTokens]:
        tenant = await self._caller(context, request.session_id)
        async for message in self._generate(tenant, request.session_id, request.prompt, context):
            yield message

    @rpc
    async def Stream(
        self, requests: AsyncIterator[pb.StreamRequest], context: Context
    ) -> AsyncIterator[pb.StreamResponse]:
        tenant = await self._caller(context)
        first = await anext(requests, None)
        if first is None:
            return
        if first.WhichOneof("op") != "open":
            raise InvalidRequestError("the first request of a stream must be `open`")
        session_id = first.open.session_id
        structlog.contextvars.bind_contextvars(session=capped(session_id))
        await asyncio.to_thread(self._manager.prefetch, tenant.tenant_id, session_id)
        info = await asyncio.to_thread(self._manager.get, tenant.tenant_id, session_id)
        yield pb.StreamResponse(request_id=first.request_id, opened=convert.session(info))

        def append(request: pb.StreamRequest, chain: AppendChain) -> Awaitable[AppendResult]:
            deadline = check_deadline(context)
            return self._append(tenant, session_id, request.append, "append", deadline, chain)

        async with _ShutdownWatch(self._stopping) as watch:
            ahead = ReadAhead(requests, watch, append)
            try:
                while (entry := await ahead.next()) is not None:
                    request, appended = entry
                    rid, op = request.request_id, request.WhichOneof("op")
                    if appended is not None:
                        result = await appended
                        ahead.answered()
                        yield pb.StreamResponse(request_id=rid, ack=convert.append_ack(result))
                        continue
                    if op == "query":
                        answer = await self._query(tenant, session_id, request.query, context)
                        yield pb.StreamResponse(request_id=rid, answer=answer)
                    elif op == "generate":
                        generated = self._generate(tenant, session_id, request.generate, context)
                        async for message in generated:
                            yield pb.StreamResponse(request_id=rid, generated=message)
                    else:
                        raise InvalidRequestError(
                            f"request {rid}: `open` may only be the first request"
                            if op == "open"
                            else f"request {rid} sets no op (append, query or generate)"
                        )
                    ahead.resume()
            finally:
                ahead.close()

    # ---- durability, export, import, fork ----------------------------------------------

    @rpc
    async def Checkpoint(
        self, request: pb.CheckpointRequest, context: Context
    ) -> pb.CheckpointInfo:
        tenant = await self._caller(context, request.session_id)
        info = await self._scheduler.ordered(
            request.session_id, self._manager.checkpoint, tenant.tenant_id, request.session_id
        )
        return convert.checkpoint_info(info)

    @rpc
    async def ExportSession(
        self, request: pb.ExportSessionRequest, context: Context
    ) -> AsyncIterator[pb.ExportChunk]:
        tenant = await self._caller(context, request.session_id)
        most = self._limits.max_message_bytes - _MESSAGE_OVERHEAD_BYTES
        chunk_bytes = request.chunk_bytes or min(DEFAULT_EXPORT_CHUNK_BYTES, most)
        if chunk_bytes > most:
            raise InvalidRequestError(f"chunk_bytes {chunk_bytes} is over the message limit {most}")
        chunks: Iterator[bytes] = await self._scheduler.ordered(
            request.session_id,
            self._manager.export,
            tenant.tenant_id,
            request.session_id,
            chunk_bytes,
        )
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
            yield pb.ExportChunk(data=chunk)

    @rpc
    async def ImportSession(
        self, requests: AsyncIterator[pb.ImportSessionRequest], context: Context
    ) -> pb.Session:
        tenant = await self._caller(context)
        first = await anext(requests, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidRequestError("the first request of an import must be its `header`")
        chunks = _chunks_from(requests, asyncio.get_running_loop())
        info = await asyncio.to_thread(
            self._manager.import_, tenant.tenant_id, chunks, first.header.name
        )
        return convert.session(info)

    @rpc
    async def ForkSession(self, request: pb.ForkSessionRequest, context: Context) -> pb.Session:
        tenant = await self._caller(context, request.session_id)
        info = await self._scheduler.ordered(
            request.session_id,
            self._manager.fork,
            tenant.tenant_id,
            request.session_id,
            request.name,
        )
        return convert.session(info)

    # ---- shared steps ------------------------------------------------------------------

    async def _caller(self, context: Context, session_id: str = "") -> Tenant:
        """The calling tenant; binds it (and the session) to every log line of this call."""
        tenant = await self._auth.tenant(context)
        structlog.contextvars.bind_contextvars(tenant=tenant.tenant_id, session=capped(session_id))
        return tenant

    async def _append(
        self,
        tenant: Tenant,
        session_id: str,
        message: pb.Input,
        what: str,
        timeout_s: float | None,
        chain: AppendChain | None = None,
    ) -> AppendResult:
        tokens = checked_tokens(message, self._limits, what)
        expected = message.expected_position if message.HasField("expected_position") else None
        self._rate.take(tenant, len(tokens))
        try:
            return await self._scheduler.append(
                tenant.tenant_id, session_id, tokens, timeout_s, expected, chain
            )
        except PartialAppendError as error:  # its first segments went in
            self._rate.refund(tenant, len(tokens) - error.applied)
            raise
        except Exception:
            self._rate.refund(tenant, len(tokens))
            raise

    def _prompt(self, tenant: Tenant, prompt: pb.Prompt) -> tuple[list[int], SamplingParams, int]:
        """The prompt's tokens and params, and what is charged to the tenant's rate: the
        prompt and the most that may be sampled (refunded if the request fails)."""
        tokens = checked_tokens(prompt.input, self._limits, "prompt.input")
        if prompt.input.HasField("expected_position"):
            raise InvalidRequestError("prompt.input.expected_position applies to appends only")
        params = convert.sampling_params(prompt.params)
        self._scheduler.check_request(tenant.tenant_id, params)
        charged = len(tokens) + params.max_new_tokens
        self._rate.take(tenant, charged)
        return tokens, params, charged

    async def _query(
        self, tenant: Tenant, session_id: str, prompt: pb.Prompt, context: Context
    ) -> pb.QueryAnswer:
        tokens, params, charged = self._prompt(tenant, prompt)
        try:
            answer = await self._scheduler.query(
                tenant.tenant_id, session_id, tokens, params, check_deadline(context)
            )
        except Exception:
            self._rate.refund(tenant, charged)
            raise
        return convert.query_answer(answer)

    async def _generate(
        self, tenant: Tenant, session_id: str, prompt: pb.Prompt, context: Context
    ) -> AsyncIterator[pb.GeneratedTokens]:
        """The sampled tokens as they come (a message per handover: what the pool had
        sampled, up to HANDOVER), then the closing message with the finish reason.

        A token counts as delivered once its message is written (the generator resumes
        after the write): the session commits the prompt and exactly the delivered
        tokens if the call ends early (`GenerateRun`)."""
        tokens, params, charged = self._prompt(tenant, prompt)
        try:
            async with self._scheduler.generate(
                tenant.tenant_id, session_id, tokens, params, check_deadline(context)
            ) as run:
                # A cancelled call may tear the stream down without closing this generator
                # at once; the run must stop (and commit) all the same.
                context.add_done_callback(lambda _: run.abandon())
                async for tokens in run.tokens():
                    yield pb.GeneratedTokens(token_ids=tokens)
                    run.delivered(len(tokens))
        except Exception:
            self._rate.refund(tenant, charged)
            raise
        yield pb.GeneratedTokens(done=True, finish_reason=run.finish_reason or "")


class _ShutdownWatch:
    """Reads a stream's requests until it ends, or until the server begins shutting
    down while the stream waits for its client (ShuttingDownError: UNAVAILABLE)."""

    def __init__(self, stopping: asyncio.Event) -> None:
        self._stopping = stopping
        self._waiter: asyncio.Task[bool] | None = None

    async def __aenter__(self) -> _ShutdownWatch:
        self._waiter = asyncio.ensure_future(self._stopping.wait())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._waiter is not None
        self._waiter.cancel()

    async def next(self, requests: AsyncIterator[pb.StreamRequest]) -> pb.StreamRequest | None:
        assert self._waiter is not None
        read = asyncio.ensure_future(anext(requests, None))
        await asyncio.wait({read, self._waiter}, return_when=asyncio.FIRST_COMPLETED)
        if read.done():
            return read.result()
        read.cancel()
        raise ShuttingDownError("the server is shutting down; reconnect")


def _chunks_from(
    requests: AsyncIterator[pb.ImportSessionRequest], loop: asyncio.AbstractEventLoop
) -> Iterator[bytes]:
    """The import's data chunks for a worker thread, each read from the event loop on
    demand, so an import of any size streams through without being held in memory."""

    async def read() -> pb.ImportSessionRequest | None:
        return await anext(requests, None)

    while (request := asyncio.run_coroutine_threadsafe(read(), loop).result()) is not None:
        if request.WhichOneof("part") != "data":
            raise InvalidRequestError("an import carries one `header`, then only `data`")
        yield request.data
