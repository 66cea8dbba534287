"""Batched appends: many sessions' tokens through shared engine steps, their logs synced at once.

``SessionManager.append_many`` hands items (index, session, tokens, expected
position, joins) here. An item that *joins* goes in with the item of its session
before it, in the same engine step (`Group`: one forward over their tokens, one
log record, one fate): the server's appends sent back to back on one stream,
whose per-append work (a step, a record, a sync) is paid once. Groups are cut
into rounds where each session appears at most once, in item order, so the
groups of one session apply one after another and the results equal appending
the items one by one (a joined item's memory statistics are its group's, taken
after its last token). Where the engine steps sessions one by one anyway (its
C++ chunk path), each group is a round of its own, so that it is synced and
acknowledged while the next one steps. In each round: lock the
sessions (in id order: no deadlock), bring their states to the device, one
``step_batch``, write every log record, make the new states the sessions',
then settle the round: fsync the logs concurrently (their fsyncs share the
disk's flushes) and check the claims. Every error is the item's own and lands
in its result.

Settling happens before ``run`` returns, or, given ``durable``, on the
acknowledging thread while the caller steps its next appends (the server's
model thread: an fsync no longer stalls the forwards). Then ``run`` returns
each applied item's result before it is durable, and ``durable(index, outcome)``
follows from that thread, once per applied item, in the order the rounds ran:
the same result once its record is durable, or the error the sync met (the
session unloaded, its state dropped with every later one built on it). One
fsync covers every record written before it began, and a log refuses all use
after a failed one, so no later round is acknowledged over a lost record.

A round whose step goes non-finite is redone one session at a time: the
sessions whose own update goes non-finite are rolled back and refused
(``LiveSession.roll_back``); every other session's append goes on as if it
had been stepped alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog
import torch
from torch import Tensor

from memsvc.engine import AppendStats
from memsvc.memory import NonFiniteStateError
from memsvc.model import ModelState
from memsvc.sessions.api import AppendResult
from memsvc.sessions.config import SYNC_THREADS
from memsvc.sessions.live import LiveSession, Logged, SessionEnv
from memsvc.sessions.residency import Residency

log = structlog.get_logger(__name__)

Item = tuple[int, LiveSession, Tensor, int | None, bool]  # ..., expected position, joins
Results = list[AppendResult | Exception | None]
Outcome = AppendResult | Exception
Durable = Callable[[int, Outcome], None]  # (item index, its final outcome)


@dataclass
class Group:
    """Items of one session applied in one engine step, in order: the first at its
    expected position, each other right behind the one before it."""

    session: LiveSession
    expected: int | None
    members: list[tuple[int, Tensor]] = field(default_factory=list)  # (item index, tokens)

    def ids(self) -> Tensor:
        if len(self.members) == 1:
            return self.members[0][1]
        return torch.cat([ids for _, ids in self.members])

    def fail(self, results: Results, error: Exception) -> None:
        for index, _ in self.members:
            results[index] = error

    def split(self, whole: AppendResult) -> Iterator[tuple[int, AppendResult]]:
        """Each member's result from the group's: its own position and length."""
        after = sum(len(ids) for _, ids in self.members)
        for index, ids in self.members:
            after -= len(ids)
            yield (
                index,
                dataclasses.replace(whole, position=whole.position - after, appended=len(ids)),
            )


@dataclass
class Applied:
    """A group stepped and logged: its members' results, durable once ``logged`` is."""

    session: LiveSession
    logged: Logged
    results: list[tuple[int, AppendResult]]


def groups(items: list[Item]) -> list[Group]:
    """Each item alone, or with the item of its session before it when it joins."""
    out: list[Group] = []
    last: dict[str, Group] = {}
    for index, session, ids, expected, joins in items:
        group = last.get(session.id)
        if not (joins and group is not None):
            group = last[session.id] = Group(session, expected)
            out.append(group)
        group.members.append((index, ids))
    return out


def rounds(items: list[Item]) -> list[list[Group]]:
    """Splits items into engine steps where each session appears at most once, in item order."""
    out: list[list[Group]] = []
    seen: dict[str, int] = {}
    for group in groups(items):
        n = seen.get(group.session.id, 0)
        seen[group.session.id] = n + 1
        if n == len(out):
            out.append([])
        out[n].append(group)
    return out


class BatchAppender:
    """Runs the rounds of batched appends of one manager (module docstring)."""

    def __init__(self, env: SessionEnv, residency: Residency) -> None:
        self._env = env
        self._residency = residency
        self._sync_pool = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="memsvc-wal-sync")
        # One thread: the rounds' acknowledgements go out in the order the rounds ran.
        self._acks = ThreadPoolExecutor(1, thread_name_prefix="memsvc-wal-ack")

    def run(self, items: list[Item], results: Results, durable: Durable | None = None) -> None:
        if self._env.engine.steps_alone():
            # Nothing is shared between the sessions' forwards: each group is a round of
            # its own, in the caller's order, so the first is acknowledged while the
            # others step (a small append is not held back by a bulk one beside it).
            batches = [[group] for group in groups(items)]
        else:
            batches = rounds(items)
        for batch in batches:
            self._round(batch, results, durable)

    def close(self) -> None:
        """Waits for the acknowledgements on their way (call before unloading sessions)."""
        self._acks.shutdown()
        self._sync_pool.shutdown()

    def _round(self, batch: list[Group], results: Results, durable: Durable | None) -> None:
        """One engine step over sessions that each appear once; errors land in ``results``."""
        books = self._env.books
        held = []
        try:
            for group in sorted(batch, key=lambda group: group.session.id):  # one lock order
                books.acquire(group.session)
                held.append(group.session)
            ready = []
            for group in batch:
                session = group.session
                try:
                    session.check_present()
                    state = self._residency.ready(session)
                    session.check_position(group.expected)
                    ready.append((group, group.ids(), state))
                except Exception as error:
                    group.fail(results, error)
            applied: list[Applied] = []
            for (group, ids, _), stepped in zip(ready, self._step(ready), strict=True):
                if isinstance(stepped, Exception):
                    group.fail(results, stepped)
                    continue
                session = group.session
                try:
                    logged = session.log(ids)
                except Exception as error:
                    group.fail(results, error)
                    continue
                state, stats = stepped
                session.apply(ids, state)
                done = list(group.split(session.acknowledge(ids, stats, logged.end)))
                for index, result in done:
                    results[index] = result
                applied.append(Applied(session, logged, done))
            if durable is None:
                for index, outcome in self._settle(applied, locked=True):
                    results[index] = outcome
            elif applied:
                self._acks.submit(self._acknowledge, applied, durable)
        finally:
            for session in held:
                books.release(session)

    def _acknowledge(self, applied: list[Applied], durable: Durable) -> None:
        """The acknowledging thread's part of a round (module docstring)."""
        for index, outcome in self._settle(applied, locked=False):
            try:
                durable(index, outcome)
            except Exception:
                log.exception("append_acknowledgement_failed", index=index)

    def _settle(self, applied: list[Applied], *, locked: bool) -> list[tuple[int, Outcome]]:
        """Syncs the round's logs and checks their claims: each item's result or error.
        A failed session is unloaded, under its lock (``locked``: held already)."""

        def durable(item: Applied) -> Exception | None:
            try:
                item.session.make_durable(item.logged)
                return None
            except Exception as error:
                return error

        if len(applied) == 1:
            errors = [durable(applied[0])]
        else:
            errors = list(self._sync_pool.map(durable, applied))
        out: list[tuple[int, Outcome]] = []
        for item, error in zip(applied, errors, strict=True):
            if error is None:
                out.extend(item.results)
                continue
            session = item.session
            if not locked:
                self._env.books.acquire(session)
            try:
                failure = session.failed(item.logged, error)
            finally:
                if not locked:
                    self._env.books.release(session)
            lost = failure if isinstance(failure, Exception) else error
            out.extend((index, lost) for index, _ in item.results)
        return out

    def _step(
        self, ready: list[tuple[Group, Tensor, ModelState]]
    ) -> list[tuple[ModelState, AppendStats] | Exception]:
        """Each session's new state and stats, or its error; one batched step if it stays
        finite, else each session alone (module docstring)."""
        if not ready:
            return []
        engine = self._env.engine
        try:
            return list(engine.step_batch([r[2] for r in ready], [r[1] for r in ready]))
        except NonFiniteStateError:
            pass
        except Exception as error:
            return [error] * len(ready)
        alone: list[tuple[ModelState, AppendStats] | Exception] = []
        for group, ids, state in ready:
            try:
                alone.append(engine.append(state, ids))
            except NonFiniteStateError as error:
                alone.append(group.session.roll_back(error, "append"))
            except Exception as error:
                alone.append(error)
        return alone
