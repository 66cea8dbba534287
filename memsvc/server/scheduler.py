"""The model thread and its steps: iteration-level scheduling of appends, generations
and queries, fair between tenants.

All model work runs on one thread, so the event loop never blocks and forwards
never compete for the cores. The thread runs *steps*. A step serves up to
``step_tokens`` units of work (an appended token is 1, a sampled token
`SAMPLED_TOKEN_COST`): every running generation and query advances by one
token, sampled for all of them in one batched decoder step (`DecodePool`), and
the appends waiting now are applied together in one
`SessionManager.append_many` call (batched forwards). No request holds the
thread for more than one step: a bulk append is cut into ``segment_tokens``
segments, each durable once applied, that take turns with other work; a long
query prompt is read one segment per step.

Who gets a step's units is decided by `FairShare` (least-served tenant first),
so one tenant's long generations or bulk appends cannot starve another
tenant's small appends. Between steps the thread runs one queued job
(`call`, `call_soon`: the canary, the guards' mitigations). The guards observe
each acknowledged append on a thread of their own (`StreamGuards`), off the
model thread.

Appends one stream sent back to back and taken in the same step go in
together: one forward and one log record (`SessionManager.append_many`'s
joins), so a stream with several appends in flight pays the per-append work
once per step (the proto's AppendAck says what its acknowledgements carry).

Deadlines and cancellation stop a request's work within one step:
- an append whose caller is gone or whose deadline passed is not continued:
  DEADLINE_EXCEEDED, whose message says how many of its tokens went in (those
  are durable; the session's position says where the stream is);
- a Query stops and changes nothing (`QueryRun`);
- a Generate commits exactly the tokens written to its client (`GenerateRun`).

Order: `SessionOrder` keeps a session's calls in the order they arrived;
appends of one session apply in that order. Limits: ``max_new_tokens`` per
request and ``max_generations_per_tenant`` running at once (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import structlog
import torch

from memsvc.engine import SamplingParams
from memsvc.server.fairness import FairShare
from memsvc.server.generations import GenerateRun, QueryRun, Run
from memsvc.server.ordering import SessionOrder
from memsvc.server.status import DeadlineExceededError
from memsvc.sessions.api import AppendResult, QuotaExceededError, SessionBusyError

if TYPE_CHECKING:
    from prometheus_client import Histogram

    from memsvc.server.guards import StreamGuards
    from memsvc.sessions.manager import SessionManager

log = structlog.get_logger(__name__)

T = TypeVar("T")

_BROKEN = "an append sent before this one on the stream failed, so this one was not applied"
DEADLINE_MARGIN_S = 0.5  # at most this (and 20% of the timeout) before an append's deadline


@dataclass(frozen=True)
class SchedulerConfig:
    """How the model thread's time is cut and shared (module docstring)."""

    segment_tokens: int = 256  # a bulk append takes turns in pieces of this many tokens
    step_tokens: int = 1024  # units of work per step (a sampled token costs 16)
    max_new_tokens: int = 4096  # the most a Query or Generate may ask for
    max_generations_per_tenant: int = 4  # Queries and Generates running at once

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if value < 1:
                raise ValueError(f"SchedulerConfig.{name} must be >= 1, got {value}")


@dataclass(eq=False)
class _Append:
    tenant_id: str
    session_id: str
    tokens: Sequence[int]  # as sent (the guards read them)
    expected_position: int | None
    done: asyncio.Future[AppendResult]
    deadline: float | None  # time.monotonic() after which nobody waits for it
    received: float  # time.monotonic() when it was queued
    ids: torch.Tensor  # the tokens as the engine takes them, made on the event loop
    applied: int = 0  # tokens stepped and logged (the next segment starts here)
    position: int | None = None  # the session's, after them: where the next segment must go
    # Below: under the scheduler's lock (the acknowledging thread changes them too).
    durable: int = 0  # tokens durable so far
    syncing: int = 0  # segments applied, waiting for their log's fsync
    result: AppendResult | None = None  # of the last durable segment
    error: Exception | None = None  # a segment failed: what the caller hears
    late: bool = False  # its deadline passed or its caller left: no more segments
    answered: bool = False
    abandoned: bool = False  # the caller is gone
    # The append sent before it on the same stream (`AppendChain`), until it is taken.
    after: _Append | None = None
    chain: AppendChain | None = field(default=None, repr=False)

    def expired(self, now: float) -> bool:
        return self.abandoned or (self.deadline is not None and now >= self.deadline)

    def blocked(self) -> bool:
        """Its stream's append before it is not all applied yet (lock held)."""
        before = self.after
        return before is not None and before.applied < len(before.tokens)

    def broken(self) -> bool:
        """An append before it on its stream failed, ran late or was dropped: it must not
        go in, or the stream would have a gap (lock held)."""
        before = self.after
        return before is not None and (before.error is not None or before.late or before.abandoned)


class AppendChain:
    """One stream's appends, sent without waiting for each other's answers: each goes in
    only after the one before it is applied, at the position that one left (so
    nothing jumps ahead), and not at all once one before it failed (``broken``,
    also set by the stream for a request refused before it reached the scheduler).
    Used on the event loop and, under the scheduler's lock, by the model thread."""

    def __init__(self) -> None:
        self.last: _Append | None = None
        self.broken = False


class ChainBrokenError(SessionBusyError):
    """An append sent behind one that failed on the same stream; it was not applied."""


@dataclass
class _Step:
    """What one step serves: append tokens per job (in queue order) and runs to advance."""

    appends: dict[_Append, int] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)


class Scheduler:
    """Runs a SessionManager's model work; create and use it on the server's event loop."""

    def __init__(
        self,
        manager: SessionManager,
        guards: StreamGuards | None = None,
        config: SchedulerConfig | None = None,
        decode_batch: Histogram | None = None,
    ) -> None:
        self._manager = manager
        self._decode_batch = decode_batch  # observes the generations of each decoder step
        self._guards = guards
        self.config = config or SchedulerConfig()
        self._fair = FairShare()
        self._pool = manager.engine.decode_pool()  # model thread only
        self._order = SessionOrder()
        self._wake = threading.Condition()  # guards the queues below
        self._appends: dict[str, deque[_Append]] = {}  # per tenant, in arrival order
        self._runs: list[Run] = []
        self._jobs: deque[Callable[[], None]] = deque()
        self._running: dict[str, int] = {}  # runs per tenant (event loop)
        self._syncing = 0  # applied segments waiting for their fsync (under _wake)
        # The guards' observations, in acknowledgement order, off the model thread.
        self._observing = 0  # queued there (under _wake)
        self._observer = ThreadPoolExecutor(1, thread_name_prefix="memsvc-guards")
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="memsvc-model", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    # ---- appends -----------------------------------------------------------------------

    async def append(
        self,
        tenant_id: str,
        session_id: str,
        tokens: Sequence[int],
        timeout_s: float | None,
        expected_position: int | None = None,
        chain: AppendChain | None = None,
    ) -> AppendResult:
        """Appends in segments that take turns with other work; returns once all are durable.
        Past timeout_s: DeadlineExceededError saying how many tokens went in (see
        `PartialAppendError`). expected_position: see SessionManager.append. chain:
        the stream's appends in flight together (`AppendChain`)."""
        if chain is not None and chain.broken:
            raise ChainBrokenError(_BROKEN)
        loop = self._event_loop()
        now = time.monotonic()
        done: asyncio.Future[AppendResult] = loop.create_future()
        # Stop taking segments a little early, so the answer saying how much went in
        # reaches the client before gRPC ends the call at the deadline itself.
        margin = 0.0 if timeout_s is None else min(DEADLINE_MARGIN_S, 0.2 * timeout_s)
        item = _Append(
            tenant_id,
            session_id,
            tokens,
            expected_position,
            done,
            None if timeout_s is None else now + timeout_s - margin,
            now,
            # Converted here, on the event loop, not on the model thread.
            ids=torch.tensor(tokens, dtype=torch.int64),
            chain=chain,
        )
        queued = False
        try:
            await self._order.append(session_id, done)
            self._submit(lambda: self._queue(item))
            queued = True
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            # Queued: the model thread drops it (a segment under way completes first,
            # and its session's next call waits for that).
            item.abandoned = True
            if queued:
                done.add_done_callback(_consume)
                self._poke()
            else:
                done.cancel()
            raise

    # ---- generations and queries -------------------------------------------------------

    def check_request(self, tenant_id: str, params: SamplingParams) -> None:
        """QuotaExceededError if the request asks past the server's limits (nothing done)."""
        most = self.config.max_new_tokens
        if params.max_new_tokens > most:
            raise QuotaExceededError(
                f"max_new_tokens {params.max_new_tokens} is over this server's limit of {most}"
            )
        running, cap = self._running.get(tenant_id, 0), self.config.max_generations_per_tenant
        if running >= cap:
            raise QuotaExceededError(
                f"the tenant has {running} queries and generations running, the most this "
                f"server allows at once; wait for one to finish"
            )

    @asynccontextmanager
    async def generate(
        self,
        tenant_id: str,
        session_id: str,
        prompt: Sequence[int],
        params: SamplingParams,
        timeout_s: float | None,
    ) -> AsyncIterator[GenerateRun]:
        """A Generate, stepped in lockstep with its client (`GenerateRun`): iterate its
        `tokens()`, call `delivered()` after writing each. Leaving the block early (the
        client cancelled) commits the prompt and the delivered tokens only."""
        self.check_request(tenant_id, params)
        with self._counted(tenant_id):
            segment = self.config.segment_tokens
            if len(prompt) > segment:  # all but the last segment are read as appends
                await self.append(tenant_id, session_id, prompt[:-segment], timeout_s)
                prompt = prompt[-segment:]
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            run = GenerateRun(
                self._event_loop(),
                lambda: self._manager.generate(tenant_id, session_id, prompt, params, self._pool),
                self._poke,
                tenant_id,
                session_id,
                deadline,
            )
            # The session's turn is a task of its own, so that it ends with the run
            # (its commit) even when the caller's stream is torn down without a close.
            turn = asyncio.ensure_future(self._generate_in_turn(run))
            try:
                yield run
            finally:
                run.abandon()
                await asyncio.shield(turn)

    async def _generate_in_turn(self, run: GenerateRun) -> None:
        async with self._order.exclusive(run.session_id):
            if run.abandoned:  # the caller left while it waited
                run.stop()
                return
            self._submit(lambda: self._runs.append(run))
            await run.ended.wait()

    async def query(
        self,
        tenant_id: str,
        session_id: str,
        prompt: Sequence[int],
        params: SamplingParams,
        timeout_s: float | None,
    ) -> list[int]:
        """A Query on a snapshot taken in the session's order; it stops at its deadline
        (DeadlineExceededError) and never changes the session."""
        self.check_request(tenant_id, params)
        with self._counted(tenant_id):
            async with self._order.exclusive(session_id):
                snapshot = await self.call(self._manager.snapshot, tenant_id, session_id)
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            run = QueryRun(
                self._event_loop(),
                self._manager.engine,
                self._pool,
                snapshot,
                prompt,
                params,
                self.config.segment_tokens,
                tenant_id,
                session_id,
                deadline,
                lambda error: self._manager.roll_back(tenant_id, session_id, error, "query"),
            )
            self._submit(lambda: self._runs.append(run))
            try:
                return await asyncio.shield(run.answer)
            except asyncio.CancelledError:
                run.abandoned = True
                run.answer.add_done_callback(_consume)
                self._poke()
                raise

    # ---- other work --------------------------------------------------------------------

    async def ordered(self, session_id: str, fn: Callable[..., T], *args: object) -> T:
        """Runs ``fn`` on a worker thread once the session's earlier calls have finished
        (checkpoint, fork, export, delete: they do file and SQL work, not model work)."""
        async with self._order.exclusive(session_id):
            return await asyncio.to_thread(fn, *args)

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """Runs other model work on the model thread, between two steps."""
        future: Future[T] = Future()

        def job() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as error:
                    future.set_exception(error)

        self._submit(lambda: self._jobs.append(job))
        return await asyncio.wrap_future(future)

    def call_soon(self, fn: Callable[..., object], *args: object) -> None:
        """Queues work on the model thread without waiting for it; its errors are logged."""
        self._submit(lambda: self._jobs.append(lambda: _logging_errors(fn, *args)))

    def idle(self) -> bool:
        """Nothing queued or running (the server has gone quiet)."""
        with self._wake:
            return not (
                self._runs
                or self._jobs
                or self._syncing
                or self._observing
                or any(self._appends.values())
            )

    async def close(self) -> None:
        """Finishes the queued work, then stops the model thread (after the server stopped)."""
        while not self.idle():
            await asyncio.sleep(0.01)
        with self._wake:
            self._closing = True
            self._wake.notify()
        await asyncio.to_thread(self._thread.join)
        self._observer.shutdown()

    # ---- event loop internals ----------------------------------------------------------

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "Scheduler.start() first"
        return self._loop

    def _poke(self) -> None:
        """Wakes the model thread: a run may be stepped or stopped."""
        self._submit(_nothing)

    def _queue(self, item: _Append) -> None:
        """Puts an append in its tenant's line, behind its stream's last (lock held)."""
        if item.chain is not None:
            item.after, item.chain.last = item.chain.last, item
        self._appends.setdefault(item.tenant_id, deque()).append(item)

    def _submit(self, change: Callable[[], object]) -> None:
        with self._wake:
            change()
            self._wake.notify()

    def _counted(self, tenant_id: str) -> _Counted:
        return _Counted(self._running, tenant_id)

    # ---- the model thread --------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._wake:
                while not (self._closing or self._jobs or self._has_work()):
                    self._wake.wait()
                if self._closing and not (self._jobs or self._has_work()):
                    return
                job = self._jobs.popleft() if self._jobs else None
            if job is not None:
                job()
            try:
                self._step()
            except Exception:  # a bug: keep serving the others
                log.exception("scheduler_step_failed")

    def _has_work(self) -> bool:
        now = time.monotonic()
        return (
            any(self._appends.values())
            or self._pool.stepping > 0
            or any(run.ready() or run.expired(now) for run in self._runs)
        )

    def _step(self) -> None:
        """One step: drop what expired, pick work fairly, run it, settle it."""
        now = time.monotonic()
        with self._wake:
            expired_appends = [
                a
                for q in self._appends.values()
                for a in q
                if a.expired(now) or a.done.done() or a.broken()
            ]
            answers = []
            for item in expired_appends:
                self._appends[item.tenant_id].remove(item)
                if item.broken():
                    item.error = ChainBrokenError(_BROKEN)
                item.late = True
                answers.append((item, self._verdict(item)))
            expired_runs = [run for run in self._runs if run.expired(now)]
        for item, answer in answers:
            if answer is not None:
                self._settle(item, answer)
        for run in expired_runs:
            run.stop()  # a Generate commits here, before the server counts as idle
        with self._wake:
            self._runs = [run for run in self._runs if not run.finished]
            step = self._pick()
        for run in step.runs:
            if not run.finished:
                run.advance()
        if step.appends:
            self._apply(step.appends)
        self._sample()
        with self._wake:
            self._runs = [run for run in self._runs if not run.finished]

    def _sample(self) -> None:
        """The next token of every pooled generation (one batched decoder step); the runs
        take them in the next step. A failure here (a bug) ends every run in the pool
        with the error (a Generate commits what its client received) and starts a
        fresh pool."""
        if not len(self._pool):
            return
        try:
            advanced = self._pool.step()
            if advanced and self._decode_batch is not None:
                self._decode_batch.observe(advanced)
        except Exception as error:
            log.exception("decode_step_failed", generations=len(self._pool))
            self._pool = self._manager.engine.decode_pool()
            with self._wake:
                pooled = [run for run in self._runs if not run.finished]
            for run in pooled:
                run.fail(error)

    def _pick(self) -> _Step:
        """The step's work, unit by unit to the least-served tenant (lock held)."""
        for tenant_id in [t for t, q in self._appends.items() if not q]:
            del self._appends[tenant_id]
        offers = {t: self._offers(t) for t in {*self._appends, *(r.tenant_id for r in self._runs)}}
        self._fair.wake(offers)
        step, budget = _Step(), self.config.step_tokens
        while budget > 0 and offers:
            tenant_id = self._fair.next(offers)
            assert tenant_id is not None
            unit = next(offers[tenant_id], None)
            if unit is None:
                del offers[tenant_id]
                continue
            if isinstance(unit, Run):
                step.runs.append(unit)
                cost = unit.cost()
            else:
                item, tokens = unit
                step.appends[item] = step.appends.get(item, 0) + tokens
                cost = tokens
            self._fair.charge(tenant_id, cost)
            budget -= cost
        return step

    def _offers(self, tenant_id: str) -> Iterator[Run | tuple[_Append, int]]:
        """A tenant's units in the order it wants them: each ready run once, then its
        appends' segments, round robin over its sessions (a session's in order)."""
        for run in self._runs:
            if run.tenant_id == tenant_id and run.ready():
                yield run
        lines: dict[str, deque[_Append]] = {}
        for item in self._appends.get(tenant_id, ()):
            lines.setdefault(item.session_id, deque()).append(item)
        taken: dict[_Append, int] = {}
        while lines:
            for session_id in list(lines):
                line = lines[session_id]
                item = line[0]
                if item.blocked() and not _joins(item, taken):
                    del lines[session_id]  # its stream's append before it goes in first
                    continue
                left = len(item.tokens) - item.applied - taken.get(item, 0)
                tokens = min(left, self.config.segment_tokens)
                taken[item] = taken.get(item, 0) + tokens
                if tokens == left:
                    line.popleft()
                    if not line:
                        del lines[session_id]
                yield item, tokens

    def _apply(self, picked: dict[_Append, int]) -> None:
        """The step's appends in one batched call; each job's taken segments are one item.
        Applied segments are answered from the acknowledging thread once durable
        (``_durable``), while this thread goes on with the next step."""
        jobs = list(picked)
        # An append taken right behind the one before it on its stream goes in with it,
        # in one forward and one log record (`SessionManager.append_many`'s joins).
        before = {job: job.after for job in jobs if job.after is not None and job.after in picked}
        joined = {job: job in before for job in jobs}
        items = [
            (
                job.tenant_id,
                job.session_id,
                job.ids[job.applied : job.applied + picked[job]],
                job.position if job.applied else None if joined[job] else _expected(job),
                joined[job],
            )
            for job in jobs
        ]
        for job in jobs:
            job.after = None  # taken: what came before it is settled (and may be freed)
        # Each job is counted as syncing once until its answer comes, whichever comes
        # first: the acknowledgement, or an error returned (or raised) here.
        unsettled = set(jobs)
        with self._wake:  # before the call: an acknowledgement may come before it returns
            for job in jobs:
                job.syncing += 1
            self._syncing += len(jobs)

        def durable(index: int, outcome: AppendResult | Exception) -> None:
            self._durable(jobs[index], picked[jobs[index]], outcome, unsettled)

        try:
            results = self._manager.append_many(items, durable)
        except Exception as error:  # the whole step failed: each caller hears why
            log.exception("append_step_failed", appends=len(items))
            results = [error] * len(items)
        outcomes = dict(zip(jobs, results, strict=True))
        for job, result in outcomes.items():
            if job in before and isinstance(outcomes[before[job]], Exception):
                result = ChainBrokenError(_BROKEN)  # refused with the append before it
            with self._wake:
                if isinstance(result, Exception):  # final: no acknowledgement counts now
                    if job in unsettled:
                        unsettled.discard(job)
                        job.syncing -= 1
                        self._syncing -= 1
                    job.error = job.error or result
                    self._drop(job)
                else:
                    job.applied += picked[job]
                    job.position = result.position
                    if job.applied == len(job.tokens):
                        self._drop(job)
                answer = self._verdict(job)
            if answer is not None:
                self._settle(job, answer)

    def _durable(
        self,
        job: _Append,
        tokens: int,
        outcome: AppendResult | Exception,
        unsettled: set[_Append],
    ) -> None:
        """A segment of ``job`` is durable (``outcome``: its result) or lost (the error);
        on the acknowledging thread, in the order the segments were applied. Ignored
        when its step already answered the job with an error (``_apply``)."""
        with self._wake:
            if job not in unsettled:
                return
            unsettled.discard(job)
            job.syncing -= 1
            self._syncing -= 1
            if isinstance(outcome, Exception):
                job.error = job.error or outcome
                self._drop(job)
            else:
                job.durable += tokens
                job.result = outcome
            answer = self._verdict(job)
            self._wake.notify()
        if answer is not None:
            self._settle(job, answer)

    def _verdict(self, job: _Append) -> AppendResult | Exception | None:
        """What the caller hears, once no segment of its append is on its way and the
        append is done, failed or late; None until then, or once answered (lock held)."""
        if job.answered or job.syncing:
            return None
        if job.error is not None:
            answer: AppendResult | Exception = job.error
        elif job.durable == len(job.tokens):
            assert job.result is not None
            answer = dataclasses.replace(job.result, appended=job.durable)
        elif job.late:
            answer = _late(job)
        else:
            return None
        job.answered = True
        return answer

    def _drop(self, job: _Append) -> None:
        line = self._appends.get(job.tenant_id)
        if line is not None and job in line:
            line.remove(job)

    def _settle(self, job: _Append, outcome: AppendResult | Exception) -> None:
        """Answers the caller (on the loop) and feeds the guards (on their thread)."""
        loop = self._event_loop()
        loop.call_soon_threadsafe(_resolve, job.done, outcome)
        if self._guards is not None and isinstance(outcome, AppendResult):
            seconds = time.monotonic() - job.received
            with self._wake:
                self._observing += 1
            self._observer.submit(self._observe, job.tenant_id, outcome, seconds, job.tokens)

    def _observe(
        self, tenant_id: str, result: AppendResult, seconds: float, tokens: Sequence[int]
    ) -> None:
        """The guards' look at one acknowledged append; a mitigation they decide is applied
        on the model thread, between steps."""
        guards = self._guards
        assert guards is not None
        try:
            mitigation = guards.observe(tenant_id, result, seconds, tokens)
            if mitigation is not None:
                self.call_soon(guards.apply, tenant_id, result.session_id, mitigation)
        except Exception:
            log.exception("guards_observation_failed", session=result.session_id)
        finally:
            with self._wake:
                self._observing -= 1
                self._wake.notify()


class PartialAppendError(DeadlineExceededError):
    """The deadline ended an append after some of its segments were durable."""

    def __init__(self, message: str, applied: int) -> None:
        super().__init__(message)
        self.applied = applied


class _Counted:
    """Counts a tenant's running queries and generations while it is held."""

    def __init__(self, running: dict[str, int], tenant_id: str) -> None:
        self._running, self._tenant_id = running, tenant_id

    def __enter__(self) -> None:
        self._running[self._tenant_id] = self._running.get(self._tenant_id, 0) + 1

    def __exit__(self, *exc: object) -> None:
        left = self._running[self._tenant_id] - 1
        if left:
            self._running[self._tenant_id] = left
        else:
            del self._running[self._tenant_id]


def _joins(item: _Append, taken: dict[_Append, int]) -> bool:
    """Whether ``item`` may go in behind the append before it on its stream, in the same
    step: that one is taken whole in this step, and ``item`` names no position of its own
    (one that does is checked on its own, a step later)."""
    before = item.after
    return (
        before is not None
        and item.expected_position is None
        and taken.get(before, 0) == len(before.tokens) - before.applied
    )


def _expected(job: _Append) -> int | None:
    """Where an append's first segment must go: where its caller said, else where the
    append before it on its stream left the session (None: anywhere)."""
    if job.expected_position is not None:
        return job.expected_position
    return job.after.position if job.after is not None else None


def _late(job: _Append) -> Exception:
    if job.durable == 0:
        return DeadlineExceededError("the deadline passed before the append was applied")
    position = job.result.position if job.result is not None else "?"
    return PartialAppendError(
        f"the deadline passed after {job.durable} of the append's {len(job.tokens)} tokens "
        f"went in (durable; the session is at position {position}); append the rest",
        job.durable,
    )


def _resolve(future: asyncio.Future[Any], outcome: object) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _nothing() -> None:
    """Submitted only to wake the model thread."""


def _consume(future: asyncio.Future[Any]) -> None:
    """Retrieves the outcome nobody waits for (asyncio would warn of it)."""
    if not future.cancelled():
        future.exception()


def _logging_errors(fn: Callable[..., object], *args: object) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("model_thread_job_failed", job=getattr(fn, "__name__", repr(fn)))
