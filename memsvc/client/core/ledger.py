"""Position bookkeeping for resuming: what an append stream has sent and not yet had
acknowledged, by stream position.

Both SDKs' `append_stream` keep one: when a replica fails mid-stream and the
stream is opened again on the session's next owner, the position that owner
reports says which unacknowledged pieces it holds already (they are
acknowledged without being sent again), which one it holds in part (the rest
is sent), and the others are sent again on the condition that the stream is
where they start (``expected_position``). Not thread-safe: callers lock.
"""

from __future__ import annotations

import itertools
from collections import deque

from memsvc.client.core.calls import conditional, token_ids
from memsvc.client.errors import FailedPreconditionError
from memsvc.proto.v1 import memsvc_pb2 as pb


class StreamLedger:
    def __init__(self, session_id: str, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.session_id = session_id
        self.window = window
        self.pending: deque[tuple[int, pb.Input]] = deque()  # (start position, input)
        self.next_start: int | None = None  # where the next piece starts, once a stream opened
        self._request_ids = itertools.count(1)

    def full(self) -> bool:
        return len(self.pending) >= self.window

    def opened(self, position: int, resumed: bool) -> list[pb.AppendAck]:
        """A stream opened at ``position``: the acknowledgements of the pending pieces it
        holds already (a resumed stream), the one it holds in part trimmed to the rest."""
        if self.next_start is None:
            self.next_start = position
        if not resumed:
            return []
        if position > self.next_start:
            raise FailedPreconditionError(
                f"session {self.session_id} is at position {position}, past the "
                f"{self.next_start} this stream wrote (another writer?)"
            )
        done = []
        while self.pending and self.pending[0][0] + len(token_ids(self.pending[0][1])) <= position:
            start, message = self.pending.popleft()
            end = start + len(token_ids(message))
            done.append(pb.AppendAck(position=end, appended=end - start))
        if self.pending and self.pending[0][0] < position:
            start, message = self.pending.popleft()
            rest = token_ids(message)[position - start :]
            self.pending.appendleft((position, pb.Input(token_ids=rest)))
        return done

    def sent(self, message: pb.Input) -> int:
        """Records ``message`` as sent; returns the position it starts at."""
        assert self.next_start is not None, "no stream opened yet"
        start = self.next_start
        self.next_start += len(token_ids(message))
        self.pending.append((start, message))
        return start

    def acked(self) -> None:
        self.pending.popleft()

    def unacknowledged(self) -> list[tuple[int, pb.Input]]:
        return list(self.pending)

    def request(self, message: pb.Input, start: int | None) -> pb.StreamRequest:
        """The stream request appending ``message``; with ``start``, only if the stream is there."""
        if start is not None:
            message = conditional(message, start)
        return pb.StreamRequest(request_id=next(self._request_ids), append=message)
