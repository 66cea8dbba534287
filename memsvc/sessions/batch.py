"""Batched appends: many sessions' tokens through shared engine steps, their logs synced at once.

``SessionManager.append_many`` hands items (index, session, tokens, expected
position) here. Items are cut into rounds where each session appears at most
once, in item order, so the items of one session apply one after another and
the results equal appending the items one by one. In each round: lock the
sessions (in id order: no deadlock), bring their states to the device, one
``step_batch``, write every log record, fsync the logs concurrently (their
fsyncs share the disk's flushes), then apply and acknowledge. Every error is
the item's own and lands in its result.

A round whose step goes non-finite is redone one session at a time: the
sessions whose own update goes non-finite are rolled back and refused
(``LiveSession.roll_back``); every other session's append goes on as if it
had been stepped alone.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from torch import Tensor

from memsvc.engine import AppendStats
from memsvc.memory import NonFiniteStateError
from memsvc.model import ModelState
from memsvc.sessions.api import AppendResult
from memsvc.sessions.config import SYNC_THREADS
from memsvc.sessions.live import LiveSession, SessionEnv
from memsvc.sessions.residency import Residency

Item = tuple[int, LiveSession, Tensor, int | None]
Results = list[AppendResult | Exception | None]


def rounds(items: list[Item]) -> list[list[Item]]:
    """Splits items into engine steps where each session appears at most once, in item order."""
    out: list[list[Item]] = []
    seen: dict[str, int] = {}
    for item in items:
        n = seen.get(item[1].id, 0)
        seen[item[1].id] = n + 1
        if n == len(out):
            out.append([])
        out[n].append(item)
    return out


class BatchAppender:
    """Runs the rounds of batched appends of one manager (module docstring)."""

    def __init__(self, env: SessionEnv, residency: Residency) -> None:
        self._env = env
        self._residency = residency
        self._sync_pool = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="memsvc-wal-sync")

    def run(self, items: list[Item], results: Results) -> None:
        for batch in rounds(items):
            self._round(batch, results)

    def close(self) -> None:
        self._sync_pool.shutdown()

    def _round(self, batch: list[Item], results: Results) -> None:
        """One engine step over sessions that each appear once; errors land in ``results``."""
        books = self._env.books
        held = []
        try:
            for item in sorted(batch, key=lambda item: item[1].id):  # one lock order
                books.acquire(item[1])
                held.append(item[1])
            ready = []
            for index, session, ids, expected in batch:
                try:
                    session.check_present()
                    state = self._residency.ready(session)
                    session.check_position(expected)
                    ready.append((index, session, ids, state))
                except Exception as error:
                    results[index] = error
            logged = []
            for (index, session, ids, _), stepped in zip(ready, self._step(ready), strict=True):
                if isinstance(stepped, Exception):
                    results[index] = stepped
                    continue
                try:
                    session.log(ids)
                    logged.append((index, session, ids, *stepped))
                except Exception as error:
                    results[index] = error
            ends = self._sync_all([item[1] for item in logged])
            for (index, session, ids, state, stats), end in zip(logged, ends, strict=True):
                if isinstance(end, Exception):
                    results[index] = end
                    continue
                session.apply(ids, state)
                results[index] = session.acknowledge(ids, stats, end)
        finally:
            for session in held:
                books.release(session)

    def _step(
        self, ready: list[tuple[int, LiveSession, Tensor, ModelState]]
    ) -> list[tuple[ModelState, AppendStats] | Exception]:
        """Each session's new state and stats, or its error; one batched step if it stays
        finite, else each session alone (module docstring)."""
        if not ready:
            return []
        engine = self._env.engine
        try:
            return list(engine.step_batch([r[3] for r in ready], [r[2] for r in ready]))
        except NonFiniteStateError:
            pass
        except Exception as error:
            return [error] * len(ready)
        alone: list[tuple[ModelState, AppendStats] | Exception] = []
        for _, session, ids, state in ready:
            try:
                alone.append(engine.append(state, ids))
            except NonFiniteStateError as error:
                alone.append(session.roll_back(error, "append"))
            except Exception as error:
                alone.append(error)
        return alone

    def _sync_all(self, sessions: list[LiveSession]) -> list[int | Exception]:
        """``LiveSession.sync`` of several logs at once; each one's end offset or error."""

        def sync(session: LiveSession) -> int | Exception:
            try:
                return session.sync()
            except Exception as error:
                return error

        if len(sessions) == 1:
            return [sync(sessions[0])]
        return list(self._sync_pool.map(sync, sessions))
