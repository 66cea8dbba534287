"""End to end over real gRPC on loopback, against `memsvc serve` child processes.

Once on embedded defaults (SQLite and files in the data directory) and once on
PostgreSQL + Redis; the server process is restarted between the writes and
the reads. A crash (kill -9) mid-stream loses no acknowledged token.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from memsvc.client import MemoryClient, Session
from memsvc.client.errors import UnavailableError
from memsvc.client.retry import NO_RETRY
from memsvc.server.backends import open_database
from memsvc.server.process import ServerProcess
from memsvc.store import migrate
from memsvc.store.database import Database
from memsvc.train.tasks import TaskSpec, sample
from tests.server.harness import TenantKey, create_tenant

PIECE = 256  # tokens per append


@dataclass
class Backend:
    """How to start a server on one backend, and its database for creating tenants."""

    args: list[str]
    database: Database
    data_dir: Path


@pytest.fixture(params=["embedded", "postgresql+redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, model_dir: Path) -> Iterator[Backend]:
    data_dir = tmp_path / "data"
    args = ["--model", str(model_dir), "--data-dir", str(data_dir), "--shutdown-grace", "60"]
    if request.param == "embedded":
        database = open_database(data_dir, None)
    else:
        url = request.getfixturevalue("postgres_url")
        migrate.upgrade(url)
        database = Database.from_url(url)
        args += ["--database-url", url, "--redis-url", request.getfixturevalue("redis_url")]
        args += ["--redis-namespace", request.getfixturevalue("redis_namespace")]
    yield Backend(args, database, data_dir)
    database.dispose()


def _haystack(seed: int = 0) -> tuple[list[int], list[int]]:
    """A 2k-token passkey haystack (needle outside the tiny model's window) and its question."""
    s = sample(TaskSpec("passkey", 2048, needle="out_of_window", window=80), seed)
    ((question, answer),) = s.questions
    return s.tokens[:question].tolist(), s.tokens[question:answer].tolist()


def _pieces(tokens: list[int]) -> list[list[int]]:
    return [tokens[i : i + PIECE] for i in range(0, len(tokens), PIECE)]


def test_sessions_survive_a_restart(backend: Backend, tmp_path: Path) -> None:
    tenant = create_tenant(backend.database, "acme")
    with ServerProcess(backend.args, tmp_path / "server.log") as server:
        _restart_between_writes_and_reads(server, tenant)


def _restart_between_writes_and_reads(server: ServerProcess, tenant: TenantKey) -> None:
    server.start()
    context, question = _haystack()
    # No retries: a stream ends when its server stops (tests/cluster shows them resuming).
    with MemoryClient(server.address, tenant.api_key, retry=NO_RETRY) as client:
        session = client.create_session("notes")
        acks = list(session.append_stream(_pieces(context)))
        assert [a.position for a in acks] == [
            min(i + PIECE, len(context)) for i in range(0, len(context), PIECE)
        ]
        pieces = list(session.generate("Then ", max_new_tokens=5, seed=3, allow_eos=False))
        assert pieces  # the tiny model's bytes are seldom valid UTF-8, but some text comes
        position = session.refresh().position
        assert position == len(context) + len("Then ") + 5
        answer = session.query(question, temperature=0, max_new_tokens=6)
        fork = session.fork("fork")
        imported = client.import_session(list(session.export(chunk_bytes=4096)), "copy")
        stream_ended = _idle_stream(client, session.id)

        started = time.monotonic()
        assert server.stop() == 0
        assert time.monotonic() - started < 30, "an idle stream held the shutdown up"
        assert isinstance(stream_ended.get(timeout=5), UnavailableError)

    server.start()
    with MemoryClient(server.address, tenant.api_key) as client:
        restored = client.open_session(session.id)
        assert restored.info.position == position + 1  # + the idle stream's one token
        assert restored.info.durable_position == restored.info.position  # checkpointed on SIGTERM
        names = sorted(s.name for s in client.list_sessions())
        assert names == ["copy", "fork", "notes"]
        expected = client.open_session(fork.id).query(question, temperature=0, max_new_tokens=6)
        assert (
            client.open_session(imported.id).query(question, temperature=0, max_new_tokens=6)
            == expected
        )
        assert restored.append([65]).position == position + 2
    assert server.stop() == 0
    assert answer == expected  # the fork and the copy hold the state the query saw


def _idle_stream(client: MemoryClient, session_id: str) -> queue.Queue[BaseException | None]:
    """A stream that appends one token, then waits for its client: what ends it goes
    into the returned queue (None: it ended cleanly)."""
    pieces: queue.Queue[list[int] | None] = queue.Queue()
    ended: queue.Queue[BaseException | None] = queue.Queue()
    acked = threading.Event()

    def consume() -> None:
        try:
            for _ in client.open_session(session_id).append_stream(iter(pieces.get, None)):
                acked.set()
            ended.put(None)
        except BaseException as error:
            ended.put(error)

    threading.Thread(target=consume, daemon=True).start()
    pieces.put([66])
    assert acked.wait(30)
    return ended


def test_a_crash_loses_no_acknowledged_token(tmp_path: Path, model_dir: Path) -> None:
    data_dir = tmp_path / "data"
    tenant = create_tenant(open_database(data_dir, None), "acme")
    args = ["--model", str(model_dir), "--data-dir", str(data_dir)]
    with ServerProcess(args, tmp_path / "server.log") as server:
        _crash_between_writes_and_reads(server, tenant)


def _crash_between_writes_and_reads(server: ServerProcess, tenant: TenantKey) -> None:
    server.start()
    context, question = _haystack(seed=1)
    pieces = _pieces(context)
    acked = 0
    with MemoryClient(server.address, tenant.api_key, retry=NO_RETRY) as client:
        session = client.create_session("crash")
        with pytest.raises(UnavailableError):
            for ack in session.append_stream(pieces, window=4):
                acked = ack.position
                if ack.position == 3 * PIECE:  # four more appends are in flight
                    server.kill()
    assert acked >= 3 * PIECE

    server.start()
    with MemoryClient(server.address, tenant.api_key) as client:
        restored = client.open_session(session.id)
        position = restored.info.position
        assert position >= acked
        assert position in {PIECE * i for i in range(len(pieces) + 1)}  # appends are atomic
        reference = client.create_session("reference")
        reference.append(context[:position])
        got, expected = _fingerprint(restored, question), _fingerprint(reference, question)
        assert got[:4] == expected[:4]
        # Floats to a tolerance: any split of a stream gives the same state to float
        # precision, not bit for bit.
        assert got[4:] == pytest.approx(expected[4:], rel=1e-4, abs=1e-6)
    assert server.stop() == 0


def _fingerprint(session: Session, question: list[int]) -> tuple:
    """What a session's state shows: a greedy answer, then the memory statistics
    after one more identical append (the floats last)."""
    answer = session.query(question, temperature=0, max_new_tokens=8)
    ack = session.append(question)
    counters = (ack.position, ack.writes_applied, ack.writes_skipped)
    return (answer, *counters, ack.surprise, ack.memory_norm)
