"""`append_stream`'s decisions, attempt by attempt: which replica a Stream call goes to,
what to send when it opens (again), what its answers acknowledge, and whether a failed
attempt is followed by another.

The drivers (sync.py: threads; aio.py: tasks) only pull the caller's pieces, keep
at most `window` unacknowledged, and wait; they call these under their own lock.
"""

from __future__ import annotations

from typing import Any

import grpc

from memsvc.client.core.failover import Failover
from memsvc.client.core.handles import SessionCore
from memsvc.client.core.ledger import StreamLedger
from memsvc.client.errors import from_rpc_error
from memsvc.proto.v1 import memsvc_pb2 as pb


class AppendStream:
    """One `append_stream` over as many Stream calls as it takes.

    If the replica fails mid-stream, the stream is opened again on the session's
    next owner; the pieces it holds already (durable, if never acknowledged) are
    acknowledged from its position, and the rest are sent again on the condition
    that the stream is where they start: nothing is lost or doubled.
    """

    def __init__(self, session: SessionCore, window: int) -> None:
        self.session = session
        self.ledger = StreamLedger(session.id, window)
        self.resumed = False  # an attempt failed: appends are sent on condition
        self.address = ""
        self.failover = self._failover()

    def _failover(self) -> Failover:
        return self.session.client.failover(self.session.id, resendable=True)

    def attempt(self) -> tuple[Any, pb.StreamRequest]:
        """The next attempt's stub, and the request that opens it."""
        self.address, (_, stub) = self.session.client.replicas.pick(self.session.id)
        return stub, pb.StreamRequest(open=pb.OpenStream(session_id=self.session.id))

    def received(self, response: pb.StreamResponse) -> list[pb.AppendAck]:
        """What a response acknowledges (an opening: the pieces the replica holds already)."""
        if response.HasField("opened"):
            self.session.info = response.opened
            acks = self.ledger.opened(response.opened.position, self.resumed)
            self.failover = self._failover()  # the failures before this one are behind it
        else:
            self.ledger.acked()
            acks = [response.ack]
        for ack in acks:
            self.session.seen(ack.position)
        return acks

    def resends(self) -> list[pb.StreamRequest]:
        """On an opened stream: the pieces sent before and not acknowledged, on condition."""
        return [self.ledger.request(m, start) for start, m in self.ledger.unacknowledged()]

    def send(self, message: pb.Input) -> pb.StreamRequest:
        """The request for a new piece (on condition once an attempt failed)."""
        start = self.ledger.sent(message)
        return self.ledger.request(message, start if self.resumed else None)

    def full(self) -> bool:
        return self.ledger.full()

    def failed(self, error: grpc.RpcError) -> float:
        """Seconds to wait before the next attempt; raises the typed error if there is none."""
        delay = self.failover.after(self.address, error)
        if delay is None:
            raise from_rpc_error(error) from None
        self.resumed = True
        return delay

    def finished(self) -> None:
        self.session.client.replicas.worked(self.address)
