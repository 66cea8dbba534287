"""Three replicas as `memsvc serve` processes on loopback, sharing PostgreSQL, Redis and a data
directory: calls reach a session's owner from any replica, and sessions continue on the others
when one is killed (-9) or drained (SIGTERM), with nothing acknowledged lost and states equal
to an uninterrupted run's."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from memsvc.client import AsyncMemoryClient, MemoryClient
from memsvc.client.retry import RetryPolicy
from memsvc.server.process import ServerProcess
from memsvc.store import migrate
from memsvc.store.database import Database
from memsvc.store.hot_state import RedisHotStateTracker
from tests.server.harness import create_tenant
from tests.server.test_e2e import PIECE, _fingerprint, _haystack, _pieces

LEASE_TTL_MS = 2000
RETRY = RetryPolicy(attempts=40, initial_backoff_s=0.05, max_backoff_s=0.5)


@pytest.fixture
def cluster(
    tmp_path: Path, model_dir: Path, postgres_url: str, redis_url: str, redis_namespace: str
) -> Iterator[tuple[list[ServerProcess], Database]]:
    migrate.upgrade(postgres_url)
    database = Database.from_url(postgres_url)
    shared = ["--model", str(model_dir), "--data-dir", str(tmp_path / "shared")]
    shared += ["--database-url", postgres_url, "--redis-url", redis_url]
    shared += ["--redis-namespace", redis_namespace, "--lease-ttl-ms", str(LEASE_TTL_MS)]
    shared += ["--shutdown-grace", "30", "--threads", "1"]
    replicas = [
        ServerProcess([*shared, "--node-id", f"r{i}"], tmp_path / f"r{i}.log") for i in range(3)
    ]
    try:
        for replica in replicas:
            replica.start()
        yield replicas, database
    finally:
        for replica in replicas:
            replica.__exit__()
        database.dispose()


def _client(replicas: list[ServerProcess], first: int, api_key: str) -> MemoryClient:
    """A client knowing every replica, trying ``first`` first."""
    order = replicas[first:] + replicas[:first]
    return MemoryClient([r.address for r in order], api_key, retry=RETRY)


def test_replicas_route_to_the_owner_and_survive_kill_and_drain(
    cluster: tuple[list[ServerProcess], Database], redis_client, redis_namespace: str
) -> None:
    replicas, database = cluster
    tenant = create_tenant(database, "acme")
    tracker = RedisHotStateTracker(redis_client, redis_namespace)
    context, question = _haystack(seed=3)
    pieces = _pieces(context)

    # Routing: a client that knows only r1 reaches r0's session through a redirect.
    with MemoryClient(replicas[0].address, tenant.api_key) as only_r0:
        routed = only_r0.create_session("routed")
        routed.append(context[:PIECE])
    assert tracker.lease_holder(routed.id).node == "r0"
    with MemoryClient(replicas[1].address, tenant.api_key) as only_r1:
        ack = only_r1.open_session(routed.id).append(context[PIECE : 2 * PIECE])
        assert ack.position == 2 * PIECE
        assert routed.id in only_r1.replicas._owners  # learnt from r1's answer
        assert only_r1.replicas.pick(routed.id)[0] == replicas[0].address
    assert tracker.lease_holder(routed.id).node == "r0"  # r1 did not take it

    # One session per replica, streamed concurrently; r0 is killed mid-stream.
    clients = [_client(replicas, i, tenant.api_key) for i in range(3)]
    sessions = [client.create_session(f"s{i}") for i, client in enumerate(clients)]
    sessions.append(clients[0].create_session("s3"))  # streamed by the async SDK
    for session in sessions:
        session.append(pieces[0])  # takes the lease on the client's first replica
    assert [tracker.lease_holder(s.id).node for s in sessions] == ["r0", "r1", "r2", "r0"]
    acks: list[list[int]] = [[] for _ in sessions]
    errors: list[BaseException] = []
    r0_acked, killed = threading.Event(), threading.Event()

    def held_back(items: list[list[int]], after: int, until: threading.Event) -> Iterator:
        """The pieces, pausing after the first ``after`` until ``until`` is set."""
        for index, piece in enumerate(items):
            if index == after:
                assert until.wait(60)
            yield piece

    def stream(index: int) -> None:
        source = held_back(pieces[1:], 4, killed) if index == 0 else pieces[1:]
        try:
            for ack in sessions[index].append_stream(source, window=3):
                acks[index].append(ack.position)
                if index == 0 and ack.position >= 3 * PIECE:
                    r0_acked.set()
        except BaseException as error:
            errors.append(error)

    async def held_back_async() -> AsyncIterator[list[int]]:
        for index, piece in enumerate(pieces[1:]):
            if index == 4:
                assert await asyncio.to_thread(killed.wait, 60)
            yield piece

    async def stream_async() -> None:
        addresses = [r.address for r in replicas]
        async with AsyncMemoryClient(addresses, tenant.api_key, retry=RETRY) as client:
            session = await client.open_session(sessions[3].id)
            async for ack in session.append_stream(held_back_async(), window=3):
                acks[3].append(ack.position)

    def stream_in_loop() -> None:
        try:
            asyncio.run(stream_async())
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=stream_in_loop))
    for thread in threads:
        thread.start()
    assert r0_acked.wait(60)
    replicas[0].kill()  # with appends in flight and more to come
    killed.set()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    ends = list(itertools.accumulate(len(piece) for piece in pieces))
    for positions in acks:  # every piece acknowledged once, in order
        assert positions == ends[1:]
    owners = [tracker.lease_holder(s.id) for s in sessions]
    for moved in (owners[0], owners[3]):  # r0's sessions moved
        assert moved is not None and moved.node in {"r1", "r2"}

    # Drain: SIGTERM r1 while a stream to its session runs; the stream moves to r2.
    drained = sessions[1]
    more = _pieces(context[: 4 * PIECE])
    stopping = threading.Thread(target=replicas[1].stop)
    draining = threading.Event()

    def start_drain() -> None:
        stopping.start()
        time.sleep(0.5)  # the pieces after the first go to a replica that is stopping
        draining.set()

    moved_acks = []
    for ack in drained.append_stream(held_back(more, 1, draining), window=2):
        moved_acks.append(ack.position)
        if len(moved_acks) == 1:
            threading.Thread(target=start_drain).start()
    stopping.join(60)
    assert moved_acks == [len(context) + n for n in itertools.accumulate(map(len, more))]
    assert tracker.lease_holder(drained.id).node == "r2"

    # States equal an uninterrupted run's (to float precision: any split of a stream).
    for index, session in enumerate(sessions):
        reference = clients[2].create_session(f"reference-{index}")
        tokens = context if index != 1 else context + context[: 4 * PIECE]
        session = clients[2].open_session(session.id)  # s3's handle was the async client's
        reference.append(tokens)
        got, expected = _fingerprint(session, question), _fingerprint(reference, question)
        assert got[:4] == expected[:4]
        assert got[4:] == pytest.approx(expected[4:], rel=1e-4, abs=1e-6)
    for client in clients:
        client.close()
    assert replicas[2].stop() == 0
