"""`MemoryClient`: the blocking SDK.

with MemoryClient("localhost:50051", api_key) as client:
    session = client.create_session("notes")
    session.append("The pass key is 71432. Remember it.")
    print(session.query("What is the pass key?", max_new_tokens=8, temperature=0))
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
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
    """A tenant's connection to a memsvc server or cluster.

    address: one host:port, or several (a sequence, or comma-separated) of the
    cluster's replicas; calls on a session go to the replica that owns it
    (``routing.py``). timeout: seconds per unary call (None: no deadline);
    streams have none unless a call is given one. failover_s: how long a call
    keeps moving between replicas while the cluster hands a session over.
    """

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
        self.replicas: Replicas[tuple[grpc.Channel, pb_grpc.MemoryServiceStub]] = Replicas(
            addresses, self._connect
        )

    def _connect(self, address: str) -> tuple[grpc.Channel, pb_grpc.MemoryServiceStub]:
        channel = dataclasses.replace(self.connection, address=address).channel()
        return channel, pb_grpc.MemoryServiceStub(channel)

    @property
    def stub(self) -> pb_grpc.MemoryServiceStub:
        """A stub on the replica calls without a session go to."""
        return self.replicas.pick()[1][1]

    def create_session(self, name: str = "") -> Session:
        info = self.call("CreateSession", pb.CreateSessionRequest(name=name))
        return Session(self, info)

    def open_session(self, session_id: str) -> Session:
        """A handle on an existing session (NotFoundError if this tenant has none such)."""
        request = pb.GetSessionRequest(session_id=session_id)
        return Session(self, self.call("GetSession", request, idempotent=True))

    def list_sessions(self) -> list[pb.Session]:
        request = pb.ListSessionsRequest()
        return list(self.call("ListSessions", request, idempotent=True).sessions)

    def import_session(self, chunks: Iterable[bytes], name: str = "") -> Session:
        """A new session from an export's bytes (e.g. `Session.export()`'s chunks)."""

        def requests() -> Iterator[pb.ImportSessionRequest]:
            yield pb.ImportSessionRequest(header=pb.ImportHeader(name=name))
            for chunk in chunks:
                yield pb.ImportSessionRequest(data=chunk)

        with _typed_errors():
            info = self.stub.ImportSession(requests(), metadata=self.connection.metadata)
        return Session(self, info)

    def call(
        self,
        method: str,
        request: Any,
        *,
        session_id: str | None = None,
        idempotent: bool = False,
        resend: Any = None,
        on_conflict: Callable[[int], T] | None = None,
    ) -> Any:
        """One unary call (``method`` of MemoryService) on the session's replica, following
        redirects; failures raise typed errors (memsvc.client.errors).

        When a replica fails with the outcome unknown, idempotent calls are
        repeated; others only if ``resend`` (a conditional form of the request)
        is given, and a conflict it meets goes to ``on_conflict(position)``.
        """
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
                result = getattr(stub, method)(
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
                time.sleep(delay)
                continue
            self.replicas.worked(address)
            return result

    def close(self) -> None:
        for channel, _ in self.replicas.connections():
            channel.close()

    def __enter__(self) -> MemoryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Session:
    """One session of the client's tenant. `info` is as of the last call that returned it.

    Appends survive a replica's death: one whose outcome is unknown is sent
    again to the session's next owner on the condition that the stream is
    where this handle last saw it, so it is applied once; this assumes the
    handle is the session's only writer (otherwise FailedPreconditionError).
    """

    def __init__(self, client: MemoryClient, info: pb.Session) -> None:
        self.client = client
        self.info = info
        self.id = info.session_id
        self.position = info.position  # the stream's end, as last seen

    def _seen(self, position: int) -> None:
        self.position = max(self.position, position)

    def refresh(self) -> pb.Session:
        request = pb.GetSessionRequest(session_id=self.id)
        self.info = self.client.call("GetSession", request, session_id=self.id, idempotent=True)
        self._seen(self.info.position)
        return self.info

    def append(self, data: Data) -> pb.AppendAck:
        """Appends text (str, UTF-8 bytes) or token ids; returns once they are durable."""
        message = input_message(data)
        request, resend, on_conflict = conditional_append(self.id, message, self.position)
        ack = self.client.call(
            "Append", request, session_id=self.id, resend=resend, on_conflict=on_conflict
        )
        self._seen(ack.position)
        return ack

    def append_stream(self, pieces: Iterable[Data], window: int = 4) -> Iterator[pb.AppendAck]:
        """Appends each piece over one stream, with at most `window` unacknowledged;
        yields their acknowledgements in order. Faster than `append` in a loop.

        If the replica fails mid-stream, the stream is opened again on the
        session's next owner, the pieces it has (durable, if never acknowledged)
        are acknowledged from its position, and the rest are sent again on the
        condition that the stream is where they start: nothing is lost or doubled.
        """
        return _ResumableStream(self, (input_message(piece) for piece in pieces), window).run()

    def query(self, prompt: Data, **sampling: Any) -> str:
        """The answer to `prompt` from a copy of the memory; the session is unchanged.
        sampling: see `memsvc.client.messages.prompt_message`."""
        request = pb.QueryRequest(session_id=self.id, prompt=prompt_message(prompt, sampling))
        answer = self.client.call("Query", request, session_id=self.id, idempotent=True)
        return answer.text

    def generate(self, prompt: Data, **sampling: Any) -> Iterator[str]:
        """Appends the prompt and samples; yields text as it comes. Prompt and output
        become part of the stream."""
        request = pb.GenerateRequest(session_id=self.id, prompt=prompt_message(prompt, sampling))
        decoder = TextDecoder()
        _, (_, stub) = self.client.replicas.pick(self.id)
        with _typed_errors():
            for message in stub.Generate(request, metadata=self.client.connection.metadata):
                if text := decoder.feed(message.token_ids):
                    yield text
        if text := decoder.flush():
            yield text

    def checkpoint(self) -> pb.CheckpointInfo:
        request = pb.CheckpointRequest(session_id=self.id)
        return self.client.call("Checkpoint", request, session_id=self.id, idempotent=True)

    def fork(self, name: str = "") -> Session:
        request = pb.ForkSessionRequest(session_id=self.id, name=name)
        return Session(self.client, self.client.call("ForkSession", request, session_id=self.id))

    def export(self, chunk_bytes: int = 0) -> Iterator[bytes]:
        """The session's memory as chunks of bytes (`MemoryClient.import_session` takes them);
        chunk_bytes 0: the server's default (1 MiB, or less under its message limit)."""
        request = pb.ExportSessionRequest(session_id=self.id, chunk_bytes=chunk_bytes)
        _, (_, stub) = self.client.replicas.pick(self.id)
        with _typed_errors():
            for chunk in stub.ExportSession(request, metadata=self.client.connection.metadata):
                yield chunk.data

    def delete(self) -> None:
        request = pb.DeleteSessionRequest(session_id=self.id)
        self.client.call("DeleteSession", request, session_id=self.id)


class _ResumableStream:
    """`Session.append_stream`: one Stream call per replica it takes (see its docstring)."""

    def __init__(self, session: Session, messages: Iterator[pb.Input], window: int) -> None:
        self.session = session
        self.messages = messages
        self.ledger = StreamLedger(session.id, window)
        self.cond = threading.Condition()  # guards the ledger
        self.exhausted = False
        self.pull_lock = threading.Lock()
        self.carried: list[pb.Input] = []  # pulled by an attempt that ended before sending it

    def _failover(self) -> Failover:
        client = self.session.client
        return Failover(
            client.replicas,
            self.session.id,
            resendable=True,
            retry=client.retry,
            budget_s=client.failover_s,
        )

    def run(self) -> Iterator[pb.AppendAck]:
        client = self.session.client
        failover = self._failover()
        resumed = False
        while True:
            address, (_, stub) = client.replicas.pick(self.session.id)
            ready, finished = threading.Event(), threading.Event()
            responses = stub.Stream(
                self._requests(ready, finished, resumed), metadata=client.connection.metadata
            )
            try:
                for response in responses:
                    if response.HasField("opened"):
                        self.session.info = response.opened
                        with self.cond:
                            done = self.ledger.opened(response.opened.position, resumed)
                            self.cond.notify_all()
                        for ack in done:
                            self.session._seen(ack.position)
                            yield ack
                        ready.set()
                        failover = self._failover()
                    elif response.HasField("ack"):
                        with self.cond:
                            self.ledger.acked()
                            self.cond.notify_all()
                        self.session._seen(response.ack.position)
                        yield response.ack
                client.replicas.worked(address)
                return
            except grpc.RpcError as error:
                delay = failover.after(address, error)
                if delay is None:
                    raise from_rpc_error(error) from None
                time.sleep(delay)
                resumed = True
            finally:
                finished.set()
                with self.cond:
                    self.cond.notify_all()
                responses.cancel()

    def _requests(
        self, ready: threading.Event, finished: threading.Event, resumed: bool
    ) -> Iterator[pb.StreamRequest]:
        yield pb.StreamRequest(open=pb.OpenStream(session_id=self.session.id))
        while not ready.wait(0.1):
            if finished.is_set():
                return
        with self.cond:
            again = self.ledger.unacknowledged()
            requests = [self.ledger.request(message, start) for start, message in again]
        yield from requests  # sent before, unacknowledged: on condition
        while True:
            with self.cond:
                while self.ledger.full() and not finished.is_set():
                    self.cond.wait(0.1)
                if finished.is_set() or self.exhausted:
                    return
            # The caller's iterator may block: pull outside the condition (acknowledgements
            # need it), one puller at a time (an attempt that ended may still be pulling).
            with self.pull_lock:
                message = self.carried.pop() if self.carried else next(self.messages, None)
                with self.cond:
                    if message is None:
                        self.exhausted = True
                        return
                    if finished.is_set():
                        self.carried.append(message)  # the next attempt sends it
                        return
                    start = self.ledger.sent(message)
                    request = self.ledger.request(message, start if resumed else None)
            yield request
