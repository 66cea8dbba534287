"""What both SDKs' objects hold, and the plans of their calls: a client's replicas and
settings, a session's id, info and last seen position.

`MemoryClient` and `AsyncMemoryClient` subclass `ClientCore`, `Session` and
`AsyncSession` subclass `SessionCore`; each public method there is one line
that carries out a plan made here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from memsvc.client.connection import Connection
from memsvc.client.core import calls
from memsvc.client.core.calls import Call, Unpacker
from memsvc.client.core.failover import Failover
from memsvc.client.core.plans import Deliver, Plan, answered, streamed, unary
from memsvc.client.core.routing import Replicas, parse_addresses
from memsvc.client.messages import Data
from memsvc.client.retry import RetryPolicy
from memsvc.proto.v1 import memsvc_pb2 as pb

C = TypeVar("C")  # a replica's connection: (channel, stub)


class ClientCore(ABC, Generic[C]):
    """A tenant's connection to a memsvc server or cluster.

    address: one host:port, or several (a sequence, or comma-separated) of the
    cluster's replicas; calls on a session go to the replica that owns it
    (core/routing.py). timeout: seconds per unary call (None: no deadline);
    streams have none. failover_s: how long a call keeps moving between
    replicas while the cluster hands a session over (core/failover.py).
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
        self.replicas: Replicas[C] = Replicas(addresses, self._connect)

    @abstractmethod
    def _connect(self, address: str) -> C:
        """The stubs of one replica (each driver opens its own kind of channel)."""

    def failover(self, session_id: str | None, *, resendable: bool) -> Failover:
        """A new call's way through the replicas."""
        return Failover(
            self.replicas,
            session_id,
            resendable=resendable,
            retry=self.retry,
            budget_s=self.failover_s,
        )

    def unary(self, call: Call) -> Plan[Any]:
        return unary(
            call, self.replicas, self.failover(call.session_id, resendable=call.resendable)
        )

    def answer(self, call: Call) -> Plan[None]:
        """``call``'s answer, delivered."""
        return answered(self.unary(call))

    def items(self, call: Call, unpacker: Unpacker[Any]) -> Plan[None]:
        """``call``'s response stream, delivered item by item."""
        failover = self.failover(call.session_id, resendable=call.resendable)
        return streamed(call, self.replicas, failover, unpacker)


CoreT = TypeVar("CoreT", bound=ClientCore)


class SessionCore(Generic[CoreT]):
    """One session of the client's tenant. `info` is as of the last call that returned it;
    `position` is the stream's end as last seen (appends resent after a failure are
    conditional on it, which assumes the handle is the session's only writer)."""

    def __init__(self, client: CoreT, info: pb.Session) -> None:
        self.client = client
        self.info = info
        self.id = info.session_id
        self.position = info.position

    def seen(self, position: int) -> None:
        self.position = max(self.position, position)

    def _refresh(self) -> Plan[None]:
        self.info = yield from self.client.unary(calls.get_session(self.id, routed=True))
        self.seen(self.info.position)
        yield Deliver(self.info)

    def _append(self, data: Data) -> Plan[None]:
        ack = yield from self.client.unary(calls.append(self.id, data, self.position))
        self.seen(ack.position)
        yield Deliver(ack)

    def _query(self, prompt: Data, sampling: dict[str, Any]) -> Plan[None]:
        answer = yield from self.client.unary(calls.query(self.id, prompt, sampling))
        yield Deliver(answer.text)

    def _generate(self, prompt: Data, sampling: dict[str, Any]) -> Plan[None]:
        return self.client.items(calls.generate(self.id, prompt, sampling), calls.GeneratedText())

    def _export(self, chunk_bytes: int) -> Plan[None]:
        return self.client.items(calls.export(self.id, chunk_bytes), calls.ExportedBytes())
