"""What the session layer offers the server: the values it returns and the errors it raises.

`memsvc.sessions.manager.SessionManager` implements these calls; the gRPC
server (`memsvc.server`) maps the errors to status codes:

    SessionNotFoundError      NOT_FOUND            (also: another tenant's session)
    InvalidRequestError       INVALID_ARGUMENT     (nothing changed)
    QuotaExceededError        RESOURCE_EXHAUSTED   (sessions per tenant, budgets)
    SessionBusyError          ABORTED              (the session is quarantined or moving)
    CoordinationUnavailableError  UNAVAILABLE      (a SessionBusyError: Redis is unreachable)
    IncompatibleStateError    FAILED_PRECONDITION  (export of another model / format)
    ManagerClosedError        UNAVAILABLE          (shutting down)
    StateRolledBackError      FAILED_PRECONDITION  (the update went non-finite; rolled back)

Every call is scoped by tenant: a session of another tenant is reported
exactly like a missing one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from memsvc.store.errors import NotFoundError, QuotaExceededError
from memsvc.store.hot_state import Tier

__all__ = [
    "AppendResult",
    "CheckpointInfo",
    "CoordinationUnavailableError",
    "IncompatibleStateError",
    "InvalidRequestError",
    "ManagerClosedError",
    "ManagerStats",
    "QuotaExceededError",
    "ResidentSession",
    "SessionBusyError",
    "SessionEvent",
    "SessionInfo",
    "SessionNotFoundError",
    "SessionObserver",
    "StateRolledBackError",
    "Tier",
]


class SessionNotFoundError(NotFoundError):
    """No such session for this tenant."""


class InvalidRequestError(ValueError):
    """The request is malformed (empty tokens, ids outside the vocabulary, bad params)."""


class SessionBusyError(Exception):
    """The session cannot be served now (quarantined after a failure, or being moved)."""


class PositionConflictError(Exception):
    """An append's expected position is not the session's: nothing was applied."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(message)
        self.position = position


class SessionMovedError(SessionBusyError):
    """Another node serves the session: ``owner`` (its node id) at ``address`` (None: it is
    not announcing one, e.g. it died and its lease has yet to expire). Nothing changed."""

    def __init__(self, message: str, owner: str | None = None, address: str | None = None):
        super().__init__(message)
        self.owner = owner
        self.address = address


class CoordinationUnavailableError(SessionBusyError):
    """The lease store (Redis) cannot be reached, so ownership cannot be proven; nothing changed.

    Retry later. It subclasses SessionBusyError so that a server that knows only
    the older errors still answers ABORTED; UNAVAILABLE says it better.
    """


class IncompatibleStateError(Exception):
    """An imported or restored state does not fit the served model (hash, format, config)."""


class ManagerClosedError(Exception):
    """The manager is shutting down or closed."""


class StateRolledBackError(Exception):
    """The request's update made the session's memory state non-finite: it was refused, and
    the session rolled back to its last finite state at ``position`` (every acknowledged
    token). Sending the same input again may fail again; mitigate or send other input."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(message)
        self.position = position


@dataclass(frozen=True)
class SessionInfo:
    """A session as a client sees it."""

    session_id: str
    tenant_id: str
    name: str
    model_hash: str
    position: int  # tokens the stream has seen (acknowledged)
    durable_position: int  # position of the newest checkpoint
    tier: Tier | None  # where its state is now; None: never materialised (a new session)
    created_at: datetime
    state_bytes: int  # bytes of its state when resident (0 if unknown)


@dataclass(frozen=True)
class AppendResult:
    """What an acknowledged append reports; returned only once the tokens are durable."""

    session_id: str
    position: int  # tokens seen after this append
    appended: int
    writes_applied: int  # memory chunks written so far (all layers)
    writes_skipped: int  # memory chunks the write gate skipped so far
    surprise: float  # the write gate's surprise EMA (mean over layers)
    memory_norm: float  # L2 norm of all memory weights
    wal_offset: int  # end of the session's log after this append
    step_scale: float = 1.0  # the memory's mitigation knobs (`SessionManager.mitigate`)
    forget_boost: float = 0.0


@dataclass(frozen=True)
class CheckpointInfo:
    """One recorded checkpoint. ``sequence`` numbers a session's checkpoints (1, 2, ...); the
    SQL column and the proto field keep their first name, "generation", for compatibility."""

    session_id: str
    sequence: int
    position: int
    wal_offset: int
    path: str
    size_bytes: int
    checksum: str


@dataclass(frozen=True)
class ResidentSession:
    session_id: str
    tenant_id: str
    tier: Tier
    state_bytes: int
    position: int
    last_access: float  # time.time() of the last touch
    pinned: bool  # in use right now: never evicted
    step_scale: float = 1.0  # the memory's mitigation knobs (`SessionManager.mitigate`)
    forget_boost: float = 0.0
    # From the last append on this node; None until one came since the state was loaded.
    memory_norm: float | None = None
    surprise: float | None = None


@dataclass(frozen=True)
class SessionEvent:
    """An audit event of a session (a mitigation applied, a damaged file found, ...)."""

    event_id: int
    tenant_id: str
    session_id: str | None  # None once the session is deleted
    kind: str  # an `EventKind` value
    created_at: datetime
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ManagerStats:
    resident: dict[Tier, int]  # sessions per tier
    bytes_used: dict[Tier, int]
    budgets: dict[Tier, int]
    evictions: int
    restores: int
    appends: int
    tokens_appended: int
    checkpoints: int
    # Added for the ops exporter; all are counters since the manager started.
    corruptions: int = 0  # damaged checkpoint files or logs found (each also an SQL event)
    quarantined: int = 0  # sessions that could not be restored and were set aside
    restore_seconds: float = 0.0  # time spent restoring, summed (restores counts them)
    eviction_seconds: float = 0.0  # time spent evicting, summed (evictions counts them)


class SessionObserver(Protocol):
    """Where the manager reports the latency of its slow steps (`ServiceMetrics` is one).

    Called from the thread doing the work, often holding the session's lock: keep
    each call quick and never call back into the manager. Tiers are `Tier` values.
    """

    def observe_eviction(self, seconds: float, tier: str) -> None:
        """A state moved out to ``tier`` ("host" or "disk")."""

    def observe_restore(self, seconds: float, tier: str) -> None:
        """A state brought back to the device from ``tier`` ("host" or "disk")."""

    def observe_checkpoint(self, seconds: float) -> None:
        """One checkpoint written and recorded."""

    def count_checkpoint_failure(self) -> None:
        """A checkpoint that raised."""

    def observe_wal_sync(self, seconds: float) -> None:
        """One fsync of a session's write-ahead log (acknowledging its appends)."""

    def count_rollback(self) -> None:
        """A session's non-finite update was refused and the session rolled back."""
