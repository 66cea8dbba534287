"""Sessions' hot state and ownership leases: one interface, a Redis and an in-process tracker.

Hot state is what routing and eviction need quickly and what may be lost
without losing data: which node holds a session, in which tier, when it was
last touched, how far it has read, how often it writes. The cluster LRU view
is the sessions ordered by last access.

A lease says which node owns a session. Acquiring it issues a fencing token, a
per-session counter that only grows; every durable write carries the token, and
the metadata store refuses a token older than one it has seen
(``memsvc.store.metadata.record_checkpoint``), so a node that lost its lease
(paused, partitioned, expired) cannot overwrite the new owner's work.

Both trackers behave the same; ``tests/store/test_hot_state.py`` runs one suite
against both. The Redis tracker expects a standalone Redis (its scripts derive
per-node keys, which Redis Cluster would refuse).
"""

from __future__ import annotations

import enum
import heapq
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import redis


class Tier(enum.StrEnum):
    """Where a session's state lives."""

    DEVICE = "device"
    HOST = "host"
    DISK = "disk"


@dataclass(frozen=True)
class HotState:
    """What the cluster knows about a session without reading its state.

    ``last_access`` is wall-clock seconds (``time.time()``); ``write_rate`` is
    the session layer's measure of memory writes (per 1k tokens).
    """

    session_id: str
    node: str
    tier: Tier
    last_access: float
    position: int
    write_rate: float


@dataclass(frozen=True)
class Lease:
    """Ownership of a session by a node, with the fencing token issued for it."""

    session_id: str
    node: str
    fence: int

    @property
    def token(self) -> str:
        """The lease's stored value: unique per acquisition, since fences are."""
        return f"{self.fence}:{self.node}"


class HotStateTracker(Protocol):
    """Per-session hot state and ownership leases."""

    def set(self, state: HotState) -> None:
        """Stores a session's hot state, replacing what was there (the node may change)."""
        ...

    def get(self, session_id: str) -> HotState | None:
        """The session's hot state, or None."""
        ...

    def touch(self, session_id: str, at: float | None = None) -> bool:
        """Sets ``last_access`` (default: now); False if the session has no hot state."""
        ...

    def delete(self, session_id: str) -> bool:
        """Forgets the session's hot state (not its lease or fence); False if there was none."""
        ...

    def least_recently_used(self, n: int, *, node: str | None = None) -> list[HotState]:
        """Up to ``n`` sessions, least recently accessed first, of one node or all."""
        ...

    def on_node(self, node: str) -> list[HotState]:
        """Every session on ``node``, least recently accessed first."""
        ...

    def acquire_lease(self, session_id: str, node: str, ttl_ms: int) -> Lease | None:
        """Makes ``node`` the owner for ``ttl_ms`` with a new fence; None while anyone holds it."""
        ...

    def renew_lease(self, lease: Lease, ttl_ms: int) -> bool:
        """Extends the lease to ``ttl_ms`` from now, only if it is still held; False otherwise."""
        ...

    def release_lease(self, lease: Lease) -> bool:
        """Ends the lease if it is still held (another owner's is untouched); False otherwise."""
        ...

    def lease_holder(self, session_id: str) -> Lease | None:
        """The unexpired lease on the session, or None."""
        ...

    def current_fence(self, session_id: str) -> int:
        """The newest fence issued for the session; 0 before the first lease."""
        ...

    def raise_fence(self, lease: Lease, floor: int, ttl_ms: int) -> Lease | None:
        """Re-issues a held lease with a fence above ``floor`` (and above every fence issued),
        for ``ttl_ms``; None if ``lease`` is not held. For a tracker that lost its counters
        (a Redis restart): fences must keep growing past those already on disk."""
        ...

    def register_node(self, node: str, address: str, ttl_ms: int) -> None:
        """Announces that ``node`` serves at ``address`` for the next ``ttl_ms``."""
        ...

    def node_address(self, node: str) -> str | None:
        """Where ``node`` serves, if it announced itself within its TTL."""
        ...


def _check_ttl(ttl_ms: int) -> None:
    if ttl_ms <= 0:
        raise ValueError(f"ttl_ms must be positive, got {ttl_ms}")


def _lru_key(state: HotState) -> tuple[float, str]:
    # The order of a Redis sorted set: by score, ties by member.
    return (state.last_access, state.session_id)


class InProcessHotStateTracker:
    """The embedded tracker for a single node: dictionaries behind one lock.

    Lease deadlines use ``clock`` (monotonic seconds), so wall-clock jumps do
    not expire or extend leases.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._states: dict[str, HotState] = {}
        self._leases: dict[str, tuple[Lease, float]] = {}
        self._fences: dict[str, int] = {}
        self._nodes: dict[str, tuple[str, float]] = {}

    def set(self, state: HotState) -> None:
        with self._lock:
            self._states[state.session_id] = state

    def get(self, session_id: str) -> HotState | None:
        with self._lock:
            return self._states.get(session_id)

    def touch(self, session_id: str, at: float | None = None) -> bool:
        now = time.time() if at is None else at
        with self._lock:
            state = self._states.get(session_id)
            if state is None:
                return False
            self._states[session_id] = replace(state, last_access=now)
            return True

    def delete(self, session_id: str) -> bool:
        with self._lock:
            return self._states.pop(session_id, None) is not None

    def least_recently_used(self, n: int, *, node: str | None = None) -> list[HotState]:
        with self._lock:
            states = [s for s in self._states.values() if node is None or s.node == node]
        return heapq.nsmallest(n, states, key=_lru_key)

    def on_node(self, node: str) -> list[HotState]:
        with self._lock:
            states = [s for s in self._states.values() if s.node == node]
        return sorted(states, key=_lru_key)

    def _live_lease(self, session_id: str) -> Lease | None:
        held = self._leases.get(session_id)
        if held is None:
            return None
        lease, deadline = held
        if self._clock() >= deadline:
            del self._leases[session_id]
            return None
        return lease

    def acquire_lease(self, session_id: str, node: str, ttl_ms: int) -> Lease | None:
        _check_ttl(ttl_ms)
        with self._lock:
            if self._live_lease(session_id) is not None:
                return None
            fence = self._fences.get(session_id, 0) + 1
            self._fences[session_id] = fence
            lease = Lease(session_id, node, fence)
            self._leases[session_id] = (lease, self._clock() + ttl_ms / 1000)
            return lease

    def renew_lease(self, lease: Lease, ttl_ms: int) -> bool:
        _check_ttl(ttl_ms)
        with self._lock:
            if self._live_lease(lease.session_id) != lease:
                return False
            self._leases[lease.session_id] = (lease, self._clock() + ttl_ms / 1000)
            return True

    def release_lease(self, lease: Lease) -> bool:
        with self._lock:
            if self._live_lease(lease.session_id) != lease:
                return False
            del self._leases[lease.session_id]
            return True

    def lease_holder(self, session_id: str) -> Lease | None:
        with self._lock:
            return self._live_lease(session_id)

    def current_fence(self, session_id: str) -> int:
        with self._lock:
            return self._fences.get(session_id, 0)

    def raise_fence(self, lease: Lease, floor: int, ttl_ms: int) -> Lease | None:
        _check_ttl(ttl_ms)
        with self._lock:
            if self._live_lease(lease.session_id) != lease:
                return None
            fence = max(self._fences.get(lease.session_id, 0), floor) + 1
            self._fences[lease.session_id] = fence
            raised = Lease(lease.session_id, lease.node, fence)
            self._leases[lease.session_id] = (raised, self._clock() + ttl_ms / 1000)
            return raised

    def register_node(self, node: str, address: str, ttl_ms: int) -> None:
        _check_ttl(ttl_ms)
        with self._lock:
            self._nodes[node] = (address, self._clock() + ttl_ms / 1000)

    def node_address(self, node: str) -> str | None:
        with self._lock:
            entry = self._nodes.get(node)
        if entry is None or self._clock() >= entry[1]:
            return None
        return entry[0]


# Scripts make each read-modify-write atomic. Per-node LRU keys are derived from
# ARGV (the node is only known inside the script): standalone Redis only.
_SET = """
local old = redis.call('HGET', KEYS[1], 'node')
if old and old ~= ARGV[2] then redis.call('ZREM', ARGV[7] .. old, ARGV[1]) end
redis.call('HSET', KEYS[1], 'node', ARGV[2], 'tier', ARGV[3], 'last_access', ARGV[4],
           'position', ARGV[5], 'write_rate', ARGV[6])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
redis.call('ZADD', ARGV[7] .. ARGV[2], ARGV[4], ARGV[1])
return 1
"""
_TOUCH = """
local node = redis.call('HGET', KEYS[1], 'node')
if not node then return 0 end
redis.call('HSET', KEYS[1], 'last_access', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', ARGV[3] .. node, ARGV[2], ARGV[1])
return 1
"""
_DELETE = """
local node = redis.call('HGET', KEYS[1], 'node')
if not node then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', ARGV[2] .. node, ARGV[1])
return 1
"""
# INCR only once the lease is known to be free, so no fence is wasted.
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local fence = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], fence .. ':' .. ARGV[1], 'NX', 'PX', ARGV[2])
return fence
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RAISE_FENCE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return false end
local fence = math.max(tonumber(redis.call('GET', KEYS[2]) or '0'), tonumber(ARGV[2])) + 1
redis.call('SET', KEYS[2], fence)
redis.call('SET', KEYS[1], fence .. ':' .. ARGV[3], 'PX', ARGV[4])
return fence
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisHotStateTracker:
    """The shared tracker: hot state, LRU views and leases in Redis under ``namespace``.

    Keys: ``<ns>:state:<session>`` (hash), ``<ns>:lru`` and ``<ns>:lru:<node>``
    (sorted sets scored by last access), ``<ns>:lease:<session>`` (string with
    a PX expiry), ``<ns>:fence:<session>`` (counter, never expires, so fences
    only grow while Redis keeps its data; ``raise_fence`` repairs a counter
    lost with it) and ``<ns>:node:<node>`` (its address, with a PX expiry).
    ``client`` must decode responses (``decode_responses=True``).
    """

    def __init__(self, client: redis.Redis, namespace: str = "memsvc") -> None:
        if not client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("the Redis client must be created with decode_responses=True")
        self._redis = client
        self._ns = namespace
        self._set = client.register_script(_SET)
        self._touch = client.register_script(_TOUCH)
        self._delete = client.register_script(_DELETE)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._raise_fence = client.register_script(_RAISE_FENCE)

    def _key(self, *parts: str) -> str:
        return ":".join((self._ns, *parts))

    @property
    def _node_lru_prefix(self) -> str:
        return self._key("lru", "")

    def set(self, state: HotState) -> None:
        self._set(
            keys=[
                self._key("state", state.session_id),
                self._key("lru"),
                self._key("lru", state.node),
            ],
            args=[
                state.session_id,
                state.node,
                state.tier.value,
                repr(float(state.last_access)),
                int(state.position),
                repr(float(state.write_rate)),
                self._node_lru_prefix,
            ],
        )

    def get(self, session_id: str) -> HotState | None:
        return self._decode(session_id, self._redis.hgetall(self._key("state", session_id)))

    def touch(self, session_id: str, at: float | None = None) -> bool:
        now = time.time() if at is None else at
        return bool(
            self._touch(
                keys=[self._key("state", session_id), self._key("lru")],
                args=[session_id, repr(float(now)), self._node_lru_prefix],
            )
        )

    def delete(self, session_id: str) -> bool:
        return bool(
            self._delete(
                keys=[self._key("state", session_id), self._key("lru")],
                args=[session_id, self._node_lru_prefix],
            )
        )

    def least_recently_used(self, n: int, *, node: str | None = None) -> list[HotState]:
        if n <= 0:
            return []
        key = self._key("lru") if node is None else self._key("lru", node)
        return self._states(self._redis.zrange(key, 0, n - 1))

    def on_node(self, node: str) -> list[HotState]:
        return self._states(self._redis.zrange(self._key("lru", node), 0, -1))

    def _states(self, session_ids: list[str]) -> list[HotState]:
        pipe = self._redis.pipeline(transaction=False)
        for session_id in session_ids:
            pipe.hgetall(self._key("state", session_id))
        decoded = (self._decode(s, h) for s, h in zip(session_ids, pipe.execute(), strict=True))
        # A session deleted between the two reads is skipped.
        return [state for state in decoded if state is not None]

    @staticmethod
    def _decode(session_id: str, fields: dict[str, str]) -> HotState | None:
        if not fields:
            return None
        return HotState(
            session_id=session_id,
            node=fields["node"],
            tier=Tier(fields["tier"]),
            last_access=float(fields["last_access"]),
            position=int(fields["position"]),
            write_rate=float(fields["write_rate"]),
        )

    def acquire_lease(self, session_id: str, node: str, ttl_ms: int) -> Lease | None:
        _check_ttl(ttl_ms)
        fence = self._acquire(
            keys=[self._key("lease", session_id), self._key("fence", session_id)],
            args=[node, ttl_ms],
        )
        return None if fence is None else Lease(session_id, node, int(fence))

    def renew_lease(self, lease: Lease, ttl_ms: int) -> bool:
        _check_ttl(ttl_ms)
        return bool(
            self._renew(keys=[self._key("lease", lease.session_id)], args=[lease.token, ttl_ms])
        )

    def release_lease(self, lease: Lease) -> bool:
        return bool(self._release(keys=[self._key("lease", lease.session_id)], args=[lease.token]))

    def lease_holder(self, session_id: str) -> Lease | None:
        token = self._redis.get(self._key("lease", session_id))
        if token is None:
            return None
        fence, _, node = token.partition(":")
        return Lease(session_id, node, int(fence))

    def current_fence(self, session_id: str) -> int:
        fence = self._redis.get(self._key("fence", session_id))
        return 0 if fence is None else int(fence)

    def raise_fence(self, lease: Lease, floor: int, ttl_ms: int) -> Lease | None:
        _check_ttl(ttl_ms)
        fence = self._raise_fence(
            keys=[self._key("lease", lease.session_id), self._key("fence", lease.session_id)],
            args=[lease.token, int(floor), lease.node, ttl_ms],
        )
        return None if fence is None else Lease(lease.session_id, lease.node, int(fence))

    def register_node(self, node: str, address: str, ttl_ms: int) -> None:
        _check_ttl(ttl_ms)
        self._redis.set(self._key("node", node), address, px=ttl_ms)

    def node_address(self, node: str) -> str | None:
        return self._redis.get(self._key("node", node))
