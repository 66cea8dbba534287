"""`MemoryClient`: the blocking SDK.

with MemoryClient("localhost:50051", api_key) as client:
    session = client.create_session("notes")
    session.append("The pass key is 71432. Remember it.")
    print(session.query("What is the pass key?", max_new_tokens=8, temperature=0))
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator
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


def call_unary(
    method: Callable[..., T],
    request: Any,
    metadata: tuple[tuple[str, str], ...],
    timeout: float | None,
    retry: RetryPolicy | None,
) -> T:
    """A unary call, repeated per `retry` on UNAVAILABLE (None: once); typed errors."""
    delays = retry.delays() if retry is not None else iter(())
    while True:
        try:
            return method(request, metadata=metadata, timeout=timeout)
        except grpc.RpcError as error:
            delay = next(delays, None) if RetryPolicy.retryable(error) else None
            if delay is None:
                raise from_rpc_error(error) from None
            time.sleep(delay)


class MemoryClient:
    """A tenant's connection to a memsvc server. timeout: seconds per unary call
    (None: no deadline); streams have none unless a call is given one."""

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
        self._channel = self.connection.channel()
        self.stub = pb_grpc.MemoryServiceStub(self._channel)

    def create_session(self, name: str = "") -> Session:
        info = self.call(self.stub.CreateSession, pb.CreateSessionRequest(name=name))
        return Session(self, info)

    def open_session(self, session_id: str) -> Session:
        """A handle on an existing session (NotFoundError if this tenant has none such)."""
        request = pb.GetSessionRequest(session_id=session_id)
        return Session(self, self.call(self.stub.GetSession, request, idempotent=True))

    def list_sessions(self) -> list[pb.Session]:
        request = pb.ListSessionsRequest()
        return list(self.call(self.stub.ListSessions, request, idempotent=True).sessions)

    def import_session(self, chunks: Iterable[bytes], name: str = "") -> Session:
        """A new session from an export's bytes (e.g. `Session.export()`'s chunks)."""

        def requests() -> Iterator[pb.ImportSessionRequest]:
            yield pb.ImportSessionRequest(header=pb.ImportHeader(name=name))
            for chunk in chunks:
                yield pb.ImportSessionRequest(data=chunk)

        with _typed_errors():
            info = self.stub.ImportSession(requests(), metadata=self.connection.metadata)
        return Session(self, info)

    def call(self, method: Callable[..., T], request: Any, *, idempotent: bool = False) -> T:
        """One unary call with the key and the timeout; idempotent ones are retried
        on UNAVAILABLE. Failures raise typed errors (memsvc.client.errors)."""
        retry = self.retry if idempotent else None
        return call_unary(method, request, self.connection.metadata, self.timeout, retry)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> MemoryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Session:
    """One session of the client's tenant. `info` is as of the last call that returned it."""

    def __init__(self, client: MemoryClient, info: pb.Session) -> None:
        self.client = client
        self.info = info
        self.id = info.session_id

    def refresh(self) -> pb.Session:
        request = pb.GetSessionRequest(session_id=self.id)
        self.info = self.client.call(self.client.stub.GetSession, request, idempotent=True)
        return self.info

    def append(self, data: Data) -> pb.AppendAck:
        """Appends text (str, UTF-8 bytes) or token ids; returns once they are durable."""
        request = pb.AppendRequest(session_id=self.id, input=input_message(data))
        return self.client.call(self.client.stub.Append, request)

    def append_stream(self, pieces: Iterable[Data], window: int = 4) -> Iterator[pb.AppendAck]:
        """Appends each piece over one stream, with at most `window` unacknowledged;
        yields their acknowledgements in order. Faster than `append` in a loop."""
        in_flight = threading.Semaphore(window)
        finished = threading.Event()

        def requests() -> Iterator[pb.StreamRequest]:
            yield pb.StreamRequest(open=pb.OpenStream(session_id=self.id))
            remaining = iter(pieces)
            for request_id in itertools.count(1):
                while not in_flight.acquire(timeout=0.1):  # room first, then the next piece
                    if finished.is_set():  # the call ended: stop feeding it
                        return
                piece = next(remaining, _END)
                if piece is _END:
                    return
                yield pb.StreamRequest(request_id=request_id, append=input_message(piece))

        responses = self.client.stub.Stream(requests(), metadata=self.client.connection.metadata)
        try:
            with _typed_errors():
                for response in responses:
                    if response.HasField("ack"):
                        in_flight.release()
                        yield response.ack
                    else:
                        self.info = response.opened
        finally:
            finished.set()
            responses.cancel()

    def query(self, prompt: Data, **sampling: Any) -> str:
        """The answer to `prompt` from a copy of the memory; the session is unchanged.
        sampling: see `memsvc.client.messages.prompt_message`."""
        request = pb.QueryRequest(session_id=self.id, prompt=prompt_message(prompt, sampling))
        return self.client.call(self.client.stub.Query, request, idempotent=True).text

    def generate(self, prompt: Data, **sampling: Any) -> Iterator[str]:
        """Appends the prompt and samples; yields text as it comes. Prompt and output
        become part of the stream."""
        request = pb.GenerateRequest(session_id=self.id, prompt=prompt_message(prompt, sampling))
        decoder = TextDecoder()
        with _typed_errors():
            for message in self.client.stub.Generate(
                request, metadata=self.client.connection.metadata
            ):
                if text := decoder.feed(message.token_ids):
                    yield text
        if text := decoder.flush():
            yield text

    def checkpoint(self) -> pb.CheckpointInfo:
        request = pb.CheckpointRequest(session_id=self.id)
        return self.client.call(self.client.stub.Checkpoint, request, idempotent=True)

    def fork(self, name: str = "") -> Session:
        request = pb.ForkSessionRequest(session_id=self.id, name=name)
        return Session(self.client, self.client.call(self.client.stub.ForkSession, request))

    def export(self, chunk_bytes: int = 0) -> Iterator[bytes]:
        """The session's memory as chunks of bytes (`MemoryClient.import_session` takes them);
        chunk_bytes 0: the server's default (1 MiB, or less under its message limit)."""
        request = pb.ExportSessionRequest(session_id=self.id, chunk_bytes=chunk_bytes)
        with _typed_errors():
            for chunk in self.client.stub.ExportSession(
                request, metadata=self.client.connection.metadata
            ):
                yield chunk.data

    def delete(self) -> None:
        request = pb.DeleteSessionRequest(session_id=self.id)
        self.client.call(self.client.stub.DeleteSession, request)
