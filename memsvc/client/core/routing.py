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

from memsvc.wire import OWNER_METADATA, POSITION_METADATA

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
    """The owner's address a refusing replica named, if any; "" when it refused the call
    (it does not own the session) without knowing where the owner serves."""
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
