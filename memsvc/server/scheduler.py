"""Model work off the event loop, with continuous batching of appends.

All model work (appends, queries, generations) runs on one worker thread,
so the event loop never blocks and forwards never compete for the cores.
Appends that wait while a step runs are taken together into the next
`SessionManager.append_many` call, which batches their chunks into shared
forwards: the more sessions stream at once, the bigger the batches, with no
timer holding a lone request back. Appends of one session apply in the order
they arrived (append_many keeps the order of a session's items).

An append whose caller is gone (stream cancelled) or whose deadline passed
before its step starts is dropped unseen; once its step started it completes
(and is durable) even if nobody is left to hear the acknowledgement.

The acknowledged appends of a step then go to the `StreamGuards` (metrics and
guards), as the next job of the model thread: the acknowledgements do not wait
for them, and they see a session's appends in order.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import structlog

from memsvc.engine import SamplingParams
from memsvc.server.status import DeadlineExceededError
from memsvc.sessions.api import AppendResult

if TYPE_CHECKING:
    from memsvc.server.guards import StreamGuards
    from memsvc.sessions.manager import SessionManager

log = structlog.get_logger(__name__)

T = TypeVar("T")


@dataclass
class _Append:
    tenant_id: str
    session_id: str
    tokens: Sequence[int]
    expected_position: int | None
    done: asyncio.Future[AppendResult]
    deadline: float | None  # time.monotonic() after which nobody waits for it
    received: float  # time.monotonic() when it was queued


class Scheduler:
    """Runs a SessionManager's model work; create and use it on the server's event loop."""

    def __init__(self, manager: SessionManager, guards: StreamGuards | None = None) -> None:
        self._manager = manager
        self._guards = guards
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memsvc-model")
        self._queue: deque[_Append] = deque()
        self._wakeup = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self) -> None:
        self._runner = asyncio.get_running_loop().create_task(self._run(), name="scheduler")

    async def append(
        self,
        tenant_id: str,
        session_id: str,
        tokens: Sequence[int],
        timeout_s: float | None,
        expected_position: int | None = None,
    ) -> AppendResult:
        """Appends through the next batched step; returns once the tokens are durable.
        If timeout_s passes before its step starts, it is dropped (DeadlineExceededError).
        expected_position: see SessionManager.append."""
        done: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        now = time.monotonic()
        deadline = None if timeout_s is None else now + timeout_s
        self._queue.append(
            _Append(tenant_id, session_id, tokens, expected_position, done, deadline, now)
        )
        self._idle.clear()
        self._wakeup.set()
        return await done

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """Runs other model work (a query) on the model thread."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def call_soon(self, fn: Callable[..., object], *args: object) -> None:
        """Queues work on the model thread without waiting for it; its errors are logged."""
        self._worker.submit(_logging_errors, fn, *args)

    def generate(
        self, tenant_id: str, session_id: str, prompt: Sequence[int], params: SamplingParams
    ) -> tuple[AsyncIterator[int], asyncio.Future[str | None]]:
        """Samples on the model thread; returns the tokens as they come and the finish reason.

        The whole generation is one job: a generation holds its session's lock
        until it ends, so its steps must not queue behind model work that waits
        for that lock. Leaving the iteration early stops the sampling; what was
        sampled by then becomes part of the stream.
        """
        loop = asyncio.get_running_loop()
        sampled: asyncio.Queue[int | None] = asyncio.Queue()
        stop = threading.Event()

        def run() -> str | None:
            try:
                steps = self._manager.generate(tenant_id, session_id, prompt, params)
                try:
                    for token in steps:
                        loop.call_soon_threadsafe(sampled.put_nowait, token)
                        if stop.is_set():
                            break
                finally:
                    steps.close()  # commits what was sampled, releases the session
                return steps.finish_reason
            finally:
                loop.call_soon_threadsafe(sampled.put_nowait, None)

        async def tokens() -> AsyncIterator[int]:
            try:
                while (token := await sampled.get()) is not None:
                    yield token
            finally:
                stop.set()

        return tokens(), loop.run_in_executor(self._worker, run)

    async def close(self) -> None:
        """Finishes the queued appends, then stops the worker (after the server stopped)."""
        await self._idle.wait()
        if self._runner is not None:
            self._runner.cancel()
        self._worker.shutdown(wait=True)

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                for item, result in await self.call(self._apply_waiting):
                    if item.done.done():
                        continue
                    if isinstance(result, Exception):
                        item.done.set_exception(result)
                    else:
                        item.done.set_result(result)
            self._idle.set()

    def _apply_waiting(self) -> list[tuple[_Append, AppendResult | Exception]]:
        """On the model thread: every append waiting now, in one step.

        The batch is taken here, when the thread is free, not when the appends
        arrived: whatever queued up while it was busy (a long query, the previous
        step) shares this step. Appends whose caller is gone or whose deadline has
        passed are dropped unapplied.
        """
        batch = []
        while self._queue:
            batch.append(self._queue.popleft())  # deque pops are atomic
        now = time.monotonic()
        live = [
            i
            for i, item in enumerate(batch)
            if not item.done.done() and (item.deadline is None or now < item.deadline)
        ]
        late = DeadlineExceededError("the deadline passed before the append was applied")
        results: list[AppendResult | Exception] = [late] * len(batch)
        if live:
            items = [
                (
                    batch[i].tenant_id,
                    batch[i].session_id,
                    batch[i].tokens,
                    batch[i].expected_position,
                )
                for i in live
            ]
            try:
                applied = self._manager.append_many(items)
            except Exception as error:  # the whole step failed: each caller hears why
                log.exception("append_step_failed", appends=len(items))
                applied = [error] * len(items)
            for i, result in zip(live, applied, strict=True):
                results[i] = result
        if self._guards is not None:
            durable = time.monotonic()
            acknowledged = [
                (item.tenant_id, result, durable - item.received, item.tokens)
                for item, result in zip(batch, results, strict=True)
                if isinstance(result, AppendResult)
            ]
            if acknowledged:
                self.call_soon(self._observe, acknowledged)
        return list(zip(batch, results, strict=True))

    def _observe(self, acknowledged: list[tuple[str, AppendResult, float, Sequence[int]]]) -> None:
        assert self._guards is not None
        for tenant_id, result, seconds, tokens in acknowledged:
            self._guards.observe(tenant_id, result, seconds, tokens)


def _logging_errors(fn: Callable[..., object], *args: object) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("model_thread_job_failed", job=getattr(fn, "__name__", repr(fn)))
