"""`SessionOrder`: a session's calls take effect in the order they arrived.

Appends of a session may be in flight together (the scheduler applies them
in order and batches them); every other call that reads or changes the
session (a checkpoint, fork, export, delete, a Generate, the snapshot of a
Query) is *exclusive*: it starts once every earlier call of the session has
finished, and later calls wait for it. So a checkpoint sent after an append
holds that append, and an append sent after a fork is not in the fork.

A call that is cancelled while it waits does nothing; its place in the line
is kept until the calls before it finish, so nothing behind it jumps ahead.
Used on the event loop only.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Lane:
    barrier: asyncio.Future[None] | None = None  # the newest exclusive call
    appends: set[asyncio.Future[Any]] = field(default_factory=set)  # appends since it


class SessionOrder:
    """Per-session lines of calls (module docstring)."""

    def __init__(self) -> None:
        self._lanes: dict[str, _Lane] = {}

    async def append(self, session_id: str, applied: asyncio.Future[Any]) -> None:
        """Takes an append's place in line; returns when it may be queued for the model.
        ``applied`` must complete once the append is applied or dropped."""
        lane = self._lanes.setdefault(session_id, _Lane())
        lane.appends.add(applied)
        applied.add_done_callback(lambda _: self._leave(session_id, applied))
        if lane.barrier is not None:
            await asyncio.shield(lane.barrier)

    @asynccontextmanager
    async def exclusive(self, session_id: str) -> AsyncIterator[None]:
        """Runs the body once every earlier call of the session has finished."""
        lane = self._lanes.setdefault(session_id, _Lane())
        before = [f for f in (lane.barrier, *lane.appends) if f is not None]
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        lane.barrier, lane.appends = done, set()
        done.add_done_callback(lambda _: self._leave(session_id, done))
        try:
            if before:  # waits for them, whatever their outcome (their callers hear it)
                await asyncio.shield(asyncio.wait(before))
            yield
        finally:
            pending = [f for f in before if not f.done()]
            if pending:  # cancelled while waiting: hold the place until they are done
                waiting = asyncio.ensure_future(asyncio.wait(pending))
                waiting.add_done_callback(lambda _: done.set_result(None))
            else:
                done.set_result(None)

    def waiting(self) -> int:
        """Sessions with calls in line (0 when the server is idle)."""
        return len(self._lanes)

    def _leave(self, session_id: str, future: asyncio.Future[Any]) -> None:
        lane = self._lanes.get(session_id)
        if lane is None:
            return
        lane.appends.discard(future)
        if lane.barrier is future:
            lane.barrier = None
        if lane.barrier is None and not lane.appends:
            del self._lanes[session_id]
