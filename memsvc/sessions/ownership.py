"""Who owns a session (leases with fencing tokens) and what the cluster sees of it (hot state).

A node must hold a session's lease to touch its log or checkpoints: two
writers would fork the log. The lease's fence goes with every checkpoint row,
so a node that lost its lease cannot record over the new owner's progress.

When the tracker (Redis) cannot be reached, the behaviour is:

- taking a lease (the first touch of a session on this node) fails with
  CoordinationUnavailableError and nothing changes;
- a lease already held keeps working: it is renewed once a third of its TTL
  has passed, and a failed renewal is tolerated until two thirds have passed
  (the lease is ours until it expires); after that, calls on the session fail
  with CoordinationUnavailableError until the tracker answers again;
- hot state (tier, position, last access) is published best effort: a
  failure is logged and skipped, since hot state may be lost without losing data.

Thread-safe: the manager calls it under each session's lock, and its
maintenance thread beside them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from redis.exceptions import RedisError

from memsvc.sessions.api import (
    CoordinationUnavailableError,
    SessionMovedError,
    Tier,
)
from memsvc.store.hot_state import HotState, HotStateTracker, Lease

log = structlog.get_logger(__name__)

# How long a session's lease lasts unrenewed: how long a dead node's sessions wait before
# another node may take them. The manager's and the CLI's default.
DEFAULT_LEASE_TTL_MS = 10_000

# A session's hot state is refreshed at most this often by touches (tier changes go at once).
TOUCH_INTERVAL_S = 1.0


class LeaseTakenError(SessionMovedError):
    """Another node took the session's lease after this node's lapsed: drop this node's copy."""


class LeaseLostError(Exception):
    """The lease lapsed and another owner held it in between: the node's copy may be stale.

    The lease has been taken again (``Ownership.lease`` is the new one); drop
    the cached state and restore it from disk.
    """


@dataclass
class _Held:
    lease: Lease
    renewed_at: float  # monotonic seconds


class Ownership:
    """Leases and hot state of the sessions this node serves, over a HotStateTracker."""

    def __init__(
        self,
        tracker: HotStateTracker,
        node: str,
        ttl_ms: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tracker = tracker
        self.node = node
        self.ttl_ms = ttl_ms
        self._clock = clock
        self._lock = threading.Lock()
        self._held: dict[str, _Held] = {}
        self._touched: dict[str, float] = {}

    def acquire(self, session_id: str) -> Lease:
        """Takes the session's lease; SessionBusyError while another node holds it."""
        try:
            lease = self.tracker.acquire_lease(session_id, self.node, self.ttl_ms)
            holder = None if lease is not None else self.tracker.lease_holder(session_id)
        except RedisError as error:
            raise CoordinationUnavailableError(
                f"session {session_id}: the lease store is unreachable ({error})"
            ) from error
        if lease is None:
            raise self._moved(session_id, holder)
        with self._lock:
            self._held[session_id] = _Held(lease, self._clock())
        return lease

    def moved(self, session_id: str) -> SessionMovedError:
        """The error that sends a client to the session's current owner (looked up now)."""
        try:
            holder = self.tracker.lease_holder(session_id)
        except RedisError:
            holder = None
        return self._moved(session_id, holder)

    def _moved(self, session_id: str, holder: Lease | None) -> SessionMovedError:
        if holder is None:  # released in between: the next try takes it
            return SessionMovedError(f"session {session_id} is changing owner; try again")
        try:
            address = self.tracker.node_address(holder.node)
        except RedisError:
            address = None
        where = f", serving at {address}" if address else " (no address announced)"
        return SessionMovedError(
            f"session {session_id} is owned by {holder.node}{where}", holder.node, address
        )

    def raise_fence(self, session_id: str, floor: int) -> Lease:
        """Re-issues the held lease with a fence above ``floor`` (fences on disk outlived the
        tracker's counter); SessionMovedError if the lease is not held any more."""
        with self._lock:
            held = self._held.get(session_id)
        try:
            raised = (
                None if held is None else self.tracker.raise_fence(held.lease, floor, self.ttl_ms)
            )
        except RedisError as error:
            raise CoordinationUnavailableError(
                f"session {session_id}: the lease store is unreachable ({error})"
            ) from error
        if raised is None:
            with self._lock:
                self._held.pop(session_id, None)
            raise self.moved(session_id)
        log.warning("fence_raised", session=session_id, fence=raised.fence, floor=floor)
        with self._lock:
            self._held[session_id] = _Held(raised, self._clock())
        return raised

    def announce(self, address: str) -> None:
        """Tells the cluster where this node serves, for a lease TTL (best effort)."""
        try:
            self.tracker.register_node(self.node, address, self.ttl_ms)
        except RedisError as error:
            log.warning("node_announce_failed", node=self.node, error=str(error))

    def lease(self, session_id: str) -> Lease | None:
        """The lease this node holds on the session, if any."""
        with self._lock:
            held = self._held.get(session_id)
        return None if held is None else held.lease

    def keep(self, session_id: str) -> Lease:
        """The held lease, renewed if a third of its TTL has passed (module docstring).

        Raises LeaseTakenError if another node holds the session now (this
        node's copy must be dropped), LeaseLostError if the lease lapsed and was
        re-taken after someone else held it, CoordinationUnavailableError if
        renewal is overdue and the tracker does not answer.
        """
        with self._lock:
            held = self._held.get(session_id)
        if held is None:
            raise LeaseLostError(f"session {session_id}: no lease held")
        age_ms = (self._clock() - held.renewed_at) * 1000
        if age_ms < self.ttl_ms / 3:
            return held.lease
        try:
            if self.tracker.renew_lease(held.lease, self.ttl_ms):
                held.renewed_at = self._clock()
                return held.lease
            fresh = self.tracker.acquire_lease(session_id, self.node, self.ttl_ms)
        except RedisError as error:
            if age_ms < 2 * self.ttl_ms / 3:
                log.warning("lease_renewal_failed", session=session_id, error=str(error))
                return held.lease
            raise CoordinationUnavailableError(
                f"session {session_id}: the lease store is unreachable and the lease is "
                f"about to expire ({error})"
            ) from error
        with self._lock:
            if fresh is None:
                del self._held[session_id]
            else:
                self._held[session_id] = _Held(fresh, self._clock())
        if fresh is None:
            raise LeaseTakenError(f"session {session_id}: the lease expired and is held elsewhere")
        if fresh.fence != held.lease.fence + 1:
            log.warning(
                "lease_lost", session=session_id, fence=held.lease.fence, new_fence=fresh.fence
            )
            raise LeaseLostError(f"session {session_id}: another owner held it in between")
        return fresh

    def release(self, session_id: str) -> None:
        """Gives the lease back (best effort: an unreachable tracker lets it expire)."""
        with self._lock:
            held = self._held.pop(session_id, None)
            self._touched.pop(session_id, None)
        if held is None:
            return
        try:
            self.tracker.release_lease(held.lease)
        except RedisError as error:
            log.warning("lease_release_failed", session=session_id, error=str(error))

    def due_for_renewal(self) -> list[str]:
        """Sessions whose lease has passed a third of its TTL."""
        now = self._clock()
        with self._lock:
            return [
                session_id
                for session_id, held in self._held.items()
                if (now - held.renewed_at) * 1000 >= self.ttl_ms / 3
            ]

    def publish(self, session_id: str, tier: Tier, position: int, write_rate: float) -> None:
        """Stores the session's hot state on this node now (best effort)."""
        with self._lock:
            self._touched[session_id] = self._clock()
        state = HotState(session_id, self.node, tier, time.time(), position, write_rate)
        self._best_effort("hot_state_set_failed", session_id, self.tracker.set, state)

    def refresh(self, session_id: str, tier: Tier, position: int, write_rate: float) -> None:
        """``publish``, at most once per TOUCH_INTERVAL_S per session (for every access)."""
        with self._lock:
            last = self._touched.get(session_id, -TOUCH_INTERVAL_S)
            if self._clock() - last < TOUCH_INTERVAL_S:
                return
        self.publish(session_id, tier, position, write_rate)

    def forget(self, session_id: str) -> None:
        """Deletes the session's hot state (best effort)."""
        self._best_effort("hot_state_delete_failed", session_id, self.tracker.delete, session_id)

    @staticmethod
    def _best_effort(event: str, session_id: str, call: Callable[..., object], *args) -> None:
        try:
            call(*args)
        except RedisError as error:
            log.warning(event, session=session_id, error=str(error))
