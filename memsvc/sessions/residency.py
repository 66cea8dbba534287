"""Residency: which sessions hold state in memory, in which tier, and moving them between tiers.

Tiers, fastest first: DEVICE (where the engine computes), HOST (pinned CPU
memory, only beside a GPU), DISK (the data directory: checkpoint + log, no
bytes counted here). DEVICE and HOST have byte budgets. When a state must be
admitted to a full tier, the least recently used sessions of that tier that
are not pinned (a pin means a call is using or moving the session) are moved
one tier down, and so on.

Three pieces: ``ResidencyTable`` keeps the books of one tier set and answers
"who must go" (not thread-safe on its own); ``Books`` guards it with the
manager's lock together with the live sessions by id, their pins and locks,
and the counters; ``Residency`` moves states: restores from disk, promotes
from the host, demotes to make room. Locks: a session's lock, then the move
lock (one mover at a time), then the books' lock, never the other way round.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from memsvc.sessions.api import (
    IncompatibleStateError,
    ManagerStats,
    QuotaExceededError,
    ResidentSession,
    SessionBusyError,
    Tier,
)
from memsvc.sessions.fencing import FenceBehindError
from memsvc.sessions.restore import Restored, UnrecoverableSessionError, restore_session

if TYPE_CHECKING:
    from memsvc.model import ModelState
    from memsvc.sessions.live import LiveSession, SessionEnv

log = structlog.get_logger(__name__)

# The order states fall in when evicted.
TIERS_DOWN = (Tier.DEVICE, Tier.HOST, Tier.DISK)


@dataclass
class Resident:
    """A session whose state is held in a memory tier."""

    tier: Tier
    nbytes: int
    last_access: float  # time.time()


class ResidencyTable:
    """Sessions per memory tier with their bytes and recency, pins, and LRU victim choice."""

    def __init__(self, budgets: dict[Tier, int]) -> None:
        self.budgets = {tier: budgets.get(tier, 0) for tier in (Tier.DEVICE, Tier.HOST)}
        self._residents: dict[str, Resident] = {}
        self._pins: Counter[str] = Counter()

    def place(self, session_id: str, tier: Tier, nbytes: int, now: float) -> None:
        """Records the session's state in ``tier`` (moving its entry if it was elsewhere)."""
        if tier not in self.budgets:
            raise ValueError(f"{tier} is not a memory tier")
        self._residents[session_id] = Resident(tier, nbytes, now)

    def remove(self, session_id: str) -> None:
        """Forgets the session's state (it went to disk or was deleted)."""
        self._residents.pop(session_id, None)

    def resize(self, session_id: str, nbytes: int) -> None:
        """Updates the bytes of a resident state (its partial-chunk buffer grows and empties)."""
        self._residents[session_id].nbytes = nbytes

    def touch(self, session_id: str, now: float) -> None:
        """Marks the session used now."""
        resident = self._residents.get(session_id)
        if resident is not None:
            resident.last_access = now

    def get(self, session_id: str) -> Resident | None:
        return self._residents.get(session_id)

    def items(self) -> list[tuple[str, Resident]]:
        return list(self._residents.items())

    def pin(self, session_id: str) -> None:
        """Protects the session from eviction until the matching ``unpin``; pins nest."""
        self._pins[session_id] += 1

    def unpin(self, session_id: str) -> None:
        self._pins[session_id] -= 1
        if self._pins[session_id] <= 0:
            del self._pins[session_id]

    def pinned(self, session_id: str) -> bool:
        return self._pins[session_id] > 0

    def used(self, tier: Tier) -> int:
        """Bytes of the states in ``tier``."""
        return sum(r.nbytes for r in self._residents.values() if r.tier == tier)

    def count(self, tier: Tier) -> int:
        return sum(1 for r in self._residents.values() if r.tier == tier)

    def victims(self, tier: Tier, nbytes: int) -> list[str]:
        """The least recently used unpinned sessions of ``tier`` whose leaving makes ``nbytes`` fit.

        Empty when it fits already. QuotaExceededError when it cannot fit even
        with every unpinned session gone (too many pinned, or ``nbytes`` over
        the budget).
        """
        budget = self.budgets[tier]
        free_now = budget - self.used(tier)
        if nbytes <= free_now:
            return []
        candidates = sorted(
            (r.last_access, session_id, r.nbytes)
            for session_id, r in self._residents.items()
            if r.tier == tier and not self.pinned(session_id)
        )
        chosen, free = [], free_now
        for _, session_id, size in candidates:
            chosen.append(session_id)
            free += size
            if nbytes <= free:
                return chosen
        raise QuotaExceededError(
            f"a state of {nbytes} bytes does not fit the {tier} budget of {budget} bytes: "
            f"{free_now} free and {free - free_now} held by sessions not in use"
        )


def tier_below(tier: Tier) -> Tier:
    """The tier a state of ``tier`` is evicted to."""
    return TIERS_DOWN[TIERS_DOWN.index(tier) + 1]


@dataclass
class Counters:
    """What the manager has done since it started (``ManagerStats``)."""

    evictions: int = 0
    restores: int = 0
    appends: int = 0
    tokens_appended: int = 0
    checkpoints: int = 0
    quarantined: int = 0
    restore_seconds: float = 0.0
    eviction_seconds: float = 0.0


class Books:
    """The live sessions by id, the residency table and the counters, under one lock.

    ``acquire`` pins a session before taking its lock: a pinned session is never
    chosen to make room, so a mover never waits on a session's lock (``make_room``).
    """

    def __init__(self, budgets: dict[Tier, int]) -> None:
        self.lock = threading.Lock()
        self.table = ResidencyTable(budgets)
        self.sessions: dict[str, LiveSession] = {}
        self.counters = Counters()

    def get(self, session_id: str) -> LiveSession | None:
        with self.lock:
            return self.sessions.get(session_id)

    def remember(self, session: LiveSession) -> LiveSession:
        """The session known under its id: ``session``, or one remembered before it."""
        with self.lock:
            return self.sessions.setdefault(session.id, session)

    def forget(self, session: LiveSession, why: str) -> None:
        """The session is gone (``why``: "deleted" or "quarantined")."""
        session.mark_gone(why)
        with self.lock:
            self.sessions.pop(session.id, None)

    def all(self) -> list[LiveSession]:
        with self.lock:
            return list(self.sessions.values())

    def resident(self) -> list[LiveSession]:
        """The sessions whose state is in a memory tier."""
        with self.lock:
            found = (self.sessions.get(session_id) for session_id, _ in self.table.items())
            return [session for session in found if session is not None]

    def tier(self, session_id: str) -> Tier | None:
        with self.lock:
            resident = self.table.get(session_id)
        return None if resident is None else resident.tier

    def place(self, session_id: str, tier: Tier, nbytes: int) -> None:
        with self.lock:
            self.table.place(session_id, tier, nbytes, time.time())

    def remove(self, session_id: str) -> None:
        with self.lock:
            self.table.remove(session_id)

    def touch(self, session_id: str) -> None:
        with self.lock:
            self.table.touch(session_id, time.time())

    def applied(self, session_id: str, nbytes: int, tokens: int) -> None:
        """An append made durable: the state's new size, and the counters."""
        with self.lock:
            self.table.resize(session_id, nbytes)
            self.counters.appends += 1
            self.counters.tokens_appended += tokens

    def count(self, **deltas: float) -> None:
        """Adds to counters by name (``Counters``)."""
        with self.lock:
            for name, delta in deltas.items():
                setattr(self.counters, name, getattr(self.counters, name) + delta)

    def resident_report(self) -> list[ResidentSession]:
        """The sessions whose state is in a memory tier, least recently used first."""
        with self.lock:
            entries = sorted(self.table.items(), key=lambda item: item[1].last_access)
            return [
                ResidentSession(
                    session_id=session_id,
                    tenant_id=session.tenant_id,
                    tier=resident.tier,
                    state_bytes=resident.nbytes,
                    position=session.position or 0,
                    last_access=resident.last_access,
                    pinned=self.table.pinned(session_id),
                    step_scale=session.step_scale,
                    forget_boost=session.forget_boost,
                    memory_norm=session.memory_norm,
                    surprise=session.surprise,
                )
                for session_id, resident in entries
                if (session := self.sessions.get(session_id)) is not None
            ]

    def stats(self, *, corruptions: int) -> ManagerStats:
        """Residency per memory tier and the counters (``corruptions``: the repository's)."""
        with self.lock:
            memory = (Tier.DEVICE, Tier.HOST)
            c = self.counters
            return ManagerStats(
                resident={tier: self.table.count(tier) for tier in memory},
                bytes_used={tier: self.table.used(tier) for tier in memory},
                budgets=dict(self.table.budgets),
                evictions=c.evictions,
                restores=c.restores,
                appends=c.appends,
                tokens_appended=c.tokens_appended,
                checkpoints=c.checkpoints,
                corruptions=corruptions,
                quarantined=c.quarantined,
                restore_seconds=c.restore_seconds,
                eviction_seconds=c.eviction_seconds,
            )

    def acquire(self, session: LiveSession, timeout: float = -1) -> bool:
        """Pins the session (no eviction) and takes its lock; pins come first, see make_room."""
        with self.lock:
            self.table.pin(session.id)
        if session.lock.acquire(timeout=timeout):
            return True
        with self.lock:
            self.table.unpin(session.id)
        return False

    def release(self, session: LiveSession) -> None:
        session.lock.release()
        with self.lock:
            self.table.unpin(session.id)

    @contextmanager
    def holding(self, session: LiveSession) -> Iterator[None]:
        """The session locked and pinned, and still there (not deleted or quarantined)."""
        self.acquire(session)
        try:
            session.check_present()
            yield
        finally:
            self.release(session)


class Residency:
    """Moves session states between the tiers; callers hold the session (``Books.holding``)."""

    def __init__(self, env: SessionEnv, state_bytes: int, host_enabled: bool) -> None:
        self.env = env
        self.books = env.books
        self.state_bytes = state_bytes  # the most one state can take (a full partial chunk)
        self.host_enabled = host_enabled
        self._move_lock = threading.Lock()  # one thread makes room in the tiers at a time

    def ready(self, session: LiveSession) -> ModelState:
        """The session's state on the device, with its lease current."""
        identity = self.env.repository.identity
        if session.model_hash != identity.model_hash:
            raise IncompatibleStateError(
                f"session {session.id} belongs to model {session.model_hash}, this node serves "
                f"{identity.model_hash}"
            )
        session.own()
        if session.state is None:
            self._restore(session)
        elif self.books.tier(session.id) is Tier.HOST:
            started = time.perf_counter()
            with self._move_lock:
                self._make_room(Tier.DEVICE, self.state_bytes)
                session.move(session.state.to(self.env.engine.device))
                self._place(session, Tier.DEVICE)
            self.env.observer.observe_restore(time.perf_counter() - started, Tier.HOST.value)
        self.books.touch(session.id)
        session.publish()
        assert session.state is not None
        return session.state

    def evict(self, session: LiveSession, tier: Tier) -> None:
        """Moves the state down to ``tier`` if it is higher."""
        current = self.books.tier(session.id)
        if current is None or TIERS_DOWN.index(current) >= TIERS_DOWN.index(tier):
            return
        with self._move_lock:
            self._demote(session, tier)

    def _restore(self, session: LiveSession) -> None:
        """Reads the session back from disk (its lease is held: ``LiveSession.own``)."""
        started = time.perf_counter()
        try:
            with self._move_lock:
                self._make_room(Tier.DEVICE, self.state_bytes)
                # Reserve the room while the state is read.
                self.books.place(session.id, Tier.DEVICE, self.state_bytes)
            try:
                restored = self._restore_claimed(session)
            except UnrecoverableSessionError as error:
                self.env.repository.quarantine(session.tenant_id, session.id, str(error))
                self.books.forget(session, "quarantined")
                self.books.count(quarantined=1)
                raise SessionBusyError(f"session {session.id} is quarantined: {error}") from error
        except BaseException:
            self.books.remove(session.id)
            self.env.ownership.release(session.id)
            raise
        session.load(restored)
        self._place(session, Tier.DEVICE)
        elapsed = time.perf_counter() - started
        self.books.count(restores=1, restore_seconds=elapsed)
        self.env.observer.observe_restore(elapsed, Tier.DISK.value)
        log.debug("session_restored", session=session.id, position=session.position, s=elapsed)
        if restored.fell_back:
            session.checkpoint_if_dirty()  # a sound newest checkpoint again

    def _restore_claimed(self, session: LiveSession) -> Restored:
        """``restore_session`` under this node's claim; a claim behind the fences on disk
        (the lease store lost its counters) has its fence raised once and tries again."""
        env = self.env
        restore = (env.repository, env.engine, session.tenant_id, session.id)
        try:
            return restore_session(*restore, env.claim(session.id))
        except FenceBehindError as error:
            env.ownership.raise_fence(session.id, error.floor)
        return restore_session(*restore, env.claim(session.id))

    def _place(self, session: LiveSession, tier: Tier) -> None:
        assert session.state is not None
        self.books.place(session.id, tier, session.state.nbytes())
        self.env.ownership.publish(session.id, tier, session.position or 0, session.write_rate)

    def _make_room(self, tier: Tier, nbytes: int) -> None:
        """Moves unpinned LRU sessions out of ``tier`` until ``nbytes`` fit (move lock held).

        A session is pinned whenever its lock is held or wanted (``Books.acquire``
        pins first), so an unpinned victim's lock is free: taking it cannot
        block, and no two threads wait on each other.
        """
        books = self.books
        while True:
            with books.lock:
                victims = books.table.victims(tier, nbytes)
                if not victims:
                    return
                victim = books.sessions[victims[0]]
                if not victim.lock.acquire(blocking=False):
                    raise RuntimeError(f"session {victim.id} is locked but not pinned")
                books.table.pin(victim.id)
            try:
                self._demote(victim, tier_below(tier))
            finally:
                books.release(victim)

    def _demote(self, session: LiveSession, tier: Tier) -> None:
        """Moves a state to ``tier`` (HOST or DISK); the session and the move lock are held."""
        started = time.perf_counter()
        assert session.state is not None
        nbytes = session.state.nbytes()
        if tier is Tier.HOST and nbytes > self.books.table.budgets[Tier.HOST]:
            tier = Tier.DISK
        if tier is Tier.HOST:
            self._make_room(Tier.HOST, nbytes)
            session.move(session.state.map(lambda t: t.to("cpu").pin_memory()))
            self._place(session, Tier.HOST)
        else:
            session.checkpoint_if_dirty()
            self.env.ownership.publish(
                session.id, Tier.DISK, session.position or 0, session.write_rate
            )
            session.unload()
        elapsed = time.perf_counter() - started
        self.books.count(evictions=1, eviction_seconds=elapsed)
        self.env.observer.observe_eviction(elapsed, tier.value)
        log.debug("session_evicted", session=session.id, tier=tier.value, s=elapsed)
