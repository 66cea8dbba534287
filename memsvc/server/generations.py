"""Generations and queries that the scheduler advances one token per step.

Both sample in the scheduler's `DecodePool`: every step, one batched decoder
step gives every running generation of every session its next token, and a
run takes it from there (`PooledGeneration`; `NoTokenYet` until the pool has
stepped since its last one).

`GenerateRun` is a Generate: it holds its session (`SessionGeneration`) and
hands tokens to the client's stream in lockstep with it: tokens are given out
only after the previous ones were written, up to `HANDOVER` at a time (what the
pool has sampled), and each handover goes out as one message. The first token goes
out at once; after it a handover waits for `HANDOVER` tokens, or `HANDOVER_WAIT_S`
after the previous write, or the end. The pool may
sample ahead of the writes (`DecodePool.ahead`, then the session is parked),
but only what was written counts: when the client cancels, or the deadline
ends the call, the session commits the prompt and exactly the tokens written
(a token counts once the server has finished writing its message); tokens
sampled but not written are dropped. Run to its end, everything sampled was
written.

`QueryRun` is a Query: it samples from a snapshot of the state, so nothing
it does changes the session. Its prompt is read in pieces (one per step),
and past its deadline, or once its caller is gone, it stops within one step.

The event loop owns the public side (`tokens`, `delivered`, `abandon`,
`answer`); the model thread calls `advance` and `stop` (the scheduler's
step). Flags cross threads as single attribute writes.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence

import torch

from memsvc.engine import DecodePool, NoTokenYet, PooledGeneration, SamplingParams, StreamingEngine
from memsvc.memory import NonFiniteStateError
from memsvc.model import ModelState
from memsvc.server.fairness import SAMPLED_TOKEN_COST
from memsvc.server.status import DeadlineExceededError
from memsvc.sessions.api import InvalidRequestError
from memsvc.sessions.generation import SessionGeneration

_END = object()
HANDOVER = 16  # tokens a Generate hands its stream at most per step
# A hand-over waits for HANDOVER tokens, or this long after the previous one was written
# (the first token goes out at once): one message per token had cost the event loop and
# the client more than the model's step (about one token per message at one stream).
HANDOVER_WAIT_S = 0.002


class Run(ABC):
    """What the scheduler needs of a generation or a query."""

    def __init__(self, tenant_id: str, session_id: str, deadline: float | None) -> None:
        self.tenant_id = tenant_id
        self.session_id = session_id
        self.deadline = deadline  # time.monotonic(); None: none
        self.abandoned = False  # the caller is gone (set on the event loop)
        self.finished = False  # set on the model thread once it ended and committed

    def ready(self) -> bool:
        """Whether a step may advance it now."""
        return not self.finished

    def cost(self) -> int:
        """Fair-share units of its next advance."""
        return SAMPLED_TOKEN_COST

    def expired(self, now: float) -> bool:
        return self.abandoned or (self.deadline is not None and now >= self.deadline)

    @abstractmethod
    def advance(self) -> None:
        """One step's work (model thread)."""

    @abstractmethod
    def stop(self) -> None:
        """Ends it early, past its deadline or with its caller gone (model thread)."""

    @abstractmethod
    def fail(self, error: Exception) -> None:
        """Ends it with `error`: the pool it samples in broke (model thread)."""


class GenerateRun(Run):
    """A Generate in lockstep with its stream (module docstring)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        start: Callable[[], SessionGeneration],
        wake: Callable[[], None],
        tenant_id: str,
        session_id: str,
        deadline: float | None,
    ) -> None:
        super().__init__(tenant_id, session_id, deadline)
        self._loop = loop
        self._start = start
        self._wake = wake  # tells the model thread it may step this run again
        self._generation: SessionGeneration | None = None
        self._out: asyncio.Queue[object] = asyncio.Queue()
        self._sampled = 0  # model thread
        self._written = 0  # event loop
        self._written_at = 0.0  # event loop: time.monotonic() of the last write
        self.finish_reason: str | None = None
        self.ended = asyncio.Event()  # set once it ended and committed

    # ---- event loop --------------------------------------------------------------------

    async def tokens(self) -> AsyncIterator[list[int]]:
        """The sampled tokens, each time all that the model thread has handed over (one
        message's worth); call `delivered` after writing them."""
        while (item := await self._out.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, list)
            yield item

    def delivered(self, count: int) -> None:
        """The last `count` tokens given out have been written to the client: sample on."""
        self._written += count
        self._written_at = time.monotonic()
        self._wake()

    def abandon(self) -> None:
        self.abandoned = True
        self._wake()

    # ---- model thread ------------------------------------------------------------------

    def ready(self) -> bool:
        if self.finished or self._sampled != self._written:
            return False
        if self._generation is None or not self._sampled:  # to start, and its first token
            return True
        late = time.monotonic() - self._written_at >= HANDOVER_WAIT_S
        return self._generation.due(HANDOVER, late)

    def expired(self, now: float) -> bool:
        # The deadline ends the call on the event loop (the stream is cancelled, and
        # `abandon` follows): judged there, what was written is known exactly.
        return self.abandoned

    def advance(self) -> None:
        if self._generation is None:
            try:
                self._generation = self._start()  # joins the pool: tokens from its next step
            except Exception as error:
                self._end(_translated(error))
            return
        tokens: list[int] = []
        end: object | None = None
        try:
            while len(tokens) < HANDOVER:
                tokens.append(next(self._generation))
        except NoTokenYet:
            pass
        except StopIteration:
            self.finish_reason = self._generation.finish_reason
            end = _END
        except Exception as error:
            end = error
        if tokens:
            self._sampled += len(tokens)
            self._loop.call_soon_threadsafe(self._out.put_nowait, tokens)
        if end is not None:
            self._end(end)

    def stop(self) -> None:
        self._close(None)

    def fail(self, error: Exception) -> None:
        self._close(error)

    def _close(self, error: Exception | None) -> None:
        """Commits what the client received, then ends the stream (with `error`, if any)."""
        if self._generation is not None:
            try:
                self._generation.close(keep=self._written)
            except Exception as closing:
                error = closing
        self._end(_END if error is None else error)

    def _end(self, item: object) -> None:
        self.finished = True
        self._loop.call_soon_threadsafe(self._out.put_nowait, item)
        self._loop.call_soon_threadsafe(self.ended.set)


class QueryRun(Run):
    """A Query on a snapshot (module docstring)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        engine: StreamingEngine,
        pool: DecodePool,
        snapshot: ModelState,
        prompt: Sequence[int],
        params: SamplingParams,
        piece_tokens: int,
        tenant_id: str,
        session_id: str,
        deadline: float | None,
        roll_back: Callable[[NonFiniteStateError], Exception],
    ) -> None:
        super().__init__(tenant_id, session_id, deadline)
        self._loop = loop
        self._engine = engine
        self._pool = pool
        self._roll_back = roll_back  # a non-finite step: the session's refusal, recorded
        self._state = snapshot
        self._params = params
        ids = torch.as_tensor(list(prompt), dtype=torch.int64)
        # All but the last piece are read as appends to the snapshot; sampling starts
        # from the last piece.
        self._pieces = list(ids.split(piece_tokens))
        self._generation: PooledGeneration | None = None
        self._sampled: list[int] = []
        self.answer: asyncio.Future[list[int]] = loop.create_future()

    def cost(self) -> int:
        if self._generation is None and len(self._pieces) > 1:
            return len(self._pieces[0])
        return SAMPLED_TOKEN_COST

    def advance(self) -> None:
        try:
            if self._generation is None:
                if len(self._pieces) > 1:
                    self._state, _ = self._engine.append(self._state, self._pieces.pop(0))
                    return
                self._generation = self._pool.join(self._state, self._pieces[0], self._params)
                return
            while True:  # what the pool has sampled so far, then NoTokenYet or the end
                self._sampled.append(next(self._generation))
        except NoTokenYet:
            return
        except StopIteration:
            self._end(list(self._sampled))
        except NonFiniteStateError as error:
            self._end(self._roll_back(error))
        except Exception as error:
            self._end(_translated(error))

    def stop(self) -> None:
        self._end(DeadlineExceededError("the query's deadline passed; the session is unchanged"))

    def fail(self, error: Exception) -> None:
        self._end(error)

    def _end(self, outcome: list[int] | BaseException) -> None:
        if self._generation is not None:
            self._generation.close()  # leaves the pool (nothing once it ended)
        self.finished = True
        self._loop.call_soon_threadsafe(_settle, self.answer, outcome)


def _settle(future: asyncio.Future[list[int]], outcome: list[int] | BaseException) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _translated(error: Exception) -> Exception:
    """The engine refuses bad params or prompts with ValueError: INVALID_ARGUMENT."""
    if isinstance(error, ValueError) and not isinstance(error, InvalidRequestError):
        return InvalidRequestError(str(error))
    return error
