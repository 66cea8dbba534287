"""Clients that append to sessions of their own while the suite breaks things, and the check
that nothing they were told was durable went missing.

Each writer keeps the exact token stream its session should hold: every
acknowledged append, plus any append whose outcome it never heard but the
server turns out to hold (read back with GetSession after the failure). At
the end, ``verify`` compares each session with that record: its position,
and its state against a reference session fed the same tokens in one append.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from memsvc.client import MemoryClient
from memsvc.client.errors import MemsvcError
from memsvc.client.retry import RetryPolicy
from memsvc.client.sync import Session
from memsvc.sessions.config import MAX_TOKENS_PER_APPEND

# Rides out a replica's death and a lease's expiry, then gives up (and reports it).
WRITER_RETRY = RetryPolicy(attempts=40, initial_backoff_s=0.05, max_backoff_s=1.0)
PROBE = list(b"What did the notes say? ")


@dataclass
class WriterRecord:
    session_id: str
    tokens: list[int] = field(default_factory=list)  # what the session must hold
    acked_position: int = 0
    appends: int = 0
    latencies_s: list[float] = field(default_factory=list)
    ack_times: list[float] = field(default_factory=list)  # monotonic
    errors: Counter[str] = field(default_factory=Counter)
    error_times: list[float] = field(default_factory=list)  # monotonic
    diverged: int = 0  # reconciliations that found neither outcome


class Writers:
    """``count`` writer threads, each with its own client and session, appending
    ``piece_tokens`` random bytes at a time (every ``pace_s`` at most) until ``stop``."""

    def __init__(
        self,
        addresses: Sequence[str],
        api_key: str,
        count: int,
        *,
        piece_tokens: int = 128,
        pace_s: float = 0.0,
        seed: int = 0,
        retry: RetryPolicy = WRITER_RETRY,
        streaming: bool = False,
        window: int = 4,
    ) -> None:
        self.addresses = list(addresses)
        self.api_key = api_key
        self.piece_tokens = piece_tokens
        self.pace_s = pace_s
        self.retry = retry
        self.streaming = streaming
        self.window = window
        self.records: list[WriterRecord] = []
        self._stop = threading.Event()
        self._ready = threading.Barrier(count + 1)
        self._threads = [
            threading.Thread(target=self._run, args=(i, seed + i), daemon=True)
            for i in range(count)
        ]
        self._lock = threading.Lock()

    def start(self) -> Writers:
        for thread in self._threads:
            thread.start()
        self._ready.wait(120)
        return self

    def stop(self, timeout_s: float = 120.0) -> list[WriterRecord]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout_s)
        return self.records

    def _run(self, index: int, seed: int) -> None:
        rng = random.Random(seed)
        order = self.addresses[index % len(self.addresses) :]
        order += self.addresses[: index % len(self.addresses)]
        with MemoryClient(order, self.api_key, retry=self.retry) as client:
            session = client.create_session(f"writer-{index}")
            record = WriterRecord(session.id)
            with self._lock:
                self.records.append(record)
            self._ready.wait(120)
            if self.streaming:
                self._stream(session, record, rng)
                return
            while not self._stop.is_set():
                piece = [rng.randrange(256) for _ in range(self.piece_tokens)]
                started = time.perf_counter()
                try:
                    ack = session.append(piece)
                except MemsvcError as error:
                    record.errors[error.code.name if error.code else "UNKNOWN"] += 1
                    record.error_times.append(time.monotonic())
                    self._reconcile(session, record, piece)
                    continue
                record.latencies_s.append(time.perf_counter() - started)
                record.ack_times.append(time.monotonic())
                record.tokens.extend(piece)
                record.acked_position = ack.position
                record.appends += 1
                if self.pace_s:
                    self._stop.wait(self.pace_s)

    def _stream(self, session: Session, record: WriterRecord, rng: random.Random) -> None:
        """Pieces over `append_stream` until stopped; an ack's latency runs from the moment its
        piece was handed to the stream. A stream that fails is reconciled and opened again."""
        while not self._stop.is_set():
            sent: deque[tuple[float, list[int]]] = deque()

            def pieces(sent: deque[tuple[float, list[int]]] = sent) -> Iterator[list[int]]:
                while not self._stop.is_set():
                    piece = [rng.randrange(256) for _ in range(self.piece_tokens)]
                    sent.append((time.perf_counter(), piece))
                    yield piece
                    if self.pace_s:
                        self._stop.wait(self.pace_s)

            try:
                for ack in session.append_stream(pieces(), window=self.window):
                    started, piece = sent.popleft()
                    record.latencies_s.append(time.perf_counter() - started)
                    record.ack_times.append(time.monotonic())
                    record.tokens.extend(piece)
                    record.acked_position = ack.position
                    record.appends += 1
            except MemsvcError as error:
                record.errors[error.code.name if error.code else "UNKNOWN"] += 1
                record.error_times.append(time.monotonic())
                self._reconcile_many(session, record, [piece for _, piece in sent])

    def _reconcile(self, session: Session, record: WriterRecord, piece: list[int]) -> None:
        """After a failed append: does the session hold it?"""
        self._reconcile_many(session, record, [piece])

    def _reconcile_many(
        self, session: Session, record: WriterRecord, pieces: list[list[int]]
    ) -> None:
        """After a failure: which of the unacknowledged ``pieces`` (in order) does the session
        hold? Asks until a replica answers; a position between pieces counts as diverged."""
        while True:
            try:
                position = session.refresh().position
                break
            except MemsvcError:
                time.sleep(0.2)
        for piece in pieces:
            if len(record.tokens) + len(piece) > position:
                break
            record.tokens.extend(piece)
            record.acked_position = len(record.tokens)
        if position != len(record.tokens):
            record.diverged += 1
        session.position = len(record.tokens)


@dataclass
class Verdict:
    sessions: int
    acknowledged_tokens: int
    lost_tokens: int  # acknowledged, not in the session
    extra_tokens: int  # in the session, never sent or doubled
    states_checked: int
    states_differing: int
    diverged: int


def _fingerprint(session: Session) -> tuple:
    answer = session.query(PROBE, temperature=0, max_new_tokens=8)
    ack = session.append(PROBE)
    return (answer, ack.position, ack.writes_applied, ack.surprise, ack.memory_norm)


def _same(a: tuple, b: tuple) -> bool:
    return a[:3] == b[:3] and all(
        abs(x - y) <= 1e-4 * max(abs(x), abs(y)) + 1e-6 for x, y in zip(a[3:], b[3:], strict=True)
    )


def verify(
    addresses: Sequence[str],
    api_key: str,
    records: Sequence[WriterRecord],
    *,
    check_states: int = 4,
    max_tokens_per_request: int = MAX_TOKENS_PER_APPEND,
) -> Verdict:
    """Each session against its record: positions for all, states for the first
    ``check_states`` (a greedy answer and the memory's statistics, vs a reference)."""
    lost = extra = checked = differing = 0
    with MemoryClient(list(addresses), api_key, retry=WRITER_RETRY) as client:
        for index, record in enumerate(records):
            session = client.open_session(record.session_id)
            position = session.info.position
            lost += max(0, record.acked_position - position)
            extra += max(0, position - len(record.tokens))
            if index >= check_states:
                continue
            reference = client.create_session(f"reference-{index}")
            for start in range(0, len(record.tokens), max_tokens_per_request):
                reference.append(record.tokens[start : start + max_tokens_per_request])
            checked += 1
            differing += not _same(_fingerprint(session), _fingerprint(reference))
            reference.delete()
    return Verdict(
        sessions=len(records),
        acknowledged_tokens=sum(r.acked_position for r in records),
        lost_tokens=lost,
        extra_tokens=extra,
        states_checked=checked,
        states_differing=differing,
        diverged=sum(r.diverged for r in records),
    )
