"""`SessionManager`: the session layer the server calls (create, append, generate, evict, ...).

A facade: it resolves a call's session (``LiveSession``, ``live.py``), holds
it, and delegates; residency moves live in ``residency.py``, batched appends
in ``batch.py``, the maintenance thread in ``maintenance.py``, the files and
SQL rows in ``durability.py`` (``SessionRepository``, their one owner).

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
one if tokens came since (``maintenance.py``); the newest ``keep_checkpoints``
checkpoints are kept. See ``live.py``, ``durability.py`` and ``restore.py``.

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

Rollback. An update that makes a session's memory state non-finite (an
append, a batched append, a generation, a query) is refused with
StateRolledBackError and never logged; the session keeps its last finite
state (restored from disk if the one in memory is damaged:
``LiveSession.roll_back``), and the rollback is recorded as a ROLLBACK event
and counted. In a batched step the other sessions are stepped alone and go on.

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

import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence

import structlog
import torch

from memsvc.engine import SamplingParams, StreamingEngine
from memsvc.engine.pool import DecodePool
from memsvc.memory import NonFiniteStateError
from memsvc.model import ModelState
from memsvc.sessions.api import (
    AppendResult,
    CheckpointInfo,
    InvalidRequestError,
    ManagerClosedError,
    ManagerStats,
    ResidentSession,
    SessionBusyError,
    SessionEvent,
    SessionInfo,
    SessionNotFoundError,
    SessionObserver,
    StateRolledBackError,
    Tier,
)
from memsvc.sessions.batch import BatchAppender, Durable, Item
from memsvc.sessions.config import ManagerConfig
from memsvc.sessions.durability import SessionRepository, StateIdentity
from memsvc.sessions.fencing import Claim
from memsvc.sessions.generation import SessionGeneration
from memsvc.sessions.live import LiveSession, SessionEnv
from memsvc.sessions.maintenance import Maintenance
from memsvc.sessions.ownership import Ownership
from memsvc.sessions.portable import chunked, decode_export, encode_export
from memsvc.sessions.residency import Books, Residency
from memsvc.sessions.state_check import max_state_bytes
from memsvc.sessions.validation import check_knobs, check_name, check_session_id, token_ids
from memsvc.store.database import Database
from memsvc.store.hot_state import HotStateTracker
from memsvc.store.models import EventKind, SessionRow, SessionStatus

__all__ = ["ManagerConfig", "SessionManager"]

log = structlog.get_logger(__name__)


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
        self.engine = engine
        self.identity = StateIdentity.of(engine.model)
        self._repository = SessionRepository(
            config.data_dir,
            database,
            self.identity,
            keep=config.keep_checkpoints,
            truncate_bytes=config.wal_truncate_bytes,
        )
        ownership = Ownership(tracker, config.node_id, config.lease_ttl_ms)
        if config.advertise_address is not None:
            ownership.announce(config.advertise_address)
        self._template = engine.init_state()
        host_enabled = engine.device.type == "cuda" and config.host_budget_bytes > 0
        self._books = Books(
            {
                Tier.DEVICE: config.device_budget_bytes,
                Tier.HOST: config.host_budget_bytes if host_enabled else 0,
            }
        )
        self._env = SessionEnv(
            config=config,
            engine=engine,
            repository=self._repository,
            ownership=ownership,
            observer=observer if observer is not None else _Unobserved(),
            books=self._books,
            incarnation=f"{config.node_id}/{secrets.token_hex(8)}",
        )
        state_bytes = max_state_bytes(self._template, engine.chunk_size)
        self._residency = Residency(self._env, state_bytes, host_enabled)
        self._batches = BatchAppender(self._env, self._residency)
        self._closed = False
        self._maintenance = Maintenance(self._env)

    # ---- sessions -----------------------------------------------------------------------

    def create(self, tenant_id: str, name: str = "") -> SessionInfo:
        """A new, empty session; QuotaExceededError past the tenant's ``max_sessions``."""
        self._check_open()
        check_name(name)
        with self._repository.creating(tenant_id, name) as (_, row):
            pass
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
        infos = []
        for row in self._repository.rows(tenant_id):
            try:
                infos.append(self._info(self._record(row)))
            except (SessionNotFoundError, SessionBusyError):
                continue  # deleted or quarantined since the listing
        return infos

    def delete(self, tenant_id: str, session_id: str) -> None:
        """Deletes the session, its log and its checkpoints."""
        self._check_open()
        session = self._resolve(tenant_id, session_id)
        with self._books.holding(session):
            session.own()  # no other node may be writing it
            try:
                self._repository.delete_row(tenant_id, session_id)
            finally:
                session.unload()
            self._repository.remove(session.id)
            self._env.ownership.forget(session.id)
            self._books.forget(session, "deleted")
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
        ``expected_position``, PositionConflictError unless the stream is there.
        StateRolledBackError if the update goes non-finite (nothing changes)."""
        self._check_open()
        session = self._resolve(tenant_id, session_id)
        ids = self._token_ids(tokens)
        with self._books.holding(session):
            state = self._residency.ready(session)
            session.check_position(expected_position)
            try:
                new_state, stats = self.engine.append(state, ids)
            except NonFiniteStateError as error:
                raise session.roll_back(error, "append") from error
            end = session.append(ids, new_state)
            return session.acknowledge(ids, stats, end)

    def append_many(
        self,
        items: Sequence[
            tuple[str, str, Sequence[int]]
            | tuple[str, str, Sequence[int], int | None]
            | tuple[str, str, Sequence[int], int | None, bool]
        ],
        durable: Durable | None = None,
    ) -> list[AppendResult | Exception]:
        """Appends to many sessions with batched engine steps; per-item errors are returned.

        Items are (tenant, session, tokens[, expected position[, joins]]). Items of
        one session are applied in order (one per engine step); the results equal
        appending the items one by one (``batch.py``). An item whose update goes
        non-finite gets StateRolledBackError; the other items are unaffected.

        An item that *joins* is applied right behind the item of its session before
        it, in the same engine step and log record, and shares its fate: refused
        with it (the same error), rolled back with it. Its result is its own
        (position, tokens) except the memory statistics, which are taken after the
        last item of the step. The server joins the appends one stream sent back to
        back, so that their per-append work is paid once.

        Without ``durable`` every result is final: durable, or the item's error.
        With it, the logs sync on another thread while the caller goes on: an
        item's AppendResult here means applied (later appends build on it) but
        not yet acknowledged, and ``durable(index, outcome)`` follows once per
        such item, from that thread, in order: the same result, or the error
        that lost it. An error here is final and gets no call.
        """
        self._check_open()
        results: list[AppendResult | Exception | None] = [None] * len(items)
        prepared: list[Item] = []
        last: dict[tuple[str, str], int] = {}  # each session's latest item
        for index, (tenant_id, session_id, tokens, *rest) in enumerate(items):
            expected = rest[0] if rest else None
            joins = len(rest) > 1 and bool(rest[1])
            before = last.get((tenant_id, session_id))
            last[tenant_id, session_id] = index
            if joins and before is not None and results[before] is not None:
                results[index] = results[before]  # refused with the item it joins
                continue
            try:
                prepared.append(
                    (
                        index,
                        self._resolve(tenant_id, session_id),
                        self._token_ids(tokens),
                        expected,
                        joins,
                    )
                )
            except Exception as error:
                results[index] = error
        self._batches.run(prepared, results, durable)
        assert all(result is not None for result in results)
        return results  # type: ignore[return-value]

    def generate(
        self,
        tenant_id: str,
        session_id: str,
        prompt: Sequence[int],
        params: SamplingParams,
        pool: DecodePool | None = None,
    ) -> SessionGeneration:
        """Appends the prompt and samples; see SessionGeneration for what becomes durable when.

        The session stays locked until the iterator is exhausted or closed. A
        step that goes non-finite ends the iterator with StateRolledBackError and
        nothing of it is committed. With `pool` the generation joins it (batched with
        the pool's other generations; the caller steps the pool).
        """
        self._check_open()
        session = self._resolve(tenant_id, session_id)
        ids = self._token_ids(prompt)
        self._books.acquire(session)
        try:
            session.check_present()
            start = self._residency.ready(session)
            try:
                generation = (
                    self.engine.generate(start, ids, params)
                    if pool is None
                    else pool.join(start, ids, params)
                )
            except ValueError as error:
                raise InvalidRequestError(str(error)) from error
        except BaseException:
            self._books.release(session)
            raise

        def commit(generated: list[int], final: ModelState | None) -> None:
            tokens = torch.cat([ids, torch.tensor(generated, dtype=torch.int64, device=ids.device)])
            if final is None:
                try:
                    final, _ = self.engine.append(start, tokens)
                except NonFiniteStateError as error:
                    raise session.roll_back(error, "generate") from error
            session.append(tokens, final)

        return SessionGeneration(
            session.id,
            generation,
            commit,
            lambda: self._books.release(session),
            lambda error: session.roll_back(error, "generate"),
        )

    def query(
        self, tenant_id: str, session_id: str, prompt: Sequence[int], params: SamplingParams
    ) -> list[int]:
        """Samples an answer from a snapshot of the state; the session does not change
        (but is rolled back, and the query refused, if the snapshot's update goes non-finite)."""
        self._check_open()
        session = self._resolve(tenant_id, session_id)
        ids = self._token_ids(prompt)
        with self._books.holding(session):
            snapshot = self._residency.ready(session)
        try:
            return list(self.engine.generate(snapshot, ids, params))
        except ValueError as error:
            raise InvalidRequestError(str(error)) from error
        except NonFiniteStateError as error:
            raise self.roll_back(tenant_id, session_id, error, "query") from error

    def roll_back(
        self, tenant_id: str, session_id: str, error: NonFiniteStateError, request: str
    ) -> StateRolledBackError:
        """The error that refuses a ``request`` ("query", ...) whose update of a snapshot of
        the session went non-finite, once the session is rolled back (``LiveSession.roll_back``:
        recorded and counted). For callers that step a snapshot themselves."""
        session = self._resolve(tenant_id, session_id)
        with self._books.holding(session):
            return session.roll_back(error, request)

    def snapshot(self, tenant_id: str, session_id: str) -> ModelState:
        """The session's state now, to read without changing it (states are never
        modified in place, so later appends do not reach it)."""
        self._check_open()
        session = self._resolve(tenant_id, session_id)
        with self._books.holding(session):
            return self._residency.ready(session)

    # ---- durability and residency -------------------------------------------------------

    def checkpoint(self, tenant_id: str, session_id: str) -> CheckpointInfo:
        """Writes a checkpoint now (or returns the newest if nothing came since)."""
        self._check_open()
        session = self._resolve(tenant_id, session_id)
        with self._books.holding(session):
            self._residency.ready(session)
            if session.last_checkpoint is not None and session.position == session.durable_position:
                return session.last_checkpoint
            return session.checkpoint()

    def evict(self, tenant_id: str, session_id: str, tier: Tier = Tier.DISK) -> None:
        """Moves the state down to ``tier`` (HOST only beside a GPU); a no-op if it is lower.

        Waits for the session's current call to finish.
        """
        self._check_open()
        host = self._residency.host_enabled
        if tier is Tier.DEVICE or (tier is Tier.HOST and not host):
            raise InvalidRequestError(
                f"cannot evict to {tier}: the tiers below the device are "
                f"{'host, disk' if host else 'disk'}"
            )
        session = self._resolve(tenant_id, session_id)
        with self._books.holding(session):
            self._residency.evict(session, tier)

    def prefetch(self, tenant_id: str, session_id: str) -> None:
        """Restores the session to the device now (a stream opens); returns once it is there."""
        self._check_open()
        session = self._resolve(tenant_id, session_id)
        with self._books.holding(session):
            self._residency.ready(session)

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
        back to an older checkpoint and its knobs: the guards decide again.) If
        the checkpoint fails, the knobs hold in memory only and the error is
        raised. Recorded as a MITIGATION event with ``reason`` and ``evidence``.
        InvalidRequestError for knobs out of range (nothing changes).
        """
        self._check_open()
        check_knobs(step_scale, forget_boost)
        session = self._resolve(tenant_id, session_id)
        with self._books.holding(session):
            state = self._residency.ready(session).with_mitigation(step_scale, forget_boost)
            before = (session.step_scale, session.forget_boost)
            session.set_knobs(state, step_scale, forget_boost)
            info = session.checkpoint()
            payload = {
                "reason": reason,
                "step_scale": step_scale,
                "forget_boost": forget_boost,
                "previous_step_scale": before[0],
                "previous_forget_boost": before[1],
                "position": info.position,
                "generation": info.sequence,  # the checkpoint's number, under its first name
                "evidence": dict(evidence or {}),
            }
            self._repository.record_event(
                tenant_id, EventKind.MITIGATION, payload, session_id=session_id
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
        return self._repository.events(
            tenant_id, session_id=session_id or None, kind=event_kind, limit=limit
        )

    # ---- copies -------------------------------------------------------------------------

    def fork(self, tenant_id: str, session_id: str, name: str = "") -> SessionInfo:
        """A new session of the tenant whose memory is a copy of this one's (position included)."""
        self._check_open()
        check_name(name)
        source = self._resolve(tenant_id, session_id)
        with self._books.holding(source):
            snapshot = self._residency.ready(source)
        return self._create_from(tenant_id, name, snapshot)

    def export(
        self, tenant_id: str, session_id: str, chunk_bytes: int = 1 << 20
    ) -> Iterator[bytes]:
        """The session's state as a portable, versioned file (``portable.py``), in chunks."""
        self._check_open()
        if chunk_bytes <= 0:
            raise InvalidRequestError(f"chunk_bytes must be positive, got {chunk_bytes}")
        session = self._resolve(tenant_id, session_id)
        with self._books.holding(session):
            snapshot = self._residency.ready(session)
        return chunked(encode_export(snapshot, self.identity), chunk_bytes)

    def import_(self, tenant_id: str, chunks: Iterable[bytes], name: str = "") -> SessionInfo:
        """A new session holding an exported state; IncompatibleStateError for another model."""
        self._check_open()
        check_name(name)
        state = decode_export(chunks, self.identity, self._template, self.engine.chunk_size)
        return self._create_from(tenant_id, name, state.to(self.engine.device))

    # ---- introspection and shutdown -----------------------------------------------------

    def resident(self) -> list[ResidentSession]:
        """Sessions whose state is in a memory tier, least recently used first."""
        return self._books.resident_report()

    def stats(self) -> ManagerStats:
        """Residency per tier and counters since the manager started."""
        return self._books.stats(corruptions=self._repository.corruptions)

    def close(self) -> None:
        """Checkpoints every session with tokens since its last checkpoint, releases leases.

        Waits up to the lease TTL for each busy session (an open generation
        holds one); a session still busy then is left to its log. Later calls
        raise ManagerClosedError.
        """
        with self._books.lock:
            if self._closed:
                return
            self._closed = True
        self._maintenance.stop()
        self._batches.close()  # the acknowledgements on their way first
        sessions = self._books.all()
        for session in sessions:
            if not self._books.acquire(session, timeout=self.config.lease_ttl_ms / 1000):
                log.error("session_busy_at_close", session=session.id)
                continue
            try:
                if session.state is not None:
                    session.checkpoint_if_dirty()
                    session.unload()
            finally:
                self._books.release(session)
        self._repository.close()
        log.info("session_manager_closed", sessions=len(sessions))

    # ---- internals ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ManagerClosedError("the session manager is closed")

    def _token_ids(self, tokens: Sequence[int]) -> torch.Tensor:
        return token_ids(self.engine, tokens, self.config.max_tokens_per_append)

    def _remember(self, row: SessionRow, *, position: int | None, on_disk: bool) -> LiveSession:
        return self._books.remember(
            LiveSession(
                id=row.id,
                tenant_id=row.tenant_id,
                name=row.name,
                model_hash=row.model_hash,
                created_at=row.created_at,
                env=self._env,
                position=position,
                durable_position=row.position,
                on_disk=on_disk,
            )
        )

    def _resolve(self, tenant_id: str, session_id: str) -> LiveSession:
        """The live session, loaded from its SQL row on first use; tenant-scoped."""
        check_session_id(session_id)
        session = self._books.get(session_id)
        if session is None:
            session = self._record(self._repository.row(tenant_id, session_id))
        if session.tenant_id != tenant_id:
            raise SessionNotFoundError(f"session {session_id} not found")
        session.check_present()
        return session

    def _record(self, row: SessionRow) -> LiveSession:
        """The live session of a row read from SQL (SessionBusyError if quarantined)."""
        if row.status is SessionStatus.QUARANTINED:
            raise SessionBusyError(f"session {row.id} is quarantined")
        known = self._books.get(row.id)
        if known is not None:
            return known
        on_disk = self._repository.wal_path(row.id).exists()
        return self._remember(row, position=None, on_disk=on_disk)

    def _create_from(self, tenant_id: str, name: str, state: ModelState) -> SessionInfo:
        """A new session whose checkpoint 1 is ``state``: row, log and checkpoint in one commit."""
        ownership = self._env.ownership
        with self._repository.creating(tenant_id, name) as (db, row):
            lease = ownership.acquire(row.id)
            try:
                claim = Claim(lease.fence, self.config.node_id, self._env.incarnation)
                info = self._repository.initialise(db, row, state, claim)
            finally:
                ownership.release(row.id)
        session = self._remember(row, position=int(state.position[0]), on_disk=True)
        session.created(info, state)
        return self._info(session)

    def _info(self, session: LiveSession) -> SessionInfo:
        position = session.position
        if position is None:
            with self._books.holding(session):
                position = session.position_on_disk()
        tier = self._books.tier(session.id)
        with self._books.lock:
            resident = self._books.table.get(session.id)
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


class _Unobserved(SessionObserver):
    """The observer of a manager given none: the protocol's methods do nothing."""
