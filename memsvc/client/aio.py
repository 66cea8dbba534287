"""`AsyncMemoryClient`: the asyncio SDK, the same calls as `MemoryClient`, awaited.

async with AsyncMemoryClient("localhost:50051", api_key) as client:
    session = await client.create_session("notes")
    await session.append("The pass key is 71432. Remember it.")
    print(await session.query("What is the pass key?", max_new_tokens=8, temperature=0))
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import Any, TypeVar

import grpc

from memsvc.client.connection import Connection
from memsvc.client.errors import from_rpc_error
from memsvc.client.messages import Data, TextDecoder, input_message, prompt_message
from memsvc.client.retry import RetryPolicy
from memsvc.proto.v1 import memsvc_pb2 as pb
from memsvc.proto.v1 import memsvc_pb2_grpc as pb_grpc

T = TypeVar("T")
_END = object()


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
        address: str,
        api_key: str,
        *,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float | None = 60.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.connection = Connection(address, api_key, tls, root_certificates)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._channel = self.connection.aio_channel()
        self.stub = pb_grpc.MemoryServiceStub(self._channel)

    async def create_session(self, name: str = "") -> AsyncSession:
        info = await self.call(self.stub.CreateSession, pb.CreateSessionRequest(name=name))
        return AsyncSession(self, info)

    async def open_session(self, session_id: str) -> AsyncSession:
        """A handle on an existing session (NotFoundError if this tenant has none such)."""
        request = pb.GetSessionRequest(session_id=session_id)
        return AsyncSession(self, await self.call(self.stub.GetSession, request, idempotent=True))

    async def list_sessions(self) -> list[pb.Session]:
        request = pb.ListSessionsRequest()
        return list((await self.call(self.stub.ListSessions, request, idempotent=True)).sessions)

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
        self, method: Callable[..., Any], request: Any, *, idempotent: bool = False
    ) -> Any:
        """One unary call with the key and the timeout; idempotent ones are retried
        on UNAVAILABLE. Failures raise typed errors (memsvc.client.errors)."""
        delays = self.retry.delays() if idempotent else iter(())
        while True:
            try:
                return await method(
                    request, metadata=self.connection.metadata, timeout=self.timeout
                )
            except grpc.RpcError as error:
                delay = next(delays, None) if RetryPolicy.retryable(error) else None
                if delay is None:
                    raise from_rpc_error(error) from None
                await asyncio.sleep(delay)

    async def close(self) -> None:
        await self._channel.close()

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

    async def refresh(self) -> pb.Session:
        request = pb.GetSessionRequest(session_id=self.id)
        self.info = await self.client.call(self.client.stub.GetSession, request, idempotent=True)
        return self.info

    async def append(self, data: Data) -> pb.AppendAck:
        """Appends text (str, UTF-8 bytes) or token ids; returns once they are durable."""
        request = pb.AppendRequest(session_id=self.id, input=input_message(data))
        return await self.client.call(self.client.stub.Append, request)

    async def append_stream(
        self, pieces: Iterable[Data] | AsyncIterable[Data], window: int = 4
    ) -> AsyncIterator[pb.AppendAck]:
        """Appends each piece over one stream, with at most `window` unacknowledged;
        yields their acknowledgements in order. Faster than `append` in a loop."""
        in_flight = asyncio.Semaphore(window)

        async def requests() -> AsyncIterator[pb.StreamRequest]:
            yield pb.StreamRequest(open=pb.OpenStream(session_id=self.id))
            remaining = aiter(_each(pieces))
            for request_id in itertools.count(1):
                await in_flight.acquire()  # room first, then the next piece
                piece = await anext(remaining, _END)
                if piece is _END:
                    return
                yield pb.StreamRequest(request_id=request_id, append=input_message(piece))

        call = self.client.stub.Stream(requests(), metadata=self.client.connection.metadata)
        try:
            with _typed_errors():
                async for response in call:
                    if response.HasField("ack"):
                        in_flight.release()
                        yield response.ack
                    else:
                        self.info = response.opened
        finally:
            call.cancel()

    async def query(self, prompt: Data, **sampling: Any) -> str:
        """The answer to `prompt` from a copy of the memory; the session is unchanged.
        sampling: see `memsvc.client.messages.prompt_message`."""
        request = pb.QueryRequest(session_id=self.id, prompt=prompt_message(prompt, sampling))
        answer = await self.client.call(self.client.stub.Query, request, idempotent=True)
        return answer.text

    async def generate(self, prompt: Data, **sampling: Any) -> AsyncIterator[str]:
        """Appends the prompt and samples; yields text as it comes. Prompt and output
        become part of the stream."""
        request = pb.GenerateRequest(session_id=self.id, prompt=prompt_message(prompt, sampling))
        decoder = TextDecoder()
        with _typed_errors():
            async for message in self.client.stub.Generate(
                request, metadata=self.client.connection.metadata
            ):
                if text := decoder.feed(message.token_ids):
                    yield text
        if text := decoder.flush():
            yield text

    async def checkpoint(self) -> pb.CheckpointInfo:
        request = pb.CheckpointRequest(session_id=self.id)
        return await self.client.call(self.client.stub.Checkpoint, request, idempotent=True)

    async def fork(self, name: str = "") -> AsyncSession:
        request = pb.ForkSessionRequest(session_id=self.id, name=name)
        info = await self.client.call(self.client.stub.ForkSession, request)
        return AsyncSession(self.client, info)

    async def export(self, chunk_bytes: int = 0) -> AsyncIterator[bytes]:
        """The session's memory as chunks of bytes (`import_session` takes them);
        chunk_bytes 0: the server's default (1 MiB, or less under its message limit)."""
        request = pb.ExportSessionRequest(session_id=self.id, chunk_bytes=chunk_bytes)
        with _typed_errors():
            async for chunk in self.client.stub.ExportSession(
                request, metadata=self.client.connection.metadata
            ):
                yield chunk.data

    async def delete(self) -> None:
        request = pb.DeleteSessionRequest(session_id=self.id)
        await self.client.call(self.client.stub.DeleteSession, request)
