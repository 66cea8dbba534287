"""`LiveSession`: one session as this node knows it, owning its state, log, claim and checkpoints.

A live session is created when a call first names the session (from its SQL
row) and forgotten when it is deleted or quarantined. While its state is in a
memory tier it also holds its open write-ahead log and this node's claim on
its files (``fencing.py``); ``unload`` lets go of all three at once. Every
method but the ``check_*`` ones runs with the session's lock held (the
manager's ``Books.holding``), so one call at a time changes it.

The append path: ``append`` writes the tokens' log record, fsyncs it, checks
the claim, and only then makes the new state the session's (and checkpoints
when a mark is crossed). The batched path (``batch.py``) writes the records,
makes the new states the sessions', and syncs many logs at once, either
before it returns or, for the server, on a thread of its own while the next
appends are stepped (``Logged``, ``make_durable``): nothing is acknowledged
before its record is durable and the claim is checked, and a failed sync
unloads the session, dropping every state built on the record it lost.

A state that went non-finite is never applied: ``roll_back`` unloads the
session, so its next use restores the last finite state: the one in memory,
which the engine never changed in place, unless that state itself is not
finite (damaged in memory), in which case the session is unloaded and its next
use restores it from disk (checkpoint plus log: everything acknowledged).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime

import structlog
from torch import Tensor

from memsvc.engine import AppendStats, StreamingEngine
from memsvc.memory import NonFiniteStateError
from memsvc.model import ModelState
from memsvc.sessions.api import (
    AppendResult,
    CheckpointInfo,
    PositionConflictError,
    SessionBusyError,
    SessionNotFoundError,
    SessionObserver,
    StateRolledBackError,
)
from memsvc.sessions.config import ManagerConfig
from memsvc.sessions.durability import SessionRepository
from memsvc.sessions.fencing import Claim, FencedOutError
from memsvc.sessions.ownership import LeaseLostError, LeaseTakenError, Ownership
from memsvc.sessions.residency import Books
from memsvc.sessions.restore import Restored
from memsvc.sessions.state_check import is_finite
from memsvc.sessions.wal import CorruptWalHeaderError, WalError, WriteAheadLog, read_wal
from memsvc.store.errors import StaleFenceError
from memsvc.store.models import EventKind

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class SessionEnv:
    """What every live session of one manager shares: where it logs, leases and reports."""

    config: ManagerConfig
    engine: StreamingEngine
    repository: SessionRepository
    ownership: Ownership
    observer: SessionObserver
    books: Books
    # Tells this process's claims from those of an earlier run of the same node (fencing.py).
    incarnation: str

    def claim(self, session_id: str) -> Claim:
        """This node's claim on a session's files under the lease it holds."""
        lease = self.ownership.lease(session_id)
        assert lease is not None
        return Claim(lease.fence, self.config.node_id, self.incarnation)


@dataclass(frozen=True)
class Logged:
    """A log record written, not yet known durable: what its acknowledgement waits for."""

    wal: WriteAheadLog
    claim: Claim | None  # the claim it was written under, checked once it is durable
    end: int  # the log's offset just past it


@dataclass(eq=False)
class LiveSession:
    """One session on this node. Fields below ``lock`` change only under it, by its methods."""

    id: str
    tenant_id: str
    name: str
    model_hash: str
    created_at: datetime
    env: SessionEnv = field(repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    state: ModelState | None = None  # in a memory tier (the books say which)
    wal: WriteAheadLog | None = None  # open while the state is in memory
    claim: Claim | None = None  # this node's claim on the files while it holds the state
    position: int | None = None  # acknowledged tokens; None until read from disk
    durable_position: int = 0  # position of the newest usable checkpoint
    sequence: int = 0  # number of the newest recorded checkpoint
    last_checkpoint: CheckpointInfo | None = None
    checkpoint_at: float = 0.0  # monotonic time of the last checkpoint (or restore)
    write_rate: float = 0.0  # memory writes per 1k tokens, for the hot state
    step_scale: float = 1.0  # the state's mitigation knobs, as last read or set
    forget_boost: float = 0.0
    memory_norm: float | None = None  # after the last append since the state was loaded
    surprise: float | None = None
    on_disk: bool = False  # it has a log or checkpoints (False: never materialised)
    gone: str | None = None  # "deleted" or "quarantined" while a caller waited for it

    # ---- checks (no lock needed) ------------------------------------------------------

    def check_present(self) -> None:
        if self.gone == "quarantined":
            raise SessionBusyError(f"session {self.id} is quarantined")
        if self.gone is not None:
            raise SessionNotFoundError(f"session {self.id} not found")

    def check_position(self, expected: int | None) -> None:
        """PositionConflictError unless the stream is at ``expected`` (None: anywhere)."""
        if expected is not None and self.position != expected:
            assert self.position is not None
            raise PositionConflictError(
                f"session {self.id} is at position {self.position}, the append expected {expected}",
                self.position,
            )

    def mark_gone(self, why: str) -> None:
        """The session was deleted or quarantined: callers waiting for it hear so."""
        self.gone = why

    # ---- loading and unloading ----------------------------------------------------------

    def own(self) -> None:
        """Makes sure this node holds a current lease; drops a copy that may be stale."""
        ownership = self.env.ownership
        if ownership.lease(self.id) is None:
            ownership.acquire(self.id)
            return
        try:
            ownership.keep(self.id)
        except LeaseLostError:
            self.unload(release=False)  # the fresh lease stays: restore from disk
        except LeaseTakenError:
            self.unload()
            raise ownership.moved(self.id) from None

    def load(self, restored: Restored) -> None:
        """Takes the state, log and claim a restore rebuilt."""
        self.state, self.wal, self.claim = restored.state, restored.wal, restored.claim
        self.step_scale, self.forget_boost = knobs(restored.state)
        self.memory_norm = self.surprise = None
        self.position = restored.wal.next_position
        self.durable_position = restored.checkpoint_position
        self.sequence = restored.sequence
        self.last_checkpoint = None
        self.checkpoint_at = time.monotonic()
        self.on_disk = True

    def move(self, state: ModelState) -> None:
        """The same state in another memory tier (the books are the caller's to update)."""
        self.state = state

    def unload(self, *, release: bool = True) -> None:
        """Forgets the in-memory state and closes the log, synced first: records whose
        acknowledgement is still on its way become durable (``Logged``), and the
        next restore replays them. A log that cannot sync is closed as it is: the
        acknowledgements waiting on it hear its error."""
        if self.wal is not None:
            try:
                self.wal.flush_and_sync()
            except (OSError, WalError) as error:
                log.warning("wal_unsynced_at_unload", session=self.id, error=repr(error))
            self.wal.close()
        self.state, self.wal, self.claim = None, None, None
        self.position = None  # another node may move it on: read it from disk again
        self.env.books.remove(self.id)
        if release:
            self.env.ownership.release(self.id)

    def position_on_disk(self) -> int:
        """The acknowledged position of a session not in memory: the end of its log."""
        if self.position is None:
            position = self.durable_position
            path = self.env.repository.wal_path(self.id)
            if path.exists():
                reader = read_wal(path)
                try:
                    for _ in reader:
                        pass
                    position = max(position, reader.next_position)
                except (CorruptWalHeaderError, OSError) as error:  # the restore reports it
                    log.warning("wal_unreadable", session=self.id, error=repr(error))
            self.position = position
        return self.position

    def publish(self) -> None:
        """The session's hot state after an access (throttled, best effort)."""
        tier = self.env.books.tier(self.id)
        if tier is not None:
            self.env.ownership.refresh(self.id, tier, self.position or 0, self.write_rate)

    # ---- the append path ----------------------------------------------------------------

    def append(self, ids: Tensor, state: ModelState) -> int:
        """Logs the tokens durably, then makes ``state`` the session's; returns the log's end."""
        logged = self.log(ids)
        self.sync(logged)
        self.apply(ids, state)
        return logged.end

    def log(self, ids: Tensor) -> Logged:
        """Writes the tokens' log record (durable only after ``sync`` or ``make_durable``)."""
        assert self.wal is not None and self.position is not None
        try:
            end = self.wal.append(self.position, ids.cpu().numpy())
        except BaseException:
            self.unload()  # a failed log refuses work until a restore reopens it
            raise
        return Logged(self.wal, self.claim, end)

    def sync(self, logged: Logged) -> None:
        """``make_durable`` with the session's lock held; on failure the session is unloaded
        and the error raised (SessionMovedError if another node seized its files)."""
        try:
            self.make_durable(logged)
        except BaseException as error:
            failure = self.failed(logged, error)
            if failure is error:
                raise
            raise failure from error

    def make_durable(self, logged: Logged) -> None:
        """Returns once ``logged`` is durable and the claim it was written under still
        stands; raises otherwise (see ``failed``). Touches only the log and the owner
        file, so it runs without the session's lock, beside later appends."""
        if logged.wal.durable_offset < logged.end:  # else an earlier fsync covered it
            started = time.perf_counter()
            logged.wal.sync_through(logged.end)
            self.env.observer.observe_wal_sync(time.perf_counter() - started)
        if logged.claim is not None:
            self.env.repository.owner(self.id).check(logged.claim)

    def failed(self, logged: Logged, error: BaseException) -> BaseException:
        """After ``make_durable`` raised: unloads the state that holds the lost record
        (unless a restore replaced it since), and returns the error its append hears.
        Call with the session's lock held."""
        if self.wal is logged.wal:
            self.unload()
        if isinstance(error, FencedOutError):
            log.warning("session_fenced_out", session=self.id, reason=str(error))
            return self.env.ownership.moved(self.id)
        return error

    def apply(self, ids: Tensor, state: ModelState) -> None:
        """Makes ``state`` the session's once its tokens are durable."""
        assert self.position is not None
        self.state, self.position = state, self.position + len(ids)
        self.env.books.applied(self.id, state.nbytes(), len(ids))
        self.publish()
        self.maybe_checkpoint()

    def acknowledge(self, ids: Tensor, stats: AppendStats, end: int) -> AppendResult:
        """What the client hears of an applied append."""
        self.write_rate = 1000 * stats.writes_applied / max(stats.position, 1)
        self.memory_norm, self.surprise = stats.memory_norm, stats.surprise_ema
        return AppendResult(
            session_id=self.id,
            position=stats.position,
            appended=len(ids),
            writes_applied=stats.writes_applied,
            writes_skipped=stats.writes_skipped,
            surprise=stats.surprise_ema,
            memory_norm=stats.memory_norm,
            wal_offset=end,
            step_scale=self.step_scale,
            forget_boost=self.forget_boost,
        )

    def roll_back(self, error: NonFiniteStateError, request: str) -> StateRolledBackError:
        """The error refusing a request whose update went non-finite, after rolling back.

        Nothing of the request was logged or applied, so the state in memory is
        the last finite one (every acknowledged token) and stays, unless it is
        not finite itself: then it is unloaded and the next use restores it from
        disk. Recorded as a ROLLBACK event and counted
        (``memsvc_state_rollbacks_total``); the event is best effort.
        """
        position = self.position if self.position is not None else self.durable_position
        from_disk = self.state is None or not is_finite(self.state)
        if from_disk:
            self.unload()
        payload = {
            "request": request,
            "position": position,
            "from_disk": from_disk,
            "reason": str(error),
        }
        log.warning("state_rolled_back", tenant=self.tenant_id, session=self.id, **payload)
        self.env.observer.count_rollback()
        try:
            self.env.repository.record_event(
                self.tenant_id, EventKind.ROLLBACK, payload, session_id=self.id
            )
        except Exception as failure:
            log.error("rollback_event_failed", session=self.id, error=repr(failure))
        return StateRolledBackError(
            f"session {self.id}: the {request} made the memory state non-finite, so it was "
            f"refused and the session rolled back to its last finite state at position "
            f"{position} (nothing acknowledged is lost)",
            position,
        )

    # ---- checkpoints ----------------------------------------------------------------------

    def maybe_checkpoint(self) -> None:
        """The periodic checkpoint, by tokens or by time; a failure is logged, not raised
        (the tokens are durable in the log already)."""
        assert self.position is not None
        config = self.env.config
        behind = self.position - self.durable_position
        overdue = time.monotonic() - self.checkpoint_at >= config.checkpoint_every_seconds
        if behind >= config.checkpoint_every_tokens or (behind > 0 and overdue):
            self.checkpoint_if_dirty()

    def checkpoint_if_dirty(self) -> None:
        """Checkpoints if tokens came since the last one; failures are logged (best effort)."""
        if self.position == self.durable_position:
            return
        try:
            self.checkpoint()
        except Exception as error:
            log.warning("checkpoint_failed", session=self.id, error=repr(error))

    def checkpoint(self) -> CheckpointInfo:
        """Writes and records the next checkpoint of the state in memory."""
        assert self.state is not None and self.wal is not None
        env = self.env
        started = time.perf_counter()
        try:
            lease = env.ownership.keep(self.id)
            info = env.repository.checkpoint(
                self.id, self.sequence + 1, self.state, self.wal, lease.fence, claim=self.claim
            )
        except (StaleFenceError, FencedOutError) as error:
            env.observer.count_checkpoint_failure()
            self.unload()
            raise env.ownership.moved(self.id) from error
        except BaseException:
            env.observer.count_checkpoint_failure()
            raise
        env.observer.observe_checkpoint(time.perf_counter() - started)
        self.created(info)
        env.books.count(checkpoints=1)
        return info

    def created(self, info: CheckpointInfo, state: ModelState | None = None) -> None:
        """Takes ``info`` as the session's newest checkpoint; ``state``: the one it holds,
        when the session was just created from it (its knobs are the session's)."""
        if state is not None:
            self.step_scale, self.forget_boost = knobs(state)  # a fork keeps its source's
        self.sequence = info.sequence
        self.durable_position = info.position
        self.last_checkpoint = info
        self.checkpoint_at = time.monotonic()

    def set_knobs(self, state: ModelState, step_scale: float, forget_boost: float) -> None:
        """Takes a state with new mitigation knobs (``ModelState.with_mitigation``)."""
        self.state = state
        self.step_scale, self.forget_boost = step_scale, forget_boost


def knobs(state: ModelState) -> tuple[float, float]:
    """A state's mitigation knobs (step scale, forget boost); every layer holds the same."""
    memory = next((block.memory for block in state.blocks if block.memory is not None), None)
    if memory is None:
        return 1.0, 0.0
    return float(memory.step_scale[0]), float(memory.forget_boost[0])
