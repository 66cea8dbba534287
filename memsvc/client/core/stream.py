"""`append_stream` as a plan: its Stream calls one attempt after another, what to send
when a call opens (again), what the answers acknowledge, and what a failure means.

The drivers (sync.py: threads; aio.py: tasks) only pull the caller's pieces and
wait: they make each attempt's request iterator, which sends what this module
decides, and wait on `wake` between its requests.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc

from memsvc.client.core.failover import Failover
from memsvc.client.core.handles import SessionCore
from memsvc.client.core.ledger import StreamLedger
from memsvc.client.core.plans import END, Deliver, Pause, Plan, Read, Start
from memsvc.client.errors import from_rpc_error
from memsvc.proto.v1 import memsvc_pb2 as pb


class Attempt:
    """One Stream call: its first request, whether it opened, whether it ended."""

    def __init__(self, session_id: str) -> None:
        self.first = pb.StreamRequest(open=pb.OpenStream(session_id=session_id))
        self.opened = False
        self.ended = False


class AppendStream:
    """One `append_stream` over as many Stream calls as it takes.

    If the replica fails mid-stream, the stream is opened again on the session's
    next owner; the pieces it holds already (durable, if never acknowledged) are
    acknowledged from its position, and the rest are sent again on the condition
    that the stream is where they start: nothing is lost or doubled. Thread-safe:
    the request side runs beside the plan.
    """

    def __init__(self, session: SessionCore, window: int) -> None:
        self.session = session
        self.ledger = StreamLedger(session.id, window)
        self.resumed = False  # an attempt failed: appends are sent on condition
        self.exhausted = False  # the caller's pieces are all sent
        self.carried: list[pb.Input] = []  # pulled by an attempt that ended before sending it
        self._lock = threading.Lock()

    def _failover(self) -> Failover:
        return self.session.client.failover(self.session.id, resendable=True)

    def plan(self, requests: Callable[[Attempt], Any], wake: Callable[[], None]) -> Plan[None]:
        """The attempts; ``requests(attempt)`` is the driver's request iterator for one,
        and ``wake()`` is called whenever it may send more, or should end."""
        failover = self._failover()
        while True:
            address, (_, stub) = self.session.client.replicas.pick(self.session.id)
            attempt = Attempt(self.session.id)
            failure: grpc.RpcError | None = None
            try:
                responses = yield Start(stub, "Stream", requests(attempt), streaming=True)
                while (response := (yield Read(responses))) is not END:
                    if response.HasField("opened"):
                        failover = self._failover()  # the failures before it are behind
                    acks = self._received(response)
                    attempt.opened = True
                    wake()
                    for ack in acks:
                        yield Deliver(ack)
            except grpc.RpcError as error:
                failure = error
            finally:
                attempt.ended = True  # before any pause: its request side stops at once
                wake()
            if failure is None:
                self.session.client.replicas.worked(address)
                return
            delay = failover.after(address, failure)
            if delay is None:
                raise from_rpc_error(failure) from None
            self.resumed = True
            if delay:  # 0: a redirect, followed at once
                yield Pause(delay)

    def _received(self, response: pb.StreamResponse) -> list[pb.AppendAck]:
        """What a response acknowledges (an opening: the pieces the replica holds already)."""
        with self._lock:
            if response.HasField("opened"):
                self.session.info = response.opened
                acks = self.ledger.opened(response.opened.position, self.resumed)
            else:
                self.ledger.acked()
                acks = [response.ack]
        for ack in acks:
            self.session.seen(ack.position)
        return acks

    def resends(self, attempt: Attempt) -> list[pb.StreamRequest]:
        """Once ``attempt`` opened: the pieces sent before and not acknowledged, on condition."""
        with self._lock:
            if attempt.ended:
                return []
            return [self.ledger.request(m, start) for start, m in self.ledger.unacknowledged()]

    def may_send(self, attempt: Attempt) -> bool:
        """Whether the request side need wait no longer: the window has room, or it is to end."""
        return attempt.ended or self.exhausted or not self.ledger.full()

    def wants_piece(self, attempt: Attempt) -> bool:
        """Whether the request side should pull a piece (else it ends its requests)."""
        return not (attempt.ended or self.exhausted)

    def carried_piece(self) -> pb.Input | None:
        """A piece an ended attempt pulled and did not send, to send before pulling more."""
        with self._lock:
            return self.carried.pop() if self.carried else None

    def take(self, attempt: Attempt, message: pb.Input | None) -> pb.StreamRequest | None:
        """The request for a pulled piece (None: the pieces are all sent, or ``attempt``
        ended and the next one sends it)."""
        with self._lock:
            if message is None:
                self.exhausted = True
                return None
            if attempt.ended:
                self.carried.append(message)
                return None
            start = self.ledger.sent(message)
            return self.ledger.request(message, start if self.resumed else None)
