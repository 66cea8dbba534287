"""`AsyncMemoryClient`: the asyncio SDK, the same calls as `MemoryClient`, awaited. It
carries out the plans of memsvc.client.core, awaiting each step.

async with AsyncMemoryClient("localhost:50051", api_key) as client:
    session = await client.create_session("notes")
    await session.append("The pass key is 71432. Remember it.")
    print(await session.query("What is the pass key?", max_new_tokens=8, temperature=0))
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import Any, TypeVar

import grpc

from memsvc.client.core import calls
from memsvc.client.core.calls import Upload
from memsvc.client.core.handles import ClientCore, SessionCore
from memsvc.client.core.plans import END, Deliver, Failed, Pause, Plan, Read, Start, Step, Steps
from memsvc.client.core.stream import AppendStream, Attempt
from memsvc.client.messages import Data, input_message
from memsvc.proto.v1 import memsvc_pb2 as pb
from memsvc.proto.v1 import memsvc_pb2_grpc as pb_grpc

T = TypeVar("T")
Replica = tuple[grpc.aio.Channel, pb_grpc.MemoryServiceStub]


async def _items(items: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


async def _upload(upload: Upload) -> AsyncIterator[Any]:
    yield upload.first
    async for item in _items(upload.items):
        yield upload.take(item)


class AsyncMemoryClient(ClientCore[Replica]):
    """A tenant's asyncio connection to a memsvc server or cluster (arguments: `ClientCore`);
    create it inside a running event loop."""

    def _connect(self, address: str) -> Replica:
        channel = dataclasses.replace(self.connection, address=address).aio_channel()
        return channel, pb_grpc.MemoryServiceStub(channel)

    async def _wait(self, step: Step) -> Any:
        """The outcome of one step, awaited (a gRPC error as `Failed`)."""
        try:
            if isinstance(step, Pause):
                await asyncio.sleep(step.seconds)
                return None
            if isinstance(step, Read):
                message = await step.responses.read()
                return END if message is grpc.aio.EOF else message
            assert isinstance(step, Start)
            request = _upload(step.request) if isinstance(step.request, Upload) else step.request
            call = getattr(step.stub, step.method)(
                request,
                metadata=self.connection.metadata,
                timeout=None if step.streaming else self.timeout,
            )
            return call if step.streaming else await call
        except grpc.RpcError as error:
            return Failed(error)

    async def each(self, plan: Plan[None]) -> AsyncIterator[Any]:
        """What ``plan`` delivers, as it comes."""
        with Steps(plan) as steps:
            for step in steps:
                if isinstance(step, Deliver):
                    yield step.item
                else:
                    steps.reply(step, await self._wait(step))

    async def one(self, plan: Plan[None]) -> Any:
        """The one item ``plan`` delivers (a unary call's answer)."""
        items = self.each(plan)
        try:
            return await anext(items)
        finally:
            await items.aclose()

    async def create_session(self, name: str = "") -> AsyncSession:
        return AsyncSession(self, await self.one(self.answer(calls.create_session(name))))

    async def open_session(self, session_id: str) -> AsyncSession:
        """A handle on an existing session (NotFoundError if this tenant has none such)."""
        info = await self.one(self.answer(calls.get_session(session_id, routed=False)))
        return AsyncSession(self, info)

    async def list_sessions(self) -> list[pb.Session]:
        return list((await self.one(self.answer(calls.list_sessions()))).sessions)

    async def import_session(
        self, chunks: Iterable[bytes] | AsyncIterable[bytes], name: str = ""
    ) -> AsyncSession:
        """A new session from an export's bytes (e.g. `AsyncSession.export()`'s chunks)."""
        info = await self.one(self.answer(calls.import_session(name, chunks)))
        return AsyncSession(self, info)

    async def close(self) -> None:
        for channel, _ in self.replicas.connections():
            await channel.close()

    async def __aenter__(self) -> AsyncMemoryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncSession(SessionCore[AsyncMemoryClient]):
    """One session of the client's tenant, awaited; each call as `Session`'s."""

    async def refresh(self) -> pb.Session:
        return await self.client.one(self._refresh())

    async def append(self, data: Data) -> pb.AppendAck:
        return await self.client.one(self._append(data))

    def append_stream(
        self, pieces: Iterable[Data] | AsyncIterable[Data], window: int = 4
    ) -> AsyncIterator[pb.AppendAck]:
        return _Appender(AppendStream(self, window), pieces).run(self.client)

    async def query(self, prompt: Data, **sampling: Any) -> str:
        return await self.client.one(self._query(prompt, sampling))

    def generate(self, prompt: Data, **sampling: Any) -> AsyncIterator[str]:
        return self.client.each(self._generate(prompt, sampling))

    async def checkpoint(self) -> pb.CheckpointInfo:
        return await self.client.one(self.client.answer(calls.checkpoint(self.id)))

    async def fork(self, name: str = "") -> AsyncSession:
        info = await self.client.one(self.client.answer(calls.fork(self.id, name)))
        return AsyncSession(self.client, info)

    def export(self, chunk_bytes: int = 0) -> AsyncIterator[bytes]:
        return self.client.each(self._export(chunk_bytes))

    async def delete(self) -> None:
        await self.client.one(self.client.answer(calls.delete_session(self.id)))


class _Appender:
    """`AsyncSession.append_stream`'s request side. The caller's pieces are pulled by a
    task of their own into a queue of one, so that ending a call (which cancels its
    request iterator) never cancels the caller's iterator half-way."""

    def __init__(self, stream: AppendStream, pieces: Iterable[Data] | AsyncIterable[Data]) -> None:
        self.stream = stream
        self.pieces = pieces
        self.changed = asyncio.Event()
        self.queue: asyncio.Queue[pb.Input | None] = asyncio.Queue(maxsize=1)

    async def _pump(self) -> None:
        async for piece in _items(self.pieces):
            await self.queue.put(input_message(piece))
        await self.queue.put(None)

    async def run(self, client: AsyncMemoryClient) -> AsyncIterator[pb.AppendAck]:
        pump = asyncio.get_running_loop().create_task(self._pump())
        try:
            async for ack in client.each(self.stream.plan(self.requests, self.changed.set)):
                yield ack
        finally:
            pump.cancel()

    async def _until(self, done: Callable[[], bool]) -> None:
        while not done():
            self.changed.clear()
            await self.changed.wait()

    async def requests(self, attempt: Attempt) -> AsyncIterator[pb.StreamRequest]:
        yield attempt.first
        await self._until(lambda: attempt.opened or attempt.ended)
        for request in self.stream.resends(attempt):
            yield request
        while True:
            await self._until(lambda: self.stream.may_send(attempt))
            if not self.stream.wants_piece(attempt):
                return
            message = self.stream.carried_piece() or await self.queue.get()
            if (request := self.stream.take(attempt, message)) is None:
                return
            yield request
