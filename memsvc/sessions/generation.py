"""`SessionGeneration`: the iterator `SessionManager.generate` returns.

It holds its session (pinned and locked) from the call until it is exhausted
or closed, so nothing else steps the session in between. What the client has
seen becomes part of the stream: when the iterator is exhausted, the prompt
and every yielded token are appended, logged and durable before
StopIteration; when it is closed early, the prompt and the tokens yielded so
far are (or only the first ``keep`` of them: `close`). An iterator dropped
without being closed is closed when it is garbage-collected (with a warning):
the session's lock must not leak. A step whose update goes non-finite ends it
with the error ``roll_back`` gives (the session rolled back, nothing committed).
One consumer at a time; each call may come from a different thread. A
generation from a `DecodePool` raises NoTokenYet until the pool has stepped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import structlog

from memsvc.engine import Generation
from memsvc.engine.pool import NoTokenYet, PooledGeneration
from memsvc.memory import NonFiniteStateError
from memsvc.model import ModelState

log = structlog.get_logger(__name__)

# Appends the yielded tokens (after the prompt) to the session; the state is the
# generation's final one, or None when it was closed early and must be recomputed.
Commit = Callable[[list[int], ModelState | None], None]


class SessionGeneration(Iterator[int]):
    """Tokens sampled for a session; see the module docstring for what it commits and when."""

    def __init__(
        self,
        session_id: str,
        generation: Generation | PooledGeneration,
        commit: Commit,
        release: Callable[[], None],
        roll_back: Callable[[NonFiniteStateError], Exception],
    ) -> None:
        self.session_id = session_id
        self._generation = generation
        self._commit = commit
        self._release = release
        self._roll_back = roll_back
        self._yielded: list[int] = []
        self._done = False

    @property
    def finish_reason(self) -> str | None:
        """ "length", "eos" or "stop" once exhausted; None before, or when closed early."""
        return self._generation.finish_reason

    def due(self, tokens: int, late: bool) -> bool:
        """Whether taking tokens now is worth a hand-over: `tokens` of them wait, or any
        wait and the caller is `late`, or the generation has ended. A generation that is
        not pooled samples when asked: always due."""
        pooled = self._generation
        if self._done or not isinstance(pooled, PooledGeneration):
            return True
        return pooled.ended or pooled.waiting >= tokens or (late and pooled.waiting > 0)

    def __iter__(self) -> SessionGeneration:
        return self

    def __next__(self) -> int:
        if self._done:
            raise StopIteration
        try:
            token = next(self._generation)
        except StopIteration:
            self._finish(self._generation.state)
            raise
        except NoTokenYet:  # a pooled generation between two pool steps
            raise
        except NonFiniteStateError as error:
            self._done = True
            self._generation.close()
            try:
                raise self._roll_back(error) from error  # under the session's lock
            finally:
                self._release()
        except BaseException:
            self._done = True
            self._generation.close()
            self._release()
            raise
        self._yielded.append(token)
        return token

    def close(self, keep: int | None = None) -> None:
        """Appends the prompt and the tokens yielded so far (only the first ``keep`` of
        them if given: those its client received), and frees the session."""
        if not self._done:
            if keep is not None:
                del self._yielded[keep:]
            self._finish(None)

    def _finish(self, state: ModelState | None) -> None:
        self._done = True
        self._generation.close()  # a pooled one leaves its pool
        try:
            self._commit(self._yielded, state)
        finally:
            self._release()

    def __enter__(self) -> SessionGeneration:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not self._done:
            log.warning("generation_not_closed", session=self.session_id)
            self.close()
