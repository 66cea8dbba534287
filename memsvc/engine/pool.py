"""`DecodePool`: generations that join and leave at any step, advanced together.

A server's generations start and end at different times, so a `DecodeBatch` built
once for a fixed set of sessions does not fit it. The pool keeps one batch open:
`join` appends a session's prompt and adds the session to the batch at its current
step (decoder rows joined by concatenation, `Decoder.extend`), `step` advances every
generation in it by one token with one batched decoder step, and each
`PooledGeneration` is an iterator over its own session's tokens, like `Generation`.

Its iterator never steps the model itself: `next()` gives a token the pool has
sampled, raises `NoTokenYet` when the pool has not stepped since the last one, and
StopIteration once the generation ended (`state` and `finish_reason` set, as
`Generation` leaves them). Tokens a consumer has not taken yet are at most
`ahead`: past that the session is parked (taken out of the steps, its state kept)
until its consumer has taken half of them, so a slow reader costs the others
nothing. Parking and resuming cost a state export and a decoder build (about as
much as ten steps), so `ahead` is large enough that a reader slower than the pool
pays them once per `ahead / 2` tokens, not once per token.
`close()` ends a generation early and leaves `state` None: tokens sampled and not
taken were fed already, so a consumer that commits what it took recomputes the
state from its start (as `SessionGeneration` does).

A step whose memory update goes non-finite ends only the session at fault
(`DecodeBatch`'s replay): its iterator raises the NonFiniteStateError.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from memsvc.engine.decode import DecodeBatch
from memsvc.engine.sampling import SamplingParams
from memsvc.model import ModelState

if TYPE_CHECKING:
    from memsvc.engine.stream import StreamingEngine

DEFAULT_AHEAD = 64  # tokens a generation may sample before its consumer takes them


class NoTokenYet(Exception):
    """The pool has not sampled this generation's next token yet: step the pool."""


class DecodePool:
    """Open generations of any sessions, one batched decoder step per `step`."""

    def __init__(self, engine: StreamingEngine, ahead: int = DEFAULT_AHEAD) -> None:
        if ahead < 1:
            raise ValueError(f"ahead must be >= 1, got {ahead}")
        self._engine = engine
        self.ahead = ahead
        self._batch = DecodeBatch(engine.decoder_for, replay=engine.replay)
        self._members: dict[int, PooledGeneration] = {}  # open generations by batch index

    def __len__(self) -> int:
        """Open generations (stepped or parked)."""
        return len(self._members)

    @property
    def stepping(self) -> int:
        """Generations the next step advances."""
        return len(self._batch.running)

    def join(
        self, state: ModelState, prompt: Sequence[int] | torch.Tensor, params: SamplingParams
    ) -> PooledGeneration:
        """Append the prompt to `state` (a single-stream state; not changed) and open a
        generation from it; its first token comes with the pool's next step. ValueError
        for an empty or out-of-vocabulary prompt (nothing joins)."""
        ids = self._engine.as_tokens(prompt)
        if len(ids) == 0:
            raise ValueError("generate needs at least one prompt token (sampling starts from it)")
        if state.batch != 1:
            raise ValueError(f"a pooled generation takes a single-stream state, got {state.batch}")
        logits, after = self._engine._forward(ids[None], state)
        index = self._batch.add(after, logits[0], params)
        generation = PooledGeneration(self, index)
        self._members[index] = generation
        return generation

    def step(self) -> int:
        """One token for every open generation whose consumer is fewer than `ahead` tokens
        behind (parked ones whose consumer took half of its tokens are resumed first;
        those that fall `ahead` behind are parked). Returns how many it advanced."""
        batch = self._batch
        for index, generation in self._members.items():
            if index not in batch.running and len(generation._queue) <= self.ahead // 2:
                batch.resume(index)
        advanced = len(batch.running)
        for session, token in batch.step():
            self._members[session]._queue.append(token)
        for index, generation in list(self._members.items()):
            if batch.finish_reasons[index] is not None:
                generation._end(
                    batch.states[index], batch.finish_reasons[index], batch.errors[index]
                )
                del self._members[index]
            elif len(generation._queue) >= self.ahead:
                batch.park(index)
        return advanced

    def _close(self, index: int) -> None:
        if index in self._members:
            self._batch.cancel(index)
            self._members.pop(index)._end(None, "cancelled", None)


class PooledGeneration(Iterator[int]):
    """One session's tokens from a `DecodePool` (module docstring)."""

    def __init__(self, pool: DecodePool, index: int) -> None:
        self._pool = pool
        self._index = index
        self._queue: deque[int] = deque()
        self._ended = False
        self._error: Exception | None = None
        self.state: ModelState | None = None  # once ended: after the prompt and its tokens
        self.finish_reason: str | None = None

    def __iter__(self) -> PooledGeneration:
        return self

    def __next__(self) -> int:
        if self._queue:
            return self._queue.popleft()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._ended:
            raise StopIteration
        raise NoTokenYet

    @property
    def waiting(self) -> int:
        """Tokens sampled and not taken yet."""
        return len(self._queue)

    @property
    def ended(self) -> bool:
        """The pool will sample no more for it: what waits (or its error) is the last."""
        return self._ended or self._error is not None

    def close(self) -> None:
        """End it now; tokens not taken are dropped ("cancelled")."""
        self._queue.clear()
        self._pool._close(self._index)

    def _end(self, state: ModelState | None, reason: str | None, error: Exception | None) -> None:
        self._ended = True
        if error is not None:
            self._error = error
            self._queue.clear()
            return
        self.state, self.finish_reason = state, reason
