"""`SessionManager`: the session layer the server calls (create, append, generate, evict, ...).

Threads. Every method is synchronous and thread-safe: the gRPC server calls
them from worker threads. Each session has a lock, so one call at a time
steps, checkpoints or moves it; a generation holds it until its iterator is
exhausted or closed. Calls on different sessions run in parallel, except
that making room in a memory tier is serialised (one mover at a time). What
blocks: a call on a busy session waits for it; the first touch of a session
restores it (reads its newest checkpoint, replays its log tail); an append
waits for the fsync of its log; a checkpoint (periodic, on eviction, on
close) writes and fsyncs a file and commits a row. Queries run outside the
session's lock, on a snapshot of its state.

Durability. An append returns once its tokens are in the session's
write-ahead log and fsynced. Checkpoints are written every
``checkpoint_every_tokens`` tokens (after the append that crosses the mark)
and, by a maintenance thread, ``checkpoint_every_seconds`` after the last
one if tokens came since; ``keep_checkpoints`` generations are kept. See
``durability.py`` and ``restore.py``.

Residency. A state is restored to the device on first touch (or by
``prefetch``). Admitting it to a full tier moves the least recently used
sessions not in use one tier down (``residency.py``); if even that cannot
make room, QuotaExceededError. Eviction to disk checkpoints the session if
tokens came since its last checkpoint (best effort: the log holds them
anyway), closes its log and releases its lease.

Redis (the lease store) unavailable: clear errors, never silent loss. A
call that must take a session's lease, or whose lease is overdue for
renewal, fails with CoordinationUnavailableError and changes nothing; work
under a lease still held continues; hot state is published best effort
(``ownership.py``). Give the Redis client a short retry budget: redis-py
retries a refused connection with backoff (seconds, by default) and every
call that touches Redis waits for it.

Mitigation. ``mitigate`` sets a session's memory knobs (step scale, forget
boost: ``ModelState.with_mitigation``); they are part of the state, so the
session is checkpointed at once and a restart keeps them (see ``mitigate``).

Observation. An optional ``observer`` (``SessionObserver``: the server passes
its ``ServiceMetrics``) hears the latency of evictions, restores, checkpoints
and log fsyncs.

Every call is scoped by tenant: another tenant's session is reported exactly
like a missing one (SessionNotFoundError).
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import structlog
import torch
from torch import Tensor

from memsvc.engine import AppendStats, SamplingParams, StreamingEngine
from memsvc.model import ModelState
from memsvc.sessions.api import (
    AppendResult,
    CheckpointInfo,
    IncompatibleStateError,
    InvalidRequestError,
    ManagerClosedError,
    ManagerStats,
    PositionConflictError,
    ResidentSession,
    SessionBusyError,
    SessionEvent,
    SessionInfo,
    SessionNotFoundError,
    SessionObserver,
    Tier,
)
from memsvc.sessions.durability import SessionStore, StateIdentity
from memsvc.sessions.fencing import Claim, FenceBehindError, FencedOutError
from memsvc.sessions.generation import SessionGeneration
from memsvc.sessions.layout import max_state_bytes
from memsvc.sessions.ownership import LeaseLostError, LeaseTakenError, Ownership
from memsvc.sessions.portable import chunked, decode_export, encode_export
from memsvc.sessions.residency import TIERS_DOWN, ResidencyTable, tier_below
from memsvc.sessions.restore import Restored, UnrecoverableSessionError, restore_session
from memsvc.sessions.wal import CorruptWalHeaderError, WriteAheadLog, read_wal
from memsvc.store import metadata
from memsvc.store.database import Database
from memsvc.store.errors import NotFoundError, StaleFenceError
from memsvc.store.hot_state import HotStateTracker
from memsvc.store.models import EventKind, SessionRow, SessionStatus

log = structlog.get_logger(__name__)

MAX_NAME_LENGTH = 200  # the sessions.name column
SYNC_THREADS = 16  # fsyncs of one batched append in flight at once


@dataclass(frozen=True)
class ManagerConfig:
    """Where sessions live and how they are kept. Budgets are bytes of session state."""

    data_dir: Path
    node_id: str = "node-0"
    device_budget_bytes: int = 2 << 30
    host_budget_bytes: int = 0  # used only when the engine is on CUDA
    keep_checkpoints: int = 3
    checkpoint_every_tokens: int = 65536
    checkpoint_every_seconds: float = 300.0
    lease_ttl_ms: int = 30_000
    # Where clients reach this node (host:port), announced to the cluster so that other
    # replicas can send a session's clients here; None: a single node, nothing announced.
    advertise_address: str | None = None
    max_tokens_per_append: int = 1 << 20
    # A session's log is cut (before its oldest kept checkpoint) once that frees this much.
    wal_truncate_bytes: int = 64 << 10

    def __post_init__(self) -> None:
        for name in ("device_budget_bytes", "checkpoint_every_tokens", "lease_ttl_ms"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ManagerConfig.{name} must be positive")
        if self.host_budget_bytes < 0 or self.keep_checkpoints < 1 or self.wal_truncate_bytes < 0:
            raise ValueError(
                "ManagerConfig: host_budget_bytes, wal_truncate_bytes >= 0; keep_checkpoints >= 1"
            )
        if self.checkpoint_every_seconds <= 0 or self.max_tokens_per_append <= 0:
            raise ValueError("ManagerConfig: checkpoint period and max tokens must be positive")


@dataclass(eq=False)
class _Session:
    """What this node knows of one session. Fields below ``lock`` change only under it."""

    id: str
    tenant_id: str
    name: str
    model_hash: str
    created_at: datetime
    lock: threading.Lock = field(default_factory=threading.Lock)
    state: ModelState | None = None  # in a memory tier (the residency table says which)
    wal: WriteAheadLog | None = None  # open while the state is in memory
    position: int | None = None  # acknowledged tokens; None until read from disk
    durable_position: int = 0  # position of the newest usable checkpoint
    generation: int = 0  # newest recorded checkpoint generation
    last_checkpoint: CheckpointInfo | None = None
    checkpoint_at: float = 0.0  # monotonic time of the last checkpoint (or restore)
    write_rate: float = 0.0  # memory writes per 1k tokens, for the hot state
    step_scale: float = 1.0  # the state's mitigation knobs, as last read or set
    forget_boost: float = 0.0
    memory_norm: float | None = None  # after the last append since the state was loaded
    surprise: float | None = None
    on_disk: bool = False  # it has a log or checkpoints (False: never materialised)
    claim: Claim | None = None  # this node's claim on the files while it holds the state
    gone: str | None = None  # "deleted" or "quarantined" while a caller waited for it


@dataclass
class _Counters:
    evictions: int = 0
    restores: int = 0
    appends: int = 0
    tokens_appended: int = 0
    checkpoints: int = 0
    quarantined: int = 0
    restore_seconds: float = 0.0
    eviction_seconds: float = 0.0


class SessionManager:
    """Sessions of many tenants over one engine, one database and one hot-state tracker."""

    def __init__(
        self,
        config: ManagerConfig,
        *,
        engine: StreamingEngine,
        database: Database,
        tracker: HotStateTracker,
        observer: SessionObserver | None = None,
    ) -> None:
        self.config = config
        self._observer: SessionObserver = observer if observer is not None else _Unobserved()
        self.engine = engine
        self.identity = StateIdentity.of(engine.model)
        self._store = SessionStore(
            config.data_dir,
            database,
            self.identity,
            keep=config.keep_checkpoints,
            truncate_bytes=config.wal_truncate_bytes,
        )
        self._database = database
        self._ownership = Ownership(tracker, config.node_id, config.lease_ttl_ms)
        # Tells this process's claims from those of an earlier run of the same node (fencing.py).
        self._incarnation = f"{config.node_id}/{secrets.token_hex(8)}"
        if config.advertise_address is not None:
            self._ownership.announce(config.advertise_address)
        self._template = engine.init_state()
        self._state_bytes = max_state_bytes(self._template, engine.chunk_size)
        self._host_enabled = engine.device.type == "cuda" and config.host_budget_bytes > 0
        host_budget = config.host_budget_bytes if self._host_enabled else 0
        self._table = ResidencyTable(
            {Tier.DEVICE: config.device_budget_bytes, Tier.HOST: host_budget}
        )
        self._lock = threading.Lock()  # the session records, the table, the counters
        self._move_lock = threading.Lock()  # one thread makes room in the tiers at a time
        self._sessions: dict[str, _Session] = {}
        self._counters = _Counters()
        self._closed = False
        self._sync_pool = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="memsvc-wal-sync")
        self._stop = threading.Event()
        self._maintenance = threading.Thread(
            target=self._maintain, name="memsvc-session-maintenance", daemon=True
        )
        self._maintenance.start()

    # ---- sessions -----------------------------------------------------------------------

    def create(self, tenant_id: str, name: str = "") -> SessionInfo:
        """A new, empty session; QuotaExceededError past the tenant's ``max_sessions``."""
        self._check_open()
        _check_name(name)
        with self._database.unit_of_work() as db:
            try:
                row = metadata.create_session(
                    db, tenant_id, name=name, model_hash=self.identity.model_hash
                )
            except NotFoundError as error:
                raise InvalidRequestError(f"unknown tenant {tenant_id}") from error
        session = self._remember(row, position=0, on_disk=False)
        log.info("session_created", tenant=tenant_id, session=session.id)
        return self._info(session)

    def get(self, tenant_id: str, session_id: str) -> SessionInfo:
        """The session as its client sees it (SessionNotFoundError: missing or not the tenant's)."""
        self._check_open()
        return self._info(self._resolve(tenant_id, session_id))

    def list(self, tenant_id: str) -> list[SessionInfo]:
        """The tenant's sessions, oldest first; quarantined ones are left out (see the events)."""
        self._check_open()
        with self._database.unit_of_work() as db:
            rows = metadata.list_sessions(db, tenant_id)
        infos = []
        for row in rows:
            try:
                infos.append(self._info(self._record(row)))
            except (SessionNotFoundError, SessionBusyError):
                continue  # deleted or quarantined since the listing
        return infos

    def delete(self, tenant_id: str, session_id: str) -> None:
        """Deletes the session, its log and its checkpoints."""
        self._check_open()
        session = self._resolve(tenant_id, session_id)
        with self._holding(session):
            self._own(session)  # no other node may be writing it
            try:
                with self._database.unit_of_work() as db:
                    metadata.delete_session(db, tenant_id, session_id)
            except NotFoundError as error:
                raise SessionNotFoundError(str(error)) from error
            finally:
                self._drop(session)
            self._store.remove(session.id)
            self._ownership.forget(session.id)
            self._forget(session, "deleted")
        log.info("session_deleted", tenant=tenant_id, session=session_id)

    # ---- streaming ----------------------------------------------------------------------

    def append(
        self,
        tenant_id: str,
        session_id: str,
        tokens: Sequence[int],
        expected_position: int | None = None,
    ) -> AppendResult:
        """Appends tokens to the stream; returns once they are durable. With
        ``expected_position``, PositionConflictError unless the stream is there."""
        self._check_open()
        session = self._resolve(tenant_id, session_id)
        ids = self._validate(tokens)
        with self._holding(session):
            state = self._ready(session)
            _check_position(session, expected_position)
            new_state, stats = self.engine.append(state, ids)
            end = self._log_and_apply(session, ids, new_state)
            return self._acknowledge(session, ids, stats, end)

    def append_many(
        self,
        items: Sequence[
            tuple[str, str, Sequence[int]] | tuple[str, str, Sequence[int], int | None]
        ],
    ) -> list[AppendResult | Exception]:
        """Appends to many sessions with batched engine steps; per-item errors are returned.

        Items are (tenant, session, tokens[, expected position]). Items of one
        session are applied in order (one per engine step); the results equal
        appending the items one by one.
        """
        self._check_open()
        results: list[AppendResult | Exception | None] = [None] * len(items)
        prepared: list[tuple[int, _Session, Tensor, int | None]] = []
        for index, (tenant_id, session_id, tokens, *expected) in enumerate(items):
            try:
                prepared.append(
                    (
                        index,
                        self._resolve(tenant_id, session_id),
                        self._validate(tokens),
                        expected[0] if expected else None,
                    )
                )
            except Exception as error:
                results[index] = error
        for batch in _rounds(prepared):
            self._append_batch(batch, results)
        assert all(result is not None for result in results)
        return results  # type: ignore[return-value]

    def generate(
        self, tenant_id: str, session_id: str, prompt: Sequence[int], params: SamplingParams
    ) -> SessionGeneration:
        """Appends the prompt and samples; see SessionGeneration for what becomes durable when.

        The session stays locked until the iterator is exhausted or closed.
        """
        self._check_open()
        session = self._resolve(tenant_id, session_id)
        ids = self._validate(prompt)
        self._acquire(session)
        try:
            _check_present(session)
            start = self._ready(session)
            try:
                generation = self.engine.generate(start, ids, params)
            except ValueError as error:
                raise InvalidRequestError(str(error)) from error
        except BaseException:
            self._release(session)
            raise

        def commit(generated: list[int], final: ModelState | None) -> None:
            tokens = torch.cat([ids, torch.tensor(generated, dtype=torch.int64, device=ids.device)])
            if final is None:
                final, _ = self.engine.append(start, tokens)
            self._log_and_apply(session, tokens, final)

        return SessionGeneration(session.id, generation, commit, lambda: self._release(session))

    def query(
        self, tenant_id: str, session_id: str, prompt: Sequence[int], params: SamplingParams
    ) -> list[int]:
        """Samples an answer from a snapshot of the state; the session does not change."""
        self._check_open()
        session = self._resolve(tenant_id, session_id)
        ids = self._validate(prompt)
        with self._holding(session):
            snapshot = self._ready(session)
        try:
            return list(self.engine.generate(snapshot, ids, params))
        except ValueError as error:
            raise InvalidRequestError(str(error)) from error

    def snapshot(self, tenant_id: str, session_id: str) -> ModelState:
        """The session's state now, to read without changing it (states are never
        modified in place, so later appends do not reach it)."""
        self._check_open()
        session = self._resolve(tenant_id, session_id)
        with self._holding(session):
            return self._ready(session)

    # ---- durability and residency -------------------------------------------------------

    def checkpoint(self, tenant_id: str, session_id: str) -> CheckpointInfo:
        """Writes a checkpoint generation now (or returns the newest if nothing came since)."""
        self._check_open()
        session = self._resolve(tenant_id, session_id)
        with self._holding(session):
            self._ready(session)
            if session.last_checkpoint is not None and session.position == session.durable_position:
                return session.last_checkpoint
            return self._checkpoint(session)

    def evict(self, tenant_id: str, session_id: str, tier: Tier = Tier.DISK) -> None:
        """Moves the state down to ``tier`` (HOST only beside a GPU); a no-op if it is lower.

        Waits for the session's current call to finish.
        """
        self._check_open()
        if tier is Tier.DEVICE or (tier is Tier.HOST and not self._host_enabled):
            raise InvalidRequestError(
                f"cannot evict to {tier}: the tiers below the device are "
                f"{'host, disk' if self._host_enabled else 'disk'}"
            )
        session = self._resolve(tenant_id, session_id)
        with self._holding(session):
            current = self._resident_tier(session)
            if current is None or TIERS_DOWN.index(current) >= TIERS_DOWN.index(tier):
                return
            with self._move_lock:
                self._demote(session, tier)

    def prefetch(self, tenant_id: str, session_id: str) -> None:
        """Restores the session to the device now (a stream opens); returns once it is there."""
        self._check_open()
        session = self._resolve(tenant_id, session_id)
        with self._holding(session):
            self._ready(session)

    def mitigate(
        self,
        tenant_id: str,
        session_id: str,
        step_scale: float,
        forget_boost: float,
        *,
        reason: str = "manual",
        evidence: Mapping[str, float] | None = None,
    ) -> None:
        """Sets the session's memory knobs (``ModelState.with_mitigation``) and makes them durable.

        The knobs are part of the state, so the session is checkpointed right
        after: a restart or an eviction restores them, and the log tail replays
        on top of them. (Should that checkpoint later prove damaged, restore falls
        back to an older generation and its knobs: the guards decide again.) If
        the checkpoint fails, the knobs hold in memory only and the error is
        raised. Recorded as a MITIGATION event with ``reason`` and ``evidence``.
        InvalidRequestError for knobs out of range (nothing changes).
        """
        self._check_open()
        if not (0.0 < step_scale <= 1.0 and 0.0 <= forget_boost < 1.0):
            raise InvalidRequestError(
                f"need 0 < step_scale <= 1 and 0 <= forget_boost < 1, "
                f"got {step_scale} and {forget_boost}"
            )
        session = self._resolve(tenant_id, session_id)
        with self._holding(session):
            state = self._ready(session).with_mitigation(step_scale, forget_boost)
            before = (session.step_scale, session.forget_boost)
            session.state = state
            session.step_scale, session.forget_boost = step_scale, forget_boost
            info = self._checkpoint(session)
            payload = {
                "reason": reason,
                "step_scale": step_scale,
                "forget_boost": forget_boost,
                "previous_step_scale": before[0],
                "previous_forget_boost": before[1],
                "position": info.position,
                "generation": info.generation,
                "evidence": dict(evidence or {}),
            }
            with self._database.unit_of_work() as db:
                metadata.record_event(
                    db, tenant_id, EventKind.MITIGATION, payload, session_id=session_id
                )
        log.warning("mitigation_applied", tenant=tenant_id, session=session_id, **payload)

    def events(
        self,
        tenant_id: str | None,
        *,
        kind: str = "",
        session_id: str = "",
        limit: int = 100,
    ) -> list[SessionEvent]:
        """Audit events, newest first: of one tenant, or of every tenant (None, the operator's);
        ``kind`` (an EventKind value) and ``session_id`` filter when given."""
        self._check_open()
        try:
            event_kind = EventKind(kind) if kind else None
        except ValueError:
            kinds = ", ".join(k.value for k in EventKind)
            raise InvalidRequestError(f"unknown event kind {kind!r}; kinds are {kinds}") from None
        if limit <= 0:
            raise InvalidRequestError(f"limit must be positive, got {limit}")
        with self._database.unit_of_work() as db:
            rows = metadata.list_events(
                db, tenant_id, session_id=session_id or None, kind=event_kind, limit=limit
            )
            return [
                SessionEvent(
                    event_id=row.id,
                    tenant_id=row.tenant_id,
                    session_id=row.session_id,
                    kind=row.kind,
                    created_at=row.created_at,
                    payload=dict(row.payload),
                )
                for row in rows
            ]

    # ---- copies -------------------------------------------------------------------------

    def fork(self, tenant_id: str, session_id: str, name: str = "") -> SessionInfo:
        """A new session of the tenant whose memory is a copy of this one's (position included)."""
        self._check_open()
        _check_name(name)
        source = self._resolve(tenant_id, session_id)
        with self._holding(source):
            snapshot = self._ready(source)
        return self._create_from(tenant_id, name, snapshot)

    def export(
        self, tenant_id: str, session_id: str, chunk_bytes: int = 1 << 20
    ) -> Iterator[bytes]:
        """The session's state as a portable, versioned file (``portable.py``), in chunks."""
        self._check_open()
        if chunk_bytes <= 0:
            raise InvalidRequestError(f"chunk_bytes must be positive, got {chunk_bytes}")
        session = self._resolve(tenant_id, session_id)
        with self._holding(session):
            snapshot = self._ready(session)
        return chunked(encode_export(snapshot, self.identity), chunk_bytes)

    def import_(self, tenant_id: str, chunks: Iterable[bytes], name: str = "") -> SessionInfo:
        """A new session holding an exported state; IncompatibleStateError for another model."""
        self._check_open()
        _check_name(name)
        state = decode_export(chunks, self.identity, self._template, self.engine.chunk_size)
        return self._create_from(tenant_id, name, state.to(self.engine.device))

    # ---- introspection and shutdown -----------------------------------------------------

    def resident(self) -> list[ResidentSession]:
        """Sessions whose state is in a memory tier, least recently used first."""
        with self._lock:
            entries = sorted(self._table.items(), key=lambda item: item[1].last_access)
            return [
                ResidentSession(
                    session_id=session_id,
                    tenant_id=session.tenant_id,
                    tier=resident.tier,
                    state_bytes=resident.nbytes,
                    position=session.position or 0,
                    last_access=resident.last_access,
                    pinned=self._table.pinned(session_id),
                    step_scale=session.step_scale,
                    forget_boost=session.forget_boost,
                    memory_norm=session.memory_norm,
                    surprise=session.surprise,
                )
                for session_id, resident in entries
                if (session := self._sessions.get(session_id)) is not None
            ]

    def stats(self) -> ManagerStats:
        """Residency per tier and counters since the manager started."""
        with self._lock:
            memory = (Tier.DEVICE, Tier.HOST)
            c = self._counters
            return ManagerStats(
                resident={tier: self._table.count(tier) for tier in memory},
                bytes_used={tier: self._table.used(tier) for tier in memory},
                budgets=dict(self._table.budgets),
                evictions=c.evictions,
                restores=c.restores,
                appends=c.appends,
                tokens_appended=c.tokens_appended,
                checkpoints=c.checkpoints,
                corruptions=self._store.corruptions,
                quarantined=c.quarantined,
                restore_seconds=c.restore_seconds,
                eviction_seconds=c.eviction_seconds,
            )

    def close(self) -> None:
        """Checkpoints every session with tokens since its last checkpoint, releases leases.

        Waits up to the lease TTL for each busy session (an open generation
        holds one); a session still busy then is left to its log. Later calls
        raise ManagerClosedError.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sessions = list(self._sessions.values())
        self._stop.set()
        self._maintenance.join()
        for session in sessions:
            if not self._acquire(session, timeout=self.config.lease_ttl_ms / 1000):
                log.error("session_busy_at_close", session=session.id)
                continue
            try:
                if session.state is not None:
                    self._checkpoint_if_dirty(session)
                    self._drop(session)
            finally:
                self._release(session)
        self._sync_pool.shutdown()
        self._store.close()
        log.info("session_manager_closed", sessions=len(sessions))

    # ---- internals: records and locks ---------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ManagerClosedError("the session manager is closed")

    def _remember(self, row: SessionRow, *, position: int | None, on_disk: bool) -> _Session:
        session = _Session(
            id=row.id,
            tenant_id=row.tenant_id,
            name=row.name,
            model_hash=row.model_hash,
            created_at=row.created_at,
            position=position,
            durable_position=row.position,
            on_disk=on_disk,
        )
        with self._lock:
            return self._sessions.setdefault(session.id, session)

    def _resolve(self, tenant_id: str, session_id: str) -> _Session:
        """The session's record, loaded from SQL on first use; tenant-scoped."""
        if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
            raise SessionNotFoundError(f"session {session_id!r} not found")
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            try:
                with self._database.unit_of_work() as db:
                    row = metadata.get_session(db, tenant_id, session_id)
            except NotFoundError as error:
                raise SessionNotFoundError(f"session {session_id} not found") from error
            session = self._record(row)
        if session.tenant_id != tenant_id:
            raise SessionNotFoundError(f"session {session_id} not found")
        _check_present(session)
        return session

    def _record(self, row: SessionRow) -> _Session:
        """The record of a session read from SQL (SessionBusyError if quarantined)."""
        if row.status is SessionStatus.QUARANTINED:
            raise SessionBusyError(f"session {row.id} is quarantined")
        with self._lock:
            known = self._sessions.get(row.id)
        if known is not None:
            return known
        return self._remember(row, position=None, on_disk=self._store.wal_path(row.id).exists())

    def _forget(self, session: _Session, why: str) -> None:
        session.gone = why
        with self._lock:
            self._sessions.pop(session.id, None)

    def _acquire(self, session: _Session, timeout: float = -1) -> bool:
        """Pins the session (no eviction) and takes its lock; pins come first, see _make_room."""
        with self._lock:
            self._table.pin(session.id)
        if session.lock.acquire(timeout=timeout):
            return True
        with self._lock:
            self._table.unpin(session.id)
        return False

    def _release(self, session: _Session) -> None:
        session.lock.release()
        with self._lock:
            self._table.unpin(session.id)

    @contextmanager
    def _holding(self, session: _Session) -> Iterator[None]:
        self._acquire(session)
        try:
            _check_present(session)
            yield
        finally:
            self._release(session)

    def _validate(self, tokens: Sequence[int]) -> Tensor:
        """The token ids as the engine takes them; InvalidRequestError before anything changes."""
        try:
            count = len(tokens)
        except TypeError as error:
            raise InvalidRequestError("tokens must be a sequence of token ids") from error
        if count == 0:
            raise InvalidRequestError("no tokens")
        if count > self.config.max_tokens_per_append:
            raise InvalidRequestError(
                f"{count} tokens in one request; the most is {self.config.max_tokens_per_append}"
            )
        try:
            # The engine's own check: integer ids inside the vocabulary, 1-D.
            return self.engine._as_tokens(tokens)
        except (ValueError, TypeError, RuntimeError) as error:
            raise InvalidRequestError(str(error)) from error

    # ---- internals: state in memory -----------------------------------------------------

    def _resident_tier(self, session: _Session) -> Tier | None:
        with self._lock:
            resident = self._table.get(session.id)
        return None if resident is None else resident.tier

    def _ready(self, session: _Session) -> ModelState:
        """The session's state on the device, with its lease current (caller holds the session)."""
        if session.model_hash != self.identity.model_hash:
            raise IncompatibleStateError(
                f"session {session.id} belongs to model {session.model_hash}, this node serves "
                f"{self.identity.model_hash}"
            )
        self._own(session)
        if session.state is None:
            self._restore(session)
        elif self._resident_tier(session) is Tier.HOST:
            started = time.perf_counter()
            with self._move_lock:
                self._make_room(Tier.DEVICE, self._state_bytes)
                session.state = session.state.to(self.engine.device)
                self._place(session, Tier.DEVICE)
            self._observer.observe_restore(time.perf_counter() - started, Tier.HOST.value)
        with self._lock:
            self._table.touch(session.id, time.time())
        self._refresh(session)
        assert session.state is not None
        return session.state

    def _own(self, session: _Session) -> None:
        """Makes sure this node holds a current lease; drops a copy that may be stale."""
        if self._ownership.lease(session.id) is None:
            self._ownership.acquire(session.id)
            return
        try:
            self._ownership.keep(session.id)
        except LeaseLostError:
            self._drop(session, release=False)  # the fresh lease stays: restore from disk
        except LeaseTakenError:
            self._drop(session)
            raise self._ownership.moved(session.id) from None

    def _restore(self, session: _Session) -> None:
        """Reads the session back from disk (its lease is held: ``_own``)."""
        started = time.perf_counter()
        try:
            with self._move_lock:
                self._make_room(Tier.DEVICE, self._state_bytes)
                with self._lock:  # reserve the room while the state is read
                    self._table.place(session.id, Tier.DEVICE, self._state_bytes, time.time())
            try:
                restored = self._restore_claimed(session)
            except UnrecoverableSessionError as error:
                self._store.quarantine(session.tenant_id, session.id, str(error))
                self._forget(session, "quarantined")
                with self._lock:
                    self._counters.quarantined += 1
                raise SessionBusyError(f"session {session.id} is quarantined: {error}") from error
        except BaseException:
            with self._lock:
                self._table.remove(session.id)
            self._ownership.release(session.id)
            raise
        session.state, session.wal, session.claim = restored.state, restored.wal, restored.claim
        session.step_scale, session.forget_boost = _knobs(restored.state)
        session.memory_norm = session.surprise = None
        session.position = restored.wal.next_position
        session.durable_position = restored.checkpoint_position
        session.generation = restored.generation
        session.last_checkpoint = None
        session.checkpoint_at = time.monotonic()
        session.on_disk = True
        self._place(session, Tier.DEVICE)
        elapsed = time.perf_counter() - started
        with self._lock:
            self._counters.restores += 1
            self._counters.restore_seconds += elapsed
        self._observer.observe_restore(elapsed, Tier.DISK.value)
        log.debug("session_restored", session=session.id, position=session.position, s=elapsed)
        if restored.fell_back:
            self._checkpoint_if_dirty(session)  # a sound newest generation again

    def _claim(self, session_id: str) -> Claim:
        lease = self._ownership.lease(session_id)
        assert lease is not None
        return Claim(lease.fence, self.config.node_id, self._incarnation)

    def _restore_claimed(self, session: _Session) -> Restored:
        """``restore_session`` under this node's claim; a claim behind the fences on disk
        (the lease store lost its counters) has its fence raised once and tries again."""
        restore = (self._store, self.engine, session.tenant_id, session.id)
        try:
            return restore_session(*restore, self._claim(session.id))
        except FenceBehindError as error:
            self._ownership.raise_fence(session.id, error.floor)
        return restore_session(*restore, self._claim(session.id))

    def _place(self, session: _Session, tier: Tier) -> None:
        assert session.state is not None
        with self._lock:
            self._table.place(session.id, tier, session.state.nbytes(), time.time())
        self._ownership.publish(session.id, tier, session.position or 0, session.write_rate)

    def _refresh(self, session: _Session) -> None:
        """The session's hot state after an access (throttled, best effort)."""
        tier = self._resident_tier(session)
        if tier is not None:
            self._ownership.refresh(session.id, tier, session.position or 0, session.write_rate)

    def _make_room(self, tier: Tier, nbytes: int) -> None:
        """Moves unpinned LRU sessions out of ``tier`` until ``nbytes`` fit (move lock held).

        A session is pinned whenever its lock is held or wanted (``_acquire``
        pins first), so an unpinned victim's lock is free: taking it cannot
        block, and no two threads wait on each other.
        """
        while True:
            with self._lock:
                victims = self._table.victims(tier, nbytes)
                if not victims:
                    return
                victim = self._sessions[victims[0]]
                if not victim.lock.acquire(blocking=False):
                    raise RuntimeError(f"session {victim.id} is locked but not pinned")
                self._table.pin(victim.id)
            try:
                self._demote(victim, tier_below(tier))
            finally:
                self._release(victim)

    def _demote(self, session: _Session, tier: Tier) -> None:
        """Moves a state to ``tier`` (HOST or DISK); the session and the move lock are held."""
        started = time.perf_counter()
        assert session.state is not None
        nbytes = session.state.nbytes()
        if tier is Tier.HOST and nbytes > self._table.budgets[Tier.HOST]:
            tier = Tier.DISK
        if tier is Tier.HOST:
            self._make_room(Tier.HOST, nbytes)
            session.state = session.state.map(lambda t: t.to("cpu").pin_memory())
            self._place(session, Tier.HOST)
        else:
            self._checkpoint_if_dirty(session)
            self._ownership.publish(
                session.id, Tier.DISK, session.position or 0, session.write_rate
            )
            self._drop(session)
        elapsed = time.perf_counter() - started
        with self._lock:
            self._counters.evictions += 1
            self._counters.eviction_seconds += elapsed
        self._observer.observe_eviction(elapsed, tier.value)
        log.debug("session_evicted", session=session.id, tier=tier.value, s=elapsed)

    def _drop(self, session: _Session, *, release: bool = True) -> None:
        """Forgets the in-memory state and closes the log (everything in it is durable)."""
        if session.wal is not None:
            session.wal.close()
        session.state, session.wal, session.claim = None, None, None
        session.position = None  # another node may move it on: read it from disk again
        with self._lock:
            self._table.remove(session.id)
        if release:
            self._ownership.release(session.id)

    # ---- internals: appends and checkpoints ---------------------------------------------

    def _log(self, session: _Session, ids: Tensor) -> None:
        """Writes the tokens' log record (durable only after ``_sync``); the caller holds it."""
        assert session.wal is not None and session.position is not None
        try:
            session.wal.append(session.position, ids.cpu().numpy())
        except BaseException:
            self._drop(session)  # a failed log refuses work until a restore reopens it
            raise

    def _sync(self, session: _Session) -> int:
        """Makes the session's log durable; returns its end offset."""
        assert session.wal is not None
        started = time.perf_counter()
        try:
            end = session.wal.flush_and_sync()
        except BaseException:
            self._drop(session)
            raise
        self._observer.observe_wal_sync(time.perf_counter() - started)
        self._check_claim(session)
        return end

    def _check_claim(self, session: _Session) -> None:
        """SessionMovedError (the state dropped, nothing acknowledged) if another node seized
        the session's files; read after each fsync, before anything is acknowledged."""
        if session.claim is None:
            return
        try:
            self._store.owner(session.id).check(session.claim)
        except FencedOutError as error:
            log.warning("session_fenced_out", session=session.id, reason=str(error))
            self._drop(session)
            raise self._ownership.moved(session.id) from error

    def _sync_all(self, sessions: list[_Session]) -> list[int | Exception]:
        """``_sync`` of several logs at once (concurrent fsyncs share the disk's flushes);
        each one's end offset or error."""

        def sync(session: _Session) -> int | Exception:
            try:
                return self._sync(session)
            except Exception as error:
                return error

        if len(sessions) == 1:
            return [sync(sessions[0])]
        return list(self._sync_pool.map(sync, sessions))

    def _apply(self, session: _Session, ids: Tensor, state: ModelState) -> None:
        """Makes ``state`` the session's once its tokens are durable."""
        assert session.position is not None
        session.state, session.position = state, session.position + len(ids)
        with self._lock:
            self._table.resize(session.id, state.nbytes())
            self._counters.appends += 1
            self._counters.tokens_appended += len(ids)
        self._refresh(session)
        self._maybe_checkpoint(session)

    def _log_and_apply(self, session: _Session, ids: Tensor, state: ModelState) -> int:
        """Logs the tokens durably, then makes ``state`` the session's; returns the log's end."""
        self._log(session, ids)
        end = self._sync(session)
        self._apply(session, ids, state)
        return end

    def _acknowledge(
        self, session: _Session, ids: Tensor, stats: AppendStats, end: int
    ) -> AppendResult:
        session.write_rate = 1000 * stats.writes_applied / max(stats.position, 1)
        session.memory_norm, session.surprise = stats.memory_norm, stats.surprise_ema
        return AppendResult(
            session_id=session.id,
            position=stats.position,
            appended=len(ids),
            writes_applied=stats.writes_applied,
            writes_skipped=stats.writes_skipped,
            surprise=stats.surprise_ema,
            memory_norm=stats.memory_norm,
            wal_offset=end,
            step_scale=session.step_scale,
            forget_boost=session.forget_boost,
        )

    def _append_batch(
        self,
        batch: list[tuple[int, _Session, Tensor, int | None]],
        results: list[AppendResult | Exception | None],
    ) -> None:
        """One engine step over sessions that each appear once; errors land in ``results``."""
        held = []
        try:
            for item in sorted(batch, key=lambda item: item[1].id):  # one lock order: no deadlock
                self._acquire(item[1])
                held.append(item[1])
            ready = []
            for index, session, ids, expected in batch:
                try:
                    _check_present(session)
                    state = self._ready(session)
                    _check_position(session, expected)
                    ready.append((index, session, ids, state))
                except Exception as error:
                    results[index] = error
            if not ready:
                return
            try:
                stepped = self.engine.step_batch([r[3] for r in ready], [r[2] for r in ready])
            except Exception as error:
                for index, *_ in ready:
                    results[index] = error
                return
            logged = []
            for (index, session, ids, _), (state, stats) in zip(ready, stepped, strict=True):
                try:
                    self._log(session, ids)
                    logged.append((index, session, ids, state, stats))
                except Exception as error:
                    results[index] = error
            ends = self._sync_all([item[1] for item in logged])
            for (index, session, ids, state, stats), end in zip(logged, ends, strict=True):
                if isinstance(end, Exception):
                    results[index] = end
                    continue
                self._apply(session, ids, state)
                results[index] = self._acknowledge(session, ids, stats, end)
        finally:
            for session in held:
                self._release(session)

    def _maybe_checkpoint(self, session: _Session) -> None:
        """The periodic checkpoint, by tokens or by time; a failure is logged, not raised
        (the tokens are durable in the log already)."""
        assert session.position is not None
        behind = session.position - session.durable_position
        overdue = time.monotonic() - session.checkpoint_at >= self.config.checkpoint_every_seconds
        if behind >= self.config.checkpoint_every_tokens or (behind > 0 and overdue):
            self._checkpoint_if_dirty(session)

    def _checkpoint_if_dirty(self, session: _Session) -> None:
        """Checkpoints if tokens came since the last one; failures are logged (best effort)."""
        if session.position == session.durable_position:
            return
        try:
            self._checkpoint(session)
        except Exception as error:
            log.warning("checkpoint_failed", session=session.id, error=repr(error))

    def _checkpoint(self, session: _Session) -> CheckpointInfo:
        assert session.state is not None and session.wal is not None
        started = time.perf_counter()
        try:
            lease = self._ownership.keep(session.id)
            info = self._store.checkpoint(
                session.id,
                session.generation + 1,
                session.state,
                session.wal,
                lease.fence,
                claim=session.claim,
            )
        except (StaleFenceError, FencedOutError) as error:
            self._observer.count_checkpoint_failure()
            self._drop(session)
            raise self._ownership.moved(session.id) from error
        except BaseException:
            self._observer.count_checkpoint_failure()
            raise
        self._observer.observe_checkpoint(time.perf_counter() - started)
        session.generation = info.generation
        session.durable_position = info.position
        session.last_checkpoint = info
        session.checkpoint_at = time.monotonic()
        with self._lock:
            self._counters.checkpoints += 1
        return info

    def _create_from(self, tenant_id: str, name: str, state: ModelState) -> SessionInfo:
        """A new session whose generation 1 is ``state``: row, log and checkpoint in one commit."""
        position = int(state.position[0])
        session_id = None
        try:
            with self._database.unit_of_work() as db:
                try:
                    row = metadata.create_session(
                        db, tenant_id, name=name, model_hash=self.identity.model_hash
                    )
                except NotFoundError as error:
                    raise InvalidRequestError(f"unknown tenant {tenant_id}") from error
                session_id = row.id
                lease = self._ownership.acquire(session_id)
                row.fence = lease.fence
                claim = Claim(lease.fence, self.config.node_id, self._incarnation)
                try:
                    owner = self._store.owner(session_id)
                    with owner.locked():
                        owner.seize(claim)
                    self._store.create_log(session_id, offset=0, position=position).close()
                    written = self._store.write_file(session_id, 1, state, wal_offset=0)
                    info, _, _ = self._store.record(db, session_id, 1, written, lease.fence)
                finally:
                    self._ownership.release(session_id)
        except BaseException:
            if session_id is not None:
                self._store.remove(session_id)  # never committed: nothing refers to the files
            raise
        session = self._remember(row, position=position, on_disk=True)
        session.generation, session.last_checkpoint = 1, info
        session.step_scale, session.forget_boost = _knobs(state)  # a fork keeps its source's
        return self._info(session)

    # ---- internals: what clients see ----------------------------------------------------

    def _info(self, session: _Session) -> SessionInfo:
        position = session.position
        if position is None:
            with self._holding(session):
                position = self._position_on_disk(session)
        tier = self._resident_tier(session)
        with self._lock:
            resident = self._table.get(session.id)
        return SessionInfo(
            session_id=session.id,
            tenant_id=session.tenant_id,
            name=session.name,
            model_hash=session.model_hash,
            position=position,
            durable_position=session.durable_position,
            tier=tier if tier is not None else (Tier.DISK if session.on_disk else None),
            created_at=session.created_at,
            state_bytes=0 if resident is None else resident.nbytes,
        )

    def _position_on_disk(self, session: _Session) -> int:
        """The acknowledged position of a session not in memory: the end of its log."""
        if session.position is None:
            position = session.durable_position
            path = self._store.wal_path(session.id)
            if path.exists():
                reader = read_wal(path)
                try:
                    for _ in reader:
                        pass
                    position = max(position, reader.next_position)
                except (CorruptWalHeaderError, OSError) as error:  # the restore reports it
                    log.warning("wal_unreadable", session=session.id, error=repr(error))
            session.position = position
        return session.position

    # ---- internals: maintenance ---------------------------------------------------------

    def _maintain(self) -> None:
        """Renews leases of sessions in memory and writes the time-based checkpoints."""
        interval = min(self.config.lease_ttl_ms / 6000, self.config.checkpoint_every_seconds / 2)
        while not self._stop.wait(max(interval, 0.01)):
            self._announce()
            with self._lock:
                sessions = [self._sessions.get(sid) for sid, _ in self._table.items()]
            for session in filter(None, sessions):
                if not self._acquire(session, timeout=0):
                    continue  # in use: the call that holds it renews and checkpoints
                try:
                    if session.state is not None and session.gone is None:
                        self._maintain_session(session)
                except Exception as error:
                    log.warning("maintenance_failed", session=session.id, error=repr(error))
                finally:
                    self._release(session)

    def _announce(self) -> None:
        if self.config.advertise_address is not None:
            self._ownership.announce(self.config.advertise_address)

    def _maintain_session(self, session: _Session) -> None:
        try:
            self._ownership.keep(session.id)
        except (LeaseLostError, LeaseTakenError):
            self._drop(session)  # someone else owns it now; the next touch restores
            return
        self._maybe_checkpoint(session)


class _Unobserved:
    """The observer of a manager given none."""

    def observe_eviction(self, seconds: float, tier: str) -> None:
        pass

    def observe_restore(self, seconds: float, tier: str) -> None:
        pass

    def observe_checkpoint(self, seconds: float) -> None:
        pass

    def count_checkpoint_failure(self) -> None:
        pass

    def observe_wal_sync(self, seconds: float) -> None:
        pass


def _knobs(state: ModelState) -> tuple[float, float]:
    """A state's mitigation knobs (step scale, forget boost); every layer holds the same."""
    memory = next((block.memory for block in state.blocks if block.memory is not None), None)
    if memory is None:
        return 1.0, 0.0
    return float(memory.step_scale[0]), float(memory.forget_boost[0])


def _check_present(session: _Session) -> None:
    if session.gone == "quarantined":
        raise SessionBusyError(f"session {session.id} is quarantined")
    if session.gone is not None:
        raise SessionNotFoundError(f"session {session.id} not found")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH or "\x00" in name:
        raise InvalidRequestError(
            f"a session name is a string of at most {MAX_NAME_LENGTH} characters, "
            "without NUL characters"
        )


# Session ids are canonical UUIDs (store.models.new_id); anything else names no session.
_SESSION_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _check_position(session: _Session, expected: int | None) -> None:
    """PositionConflictError unless the stream is at ``expected`` (None: anywhere)."""
    if expected is not None and session.position != expected:
        assert session.position is not None
        raise PositionConflictError(
            f"session {session.id} is at position {session.position}, the append expected "
            f"{expected}",
            session.position,
        )


_Item = tuple[int, _Session, Tensor, int | None]


def _rounds(items: list[_Item]) -> list[list[_Item]]:
    """Splits items into engine steps where each session appears at most once, in item order."""
    rounds: list[list[_Item]] = []
    seen: dict[str, int] = {}
    for item in items:
        n = seen.get(item[1].id, 0)
        seen[item[1].id] = n + 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append(item)
    return rounds
