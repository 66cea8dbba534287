"""Which replica to call: the owner a replica named for a session, else any live one.

A memsvc cluster serves each session on one replica (the holder of its
lease). Any replica answers a call; one that does not own the session
refuses it with UNAVAILABLE and the owner's address in the trailing metadata
``memsvc-owner`` (nothing was done), and the SDK sends the call there. A
replica that cannot be reached (dead, draining) is skipped for a while; when
the owner died, the other replicas take the session over once its lease
expires, so calls keep moving on with backoff until ``failover_s`` passes.

The SDK learns replicas' addresses from the list it is given and from
redirects; it never needs a load balancer, though one in front works too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import grpc

from memsvc.client.errors import FailedPreconditionError
from memsvc.client.retry import RetryPolicy
from memsvc.proto.v1 import memsvc_pb2 as pb

OWNER_METADATA = "memsvc-owner"
POSITION_METADATA = "memsvc-position"
# How long an unreachable replica is skipped before it is tried again.
DOWN_FOR_S = 2.0

T = TypeVar("T")


def _trailing(error: grpc.RpcError, key: str) -> str | None:
    trailing = getattr(error, "trailing_metadata", None)
    for name, value in (trailing() if callable(trailing) else None) or ():
        if name == key:
            return value if isinstance(value, str) else value.decode()
    return None


def owner_hint(error: grpc.RpcError) -> str | None:
    """The owner's address a refusing replica named, if any."""
    if error.code() != grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
        return None
    return _trailing(error, OWNER_METADATA)


def position_hint(error: grpc.RpcError) -> int | None:
    """The session's position an append refused for its expected position carried."""
    if error.code() != grpc.StatusCode.FAILED_PRECONDITION:  # type: ignore[attr-defined]
        return None
    value = _trailing(error, POSITION_METADATA)
    return None if value is None else int(value)


def parse_addresses(addresses: str | Sequence[str]) -> list[str]:
    """A list of host:port from a comma-separated string or a sequence."""
    items = addresses.split(",") if isinstance(addresses, str) else list(addresses)
    parsed = [item.strip() for item in items if item.strip()]
    if not parsed:
        raise ValueError("no server address given")
    return parsed


class Replicas(Generic[T]):
    """Connections (``connect(address)``, made on first use) and the owners learnt so far.

    Thread-safe. ``pick`` prefers the session's known owner, then a replica
    not marked down, starting from the one that last worked.
    """

    def __init__(
        self,
        addresses: str | Sequence[str],
        connect: Callable[[str], T],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._addresses = parse_addresses(addresses)
        self._connect = connect
        self._clock = clock
        self._lock = threading.Lock()
        self._connections: dict[str, T] = {}
        self._owners: dict[str, str] = {}
        self._down_until: dict[str, float] = {}
        self._preferred = 0

    @property
    def addresses(self) -> list[str]:
        with self._lock:
            return list(self._addresses)

    def pick(self, session_id: str | None = None) -> tuple[str, T]:
        """The address to call for ``session_id`` (None: any replica) and its connection."""
        with self._lock:
            address = self._owners.get(session_id) if session_id is not None else None
            if address is None:
                now = self._clock()
                count = len(self._addresses)
                order = [self._addresses[(self._preferred + i) % count] for i in range(count)]
                address = next((a for a in order if self._down_until.get(a, 0) <= now), order[0])
            if address not in self._connections:
                self._connections[address] = self._connect(address)
            return address, self._connections[address]

    def moved(self, session_id: str | None, address: str) -> None:
        """A replica named ``address`` as the session's owner."""
        with self._lock:
            if address not in self._addresses:
                self._addresses.append(address)
            self._down_until.pop(address, None)
            if session_id is not None:
                self._owners[session_id] = address

    def worked(self, address: str) -> None:
        """A call to ``address`` was answered: prefer it for calls without a known owner."""
        with self._lock:
            self._down_until.pop(address, None)
            if address in self._addresses:
                self._preferred = self._addresses.index(address)

    def failed(self, address: str) -> None:
        """``address`` could not serve: skip it for a while, forget it as anyone's owner."""
        with self._lock:
            self._down_until[address] = self._clock() + DOWN_FOR_S
            for session_id in [s for s, a in self._owners.items() if a == address]:
                del self._owners[session_id]
            if self._addresses[self._preferred % len(self._addresses)] == address:
                self._preferred = (self._preferred + 1) % len(self._addresses)

    def connections(self) -> list[T]:
        with self._lock:
            return list(self._connections.values())


# Redirects followed by one call before it backs off like a failure.
MAX_HOPS = 4


def not_sent(error: grpc.RpcError) -> bool:
    """Whether the call surely never reached a server (no connection could be made)."""
    details = (error.details() or "").lower()  # type: ignore[attr-defined]
    return error.code() == grpc.StatusCode.UNAVAILABLE and (  # type: ignore[attr-defined]
        "failed to connect" in details or "connection refused" in details
    )


class Failover:
    """One call's way through the replicas: after each failure, wait how long, or give up.

    ``resendable``: the call may be repeated when its outcome is unknown (it is
    idempotent, or the caller has a conditional form of it); a call that
    never reached a server (no connection) is always safe to repeat.
    Redirects to the owner are followed at once (``MAX_HOPS`` in a row);
    other failures wait per ``retry`` (RetryPolicy: its attempts and backoff)
    and end when its attempts or ``budget_s`` run out.
    """

    def __init__(
        self,
        replicas: Replicas,
        session_id: str | None,
        *,
        resendable: bool,
        retry: RetryPolicy,
        budget_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.replicas = replicas
        self.session_id = session_id
        self.resendable = resendable
        self._delays = retry.delays()
        self._clock = clock
        self._deadline = clock() + budget_s
        self._hops = 0
        self.resent = False  # a try came after one whose outcome is unknown

    def after(self, address: str, error: grpc.RpcError) -> float | None:
        """Seconds to wait before trying again (0: at once), or None: raise ``error``."""
        if error.code() != grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
            return None
        owner = owner_hint(error)
        if owner is not None and owner != address and self._hops < MAX_HOPS:
            self._hops += 1
            self.replicas.moved(self.session_id, owner)
            return 0.0
        self.replicas.failed(address)
        if owner is None and not not_sent(error):
            if not self.resendable:
                return None
            self.resent = True
        delay = next(self._delays, None)
        if delay is None or self._clock() + delay > self._deadline:
            return None
        self._hops = 0
        return delay


def token_ids(message: pb.Input) -> list[int]:
    """The ids the server appends for ``message`` (text: its bytes)."""
    return list(message.token_ids) if message.token_ids else list(message.text)


def conditional_append(
    session_id: str, message: pb.Input, start: int
) -> tuple[pb.AppendRequest, pb.AppendRequest, Callable[[int], pb.AppendAck]]:
    """An append, its form to resend when its outcome is unknown (applied only at ``start``),
    and what a conflict on the resend means: applied already if the stream is exactly
    past it (an acknowledgement), else FailedPreconditionError (another writer)."""
    count = len(token_ids(message))
    conditional = pb.Input()
    conditional.CopyFrom(message)
    conditional.expected_position = start

    def applied_before(position: int) -> pb.AppendAck:
        if position != start + count:
            raise FailedPreconditionError(
                f"session {session_id} is at position {position}: the append resent after "
                f"a failure expected {start} (another writer?)"
            )
        return pb.AppendAck(position=position, appended=count)

    return (
        pb.AppendRequest(session_id=session_id, input=message),
        pb.AppendRequest(session_id=session_id, input=conditional),
        applied_before,
    )
