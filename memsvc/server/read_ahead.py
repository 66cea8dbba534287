"""`ReadAhead`: a Stream's requests read ahead of its answers.

Appends are handed to the scheduler as they arrive, up to ``depth`` in
flight, so the model thread holds the stream's next append before the last
one is acknowledged (an agent streaming with a window of appends keeps it busy
instead of waiting a round trip per append), and their answers go out in
request order. Any other request (a query, a generate, a bad one) waits until
every append before it is answered, and nothing after it is read until it is
handled: it sees the session where the stream's appends left it.

The appends in flight form an `AppendChain`: each goes in only after the one
before it is applied, at the position that one left, and none goes in once one
before it failed, so a stream that ends at its first error leaves no gap
behind it. Used on the event loop only.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from memsvc.server.scheduler import AppendChain

if TYPE_CHECKING:
    from memsvc.proto.v1 import memsvc_pb2 as pb
    from memsvc.sessions.api import AppendResult

DEPTH = 8  # appends of one stream in flight at once (the SDK's window is smaller)

Entry = tuple["pb.StreamRequest", "asyncio.Task[AppendResult] | None"]
Append = Callable[["pb.StreamRequest", AppendChain], Awaitable["AppendResult"]]


class Reader(Protocol):
    async def next(self, requests: AsyncIterator[pb.StreamRequest]) -> pb.StreamRequest | None: ...


class ReadAhead:
    """The stream's requests in order, each append already on its way (module docstring).

    ``next()`` gives (request, task): the task of an append (await it, then call
    ``answered()``), None for any other request (handle it, then call
    ``resume()``); None at the end of the stream. ``close()`` cancels what is
    still in flight: an append not yet applied is dropped (the scheduler's
    abandoned appends), one applied is durable and unacknowledged, as when a
    client goes away.
    """

    def __init__(
        self,
        requests: AsyncIterator[pb.StreamRequest],
        reader: Reader,
        append: Append,
        depth: int = DEPTH,
    ) -> None:
        self.chain = AppendChain()
        self._append = append
        self._room = asyncio.Semaphore(depth)
        self._queue: asyncio.Queue[Entry | BaseException | None] = asyncio.Queue()
        self._resume = asyncio.Event()
        self._tasks: list[asyncio.Task[AppendResult]] = []
        self._reading = asyncio.ensure_future(self._read(requests, reader))

    async def next(self) -> Entry | None:
        entry = await self._queue.get()
        if isinstance(entry, BaseException):
            raise entry
        if entry is not None and entry[1] is not None:
            self._tasks.remove(entry[1])
        return entry

    def answered(self) -> None:
        """An append's answer went out: room for one more in flight."""
        self._room.release()

    def resume(self) -> None:
        """A request other than an append was handled: read on. The appends after it
        start a chain of their own (a generate moved the session on)."""
        self.chain = AppendChain()
        self._resume.set()

    def close(self) -> None:
        self._reading.cancel()
        for task in self._tasks:
            task.cancel()
            task.add_done_callback(_consume)
        self._tasks.clear()

    async def _read(self, requests: AsyncIterator[pb.StreamRequest], reader: Reader) -> None:
        try:
            while (request := await reader.next(requests)) is not None:
                if request.WhichOneof("op") == "append":
                    await self._room.acquire()
                    task = asyncio.ensure_future(self._chained(request))
                    self._tasks.append(task)
                    self._queue.put_nowait((request, task))
                else:
                    self._resume.clear()
                    self._queue.put_nowait((request, None))
                    await self._resume.wait()
            self._queue.put_nowait(None)
        except Exception as error:  # the stream broke or the server is stopping
            self._queue.put_nowait(error)

    async def _chained(self, request: pb.StreamRequest) -> AppendResult:
        try:
            return await self._append(request, self.chain)
        except BaseException:
            self.chain.broken = True  # nothing sent after it may go in
            raise


def _consume(task: asyncio.Task[AppendResult]) -> None:
    """Retrieves the outcome nobody waits for (asyncio would warn of it)."""
    if not task.cancelled():
        task.exception()
