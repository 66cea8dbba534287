"""`AsyncMemoryClient`: the asyncio SDK, the same calls as `MemoryClient`, awaited.

async with AsyncMemoryClient("localhost:50051", api_key) as client:
    session = await client.create_session("notes")
    await session.append("The pass key is 71432. Remember it.")
    print(await session.query("What is the pass key?", max_new_tokens=8, temperature=0))
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from memsvc.client.connection import Connection
from memsvc.client.errors import from_rpc_error
from memsvc.client.messages import Data, TextDecoder, input_message, prompt_message
from memsvc.client.resume import StreamLedger
from memsvc.client.retry import RetryPolicy
from memsvc.client.routing import (
    Failover,
    Replicas,
    conditional_append,
    parse_addresses,
    position_hint,
)
from memsvc.proto.v1 import memsvc_pb2 as pb
from memsvc.proto.v1 import memsvc_pb2_grpc as pb_grpc

T = TypeVar("T")


@contextlib.contextmanager
def _typed_errors() -> Iterator[None]:
    try:
        yield
    except grpc.RpcError as error:
        raise from_rpc_error(error) from None


async def _each(items: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


class AsyncMemoryClient:
    """A tenant's connection to a memsvc server; create it inside a running event loop.
    timeout: seconds per unary call (None: no deadline)."""

    def __init__(
        self,
        address: str | Sequence[str],
        api_key: str,
        *,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float | None = 60.0,
        retry: RetryPolicy | None = None,
        failover_s: float = 30.0,
    ) -> None:
        addresses = parse_addresses(address)
        self.connection = Connection(addresses[0], api_key, tls, root_certificates)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.failover_s = failover_s
        self.replicas: Replicas[tuple[grpc.aio.Channel, pb_grpc.MemoryServiceStub]] = Replicas(
            addresses, self._connect
        )

    def _connect(self, address: str) -> tuple[grpc.aio.Channel, pb_grpc.MemoryServiceStub]:
        channel = dataclasses.replace(self.connection, address=address).aio_channel()
        return channel, pb_grpc.MemoryServiceStub(channel)

    @property
    def stub(self) -> pb_grpc.MemoryServiceStub:
        """A stub on the replica calls without a session go to."""
        return self.replicas.pick()[1][1]

    def stub_for(self, session_id: str) -> pb_grpc.MemoryServiceStub:
        """A stub on the session's replica, as far as this client knows."""
        return self.replicas.pick(session_id)[1][1]

    async def create_session(self, name: str = "") -> AsyncSession:
        info = await self.call("CreateSession", pb.CreateSessionRequest(name=name))
        return AsyncSession(self, info)

    async def open_session(self, session_id: str) -> AsyncSession:
        """A handle on an existing session (NotFoundError if this tenant has none such)."""
        request = pb.GetSessionRequest(session_id=session_id)
        return AsyncSession(self, await self.call("GetSession", request, idempotent=True))

    async def list_sessions(self) -> list[pb.Session]:
        request = pb.ListSessionsRequest()
        return list((await self.call("ListSessions", request, idempotent=True)).sessions)

    async def import_session(
        self, chunks: Iterable[bytes] | AsyncIterable[bytes], name: str = ""
    ) -> AsyncSession:
        """A new session from an export's bytes (e.g. `AsyncSession.export()`'s chunks)."""

        async def requests() -> AsyncIterator[pb.ImportSessionRequest]:
            yield pb.ImportSessionRequest(header=pb.ImportHeader(name=name))
            async for chunk in _each(chunks):
                yield pb.ImportSessionRequest(data=chunk)

        with _typed_errors():
            info = await self.stub.ImportSession(requests(), metadata=self.connection.metadata)
        return AsyncSession(self, info)

    async def call(
        self,
        method: str,
        request: Any,
        *,
        session_id: str | None = None,
        idempotent: bool = False,
        resend: Any = None,
        on_conflict: Callable[[int], Any] | None = None,
    ) -> Any:
        """One unary call on the session's replica, following redirects; the same rules as
        `MemoryClient.call`. Failures raise typed errors (memsvc.client.errors)."""
        failover = Failover(
            self.replicas,
            session_id,
            resendable=idempotent or resend is not None,
            retry=self.retry,
            budget_s=self.failover_s,
        )
        while True:
            address, (_, stub) = self.replicas.pick(session_id)
            try:
                result = await getattr(stub, method)(
                    request, metadata=self.connection.metadata, timeout=self.timeout
                )
            except grpc.RpcError as error:
                position = position_hint(error)
                if failover.resent and on_conflict is not None and position is not None:
                    return on_conflict(position)
                delay = failover.after(address, error)
                if delay is None:
                    raise from_rpc_error(error) from None
                if failover.resent and resend is not None:
                    request = resend
                await asyncio.sleep(delay)
                continue
            self.replicas.worked(address)
            return result

    async def close(self) -> None:
        for channel, _ in self.replicas.connections():
            await channel.close()

    async def __aenter__(self) -> AsyncMemoryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncSession:
    """One session of the client's tenant. `info` is as of the last call that returned it."""

    def __init__(self, client: AsyncMemoryClient, info: pb.Session) -> None:
        self.client = client
        self.info = info
        self.id = info.session_id
        self.position = info.position  # the stream's end, as last seen

    async def refresh(self) -> pb.Session:
        request = pb.GetSessionRequest(session_id=self.id)
        self.info = await self.client.call(
            "GetSession", request, session_id=self.id, idempotent=True
        )
        self.position = max(self.position, self.info.position)
        return self.info

    async def append(self, data: Data) -> pb.AppendAck:
        """Appends text (str, UTF-8 bytes) or token ids; returns once they are durable."""
        message = input_message(data)
        request, resend, on_conflict = conditional_append(self.id, message, self.position)
        ack = await self.client.call(
            "Append", request, session_id=self.id, resend=resend, on_conflict=on_conflict
        )
        self.position = max(self.position, ack.position)
        return ack

    async def append_stream(
        self, pieces: Iterable[Data] | AsyncIterable[Data], window: int = 4
    ) -> AsyncIterator[pb.AppendAck]:
        """Appends each piece over one stream, with at most `window` unacknowledged;
        yields their acknowledgements in order. Faster than `append` in a loop. Resumes
        on the session's next owner if its replica fails (`Session.append_stream`)."""
        stream = _AsyncResumableStream(self, pieces, window)
        async for ack in stream.run():
            yield ack

    async def query(self, prompt: Data, **sampling: Any) -> str:
        """The answer to `prompt` from a copy of the memory; the session is unchanged.
        sampling: see `memsvc.client.messages.prompt_message`."""
        request = pb.QueryRequest(session_id=self.id, prompt=prompt_message(prompt, sampling))
        answer = await self.client.call("Query", request, session_id=self.id, idempotent=True)
        return answer.text

    async def generate(self, prompt: Data, **sampling: Any) -> AsyncIterator[str]:
        """Appends the prompt and samples; yields text as it comes. Prompt and output
        become part of the stream."""
        request = pb.GenerateRequest(session_id=self.id, prompt=prompt_message(prompt, sampling))
        decoder = TextDecoder()
        with _typed_errors():
            async for message in self.client.stub_for(self.id).Generate(
                request, metadata=self.client.connection.metadata
            ):
                if text := decoder.feed(message.token_ids):
                    yield text
        if text := decoder.flush():
            yield text

    async def checkpoint(self) -> pb.CheckpointInfo:
        request = pb.CheckpointRequest(session_id=self.id)
        return await self.client.call("Checkpoint", request, session_id=self.id, idempotent=True)

    async def fork(self, name: str = "") -> AsyncSession:
        request = pb.ForkSessionRequest(session_id=self.id, name=name)
        info = await self.client.call("ForkSession", request, session_id=self.id)
        return AsyncSession(self.client, info)

    async def export(self, chunk_bytes: int = 0) -> AsyncIterator[bytes]:
        """The session's memory as chunks of bytes (`import_session` takes them);
        chunk_bytes 0: the server's default (1 MiB, or less under its message limit)."""
        request = pb.ExportSessionRequest(session_id=self.id, chunk_bytes=chunk_bytes)
        with _typed_errors():
            async for chunk in self.client.stub_for(self.id).ExportSession(
                request, metadata=self.client.connection.metadata
            ):
                yield chunk.data

    async def delete(self) -> None:
        request = pb.DeleteSessionRequest(session_id=self.id)
        await self.client.call("DeleteSession", request, session_id=self.id)


class _AsyncResumableStream:
    """`AsyncSession.append_stream`: one Stream call per replica it takes.

    The caller's pieces are pulled by a task of their own into a queue of one, so
    that ending a call (which cancels its request iterator) never cancels the
    caller's iterator half-way."""

    def __init__(
        self, session: AsyncSession, pieces: Iterable[Data] | AsyncIterable[Data], window: int
    ) -> None:
        self.session = session
        self.pieces = pieces
        self.ledger = StreamLedger(session.id, window)
        self.room = asyncio.Condition()  # the window has room, or the attempt ended
        self.queue: asyncio.Queue[pb.Input | None] = asyncio.Queue(maxsize=1)
        self.carried: list[pb.Input] = []  # taken by an attempt that ended before sending it
        self.exhausted = False

    async def _pump(self) -> None:
        async for piece in _each(self.pieces):
            await self.queue.put(input_message(piece))
        await self.queue.put(None)

    def _failover(self) -> Failover:
        client = self.session.client
        return Failover(
            client.replicas,
            self.session.id,
            resendable=True,
            retry=client.retry,
            budget_s=client.failover_s,
        )

    async def run(self) -> AsyncIterator[pb.AppendAck]:
        client = self.session.client
        pump = asyncio.get_running_loop().create_task(self._pump())
        failover, resumed = self._failover(), False
        try:
            while True:
                address, (_, stub) = client.replicas.pick(self.session.id)
                ready, finished = asyncio.Event(), asyncio.Event()
                call = stub.Stream(
                    self._requests(ready, finished, resumed),
                    metadata=client.connection.metadata,
                )
                try:
                    async for response in call:
                        if response.HasField("opened"):
                            self.session.info = response.opened
                            for ack in self.ledger.opened(response.opened.position, resumed):
                                self.session.position = max(self.session.position, ack.position)
                                yield ack
                            ready.set()
                            failover = self._failover()
                        elif response.HasField("ack"):
                            self.ledger.acked()
                            async with self.room:
                                self.room.notify_all()
                            self.session.position = max(
                                self.session.position, response.ack.position
                            )
                            yield response.ack
                    client.replicas.worked(address)
                    return
                except grpc.RpcError as error:
                    delay = failover.after(address, error)
                    if delay is None:
                        raise from_rpc_error(error) from None
                    await asyncio.sleep(delay)
                    resumed = True
                finally:
                    finished.set()
                    async with self.room:
                        self.room.notify_all()
                    call.cancel()
        finally:
            pump.cancel()

    async def _requests(
        self, ready: asyncio.Event, finished: asyncio.Event, resumed: bool
    ) -> AsyncIterator[pb.StreamRequest]:
        yield pb.StreamRequest(open=pb.OpenStream(session_id=self.session.id))
        await ready.wait()
        for start, message in self.ledger.unacknowledged():  # on condition
            yield self.ledger.request(message, start)
        while True:
            async with self.room:
                await self.room.wait_for(lambda: not self.ledger.full() or finished.is_set())
            if finished.is_set() or self.exhausted:
                return
            message = self.carried.pop() if self.carried else await self.queue.get()
            if message is None:
                self.exhausted = True
                return
            if finished.is_set():
                self.carried.append(message)  # the next attempt sends it
                return
            start = self.ledger.sent(message)
            yield self.ledger.request(message, start if resumed else None)
