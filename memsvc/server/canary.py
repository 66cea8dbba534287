"""The recall canary of a server (`memsvc serve --canary-interval`): `memsvc.eval.canary`
against an internal tenant, through this server's own scheduler and session manager.

The canary tenant (CANARY_TENANT) is created on first use and holds one
session per node, named after the node; a session a crashed process left
behind is deleted when the next one starts, and a round that fails deletes
its session. Each round's recall goes to `memsvc_canary_recall` and to the
canary session's guard (`StreamGuards.observe_recall`). Its appends go
through the scheduler like any other, so they count in the stream metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

import structlog
from sqlalchemy.exc import IntegrityError

from memsvc.engine import SamplingParams
from memsvc.eval.canary import CanaryResult, RecallCanary, run_canary
from memsvc.obs.metrics import ServiceMetrics
from memsvc.server.guards import StreamGuards
from memsvc.server.scheduler import Scheduler
from memsvc.store import metadata
from memsvc.store.database import Database
from memsvc.store.errors import AlreadyExistsError

if TYPE_CHECKING:
    from memsvc.sessions.manager import SessionManager

log = structlog.get_logger(__name__)

T = TypeVar("T")

CANARY_TENANT = "memsvc-canary"
CANARY_MAX_SESSIONS = 10_000  # one per node
# One fact per round in a fresh session: what every shipped model promises (a fact
# beyond the window, in synthetic or real text). Measured over 24 rounds in process:
# default 24/24, titans-deep 21/24, reference-v1 9/24; 8 keyed facts in one kept
# session read 0-1/8 on all of them, which would keep MemsvcCanaryRecallLow firing.
CANARY_FACTS = 1
CANARY_ROUNDS_PER_SESSION = 1
CALL_TIMEOUT_S = 600.0  # one append or query of a round; a stuck server fails the round


class CanaryStoppedError(Exception):
    """The server is stopping: the round in flight gives up."""


class ServiceCanary:
    """Runs a RecallCanary every `interval_s` seconds on the server's event loop."""

    def __init__(
        self,
        manager: SessionManager,
        scheduler: Scheduler,
        guards: StreamGuards,
        metrics: ServiceMetrics,
        database: Database,
        interval_s: float,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"the canary interval must be positive, got {interval_s}")
        self._manager = manager
        self._scheduler = scheduler
        self._guards = guards
        self._metrics = metrics
        self._database = database
        self.interval_s = interval_s
        self.name = f"canary {manager.config.node_id}"
        self.tenant_id = ""
        self.session_id: str | None = None  # the canary's session now
        self._stopping = threading.Event()
        self._calling = threading.Lock()  # held while a call of the round is in the manager
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.tenant_id = await asyncio.to_thread(self._tenant)
        await asyncio.to_thread(self._delete_leftovers)
        canary = RecallCanary(
            self._create,
            self._append,
            self._query,
            delete=self._delete,
            facts=CANARY_FACTS,
            rounds_per_session=CANARY_ROUNDS_PER_SESSION,
        )
        self._task = self._loop.create_task(
            run_canary(canary, self.interval_s, self._metrics, self._on_result), name="canary"
        )
        log.info("canary_started", interval_s=self.interval_s, tenant=self.tenant_id)

    async def stop(self) -> None:
        """Ends the schedule, waits for the call in flight, deletes the canary's session.
        Call it before the scheduler and the manager close."""
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.to_thread(self._calling.acquire)
        try:
            if self.session_id is not None:
                await asyncio.to_thread(self._delete_now, self.session_id)
        finally:
            self._calling.release()

    # ---- the round's calls, on a worker thread ------------------------------------------

    def _create(self) -> str:
        with self._call():
            self.session_id = self._manager.create(self.tenant_id, self.name).session_id
            return self.session_id

    def _append(self, session_id: str, tokens: Sequence[int]) -> None:
        most = self._manager.config.max_tokens_per_append  # a round may bring more
        for start in range(0, len(tokens), most):
            piece = tokens[start : start + most]
            with self._call():
                self._on_loop(self._scheduler.append(self.tenant_id, session_id, piece, None))

    def _query(self, session_id: str, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, seed=0)
        with self._call():
            return self._on_loop(
                self._scheduler.query(self.tenant_id, session_id, prompt, params, None)
            )

    def _delete(self, session_id: str) -> None:
        if self._stopping.is_set():
            return  # stop() deletes it
        with self._call():
            self._delete_now(session_id)

    @contextlib.contextmanager
    def _call(self) -> Iterator[None]:
        """One call of a round into the server; refused once the server is stopping."""
        with self._calling:
            if self._stopping.is_set():
                raise CanaryStoppedError("the server is stopping")
            yield

    def _on_loop(self, coroutine: Awaitable[T]) -> T:
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)  # type: ignore[arg-type]
        return future.result(CALL_TIMEOUT_S)

    # ---- bookkeeping --------------------------------------------------------------------

    def _on_result(self, result: CanaryResult) -> None:
        self._scheduler.call_soon(
            self._guards.observe_recall, self.tenant_id, result.session_id, result.recall
        )

    def _delete_now(self, session_id: str) -> None:
        self._manager.delete(self.tenant_id, session_id)
        self._scheduler.call_soon(self._guards.forget, session_id)
        if self.session_id == session_id:
            self.session_id = None

    def _tenant(self) -> str:
        """The canary tenant's id, created on first use (by whichever node comes first)."""
        for _ in range(2):
            with self._database.unit_of_work() as db:
                tenant = metadata.find_tenant(db, CANARY_TENANT)
                if tenant is not None:
                    return tenant.id
            try:
                with self._database.unit_of_work() as db:
                    tenant, _key = metadata.create_tenant(
                        db, CANARY_TENANT, max_sessions=CANARY_MAX_SESSIONS
                    )
                    return tenant.id
            except (AlreadyExistsError, IntegrityError):
                continue  # another node created it meanwhile
        raise RuntimeError(f"cannot create or find the tenant {CANARY_TENANT}")

    def _delete_leftovers(self) -> None:
        """Deletes this node's canary sessions an earlier process left (it crashed)."""
        for info in self._manager.list(self.tenant_id):
            if info.name == self.name:
                self._manager.delete(self.tenant_id, info.session_id)
                log.info("canary_leftover_deleted", session=info.session_id)
