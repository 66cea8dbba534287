"""Who may see what: tenant isolation, fork / export / import, and leases between nodes (Redis)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from memsvc.engine import SamplingParams, StreamingEngine
from memsvc.sessions.api import (
    CoordinationUnavailableError,
    IncompatibleStateError,
    InvalidRequestError,
    SessionBusyError,
    SessionNotFoundError,
    Tier,
)
from memsvc.sessions.checkpoint import encode_checkpoint
from memsvc.store.database import Database
from memsvc.store.hot_state import RedisHotStateTracker
from tests.engine.conftest import tiny_model
from tests.sessions.conftest import MakeManager, new_tenant, random_batches
from tests.sessions.helpers import assert_matches_reference, flat, state_of
from tests.state_asserts import assert_states_equal

PARAMS = SamplingParams(max_new_tokens=3, seed=1)


def test_no_call_reaches_another_tenants_session(
    make_manager: MakeManager, engine: StreamingEngine, any_database: Database
) -> None:
    manager = make_manager(database=any_database)
    owner, intruder = new_tenant(any_database, "owner"), new_tenant(any_database, "intruder")
    session = manager.create(owner).session_id
    manager.append(owner, session, [1, 2, 3])
    calls = [
        (manager.get, ()),
        (manager.append, ([4],)),
        (manager.query, ([4], PARAMS)),
        (manager.generate, ([4], PARAMS)),
        (manager.checkpoint, ()),
        (manager.evict, ()),
        (manager.prefetch, ()),
        (manager.fork, ()),
        (manager.export, ()),
        (manager.delete, ()),
    ]
    for call, args in calls:
        with pytest.raises(SessionNotFoundError):
            call(intruder, session, *args)
    [result] = manager.append_many([(intruder, session, [4])])
    assert isinstance(result, SessionNotFoundError)
    assert manager.list(intruder) == []
    # Also for a session this manager has not loaded yet (the SQL path).
    fresh = make_manager(database=any_database)
    with pytest.raises(SessionNotFoundError):
        fresh.get(intruder, session)
    assert_matches_reference(fresh, engine, owner, session, [1, 2, 3])


def test_fork_copies_the_memory_then_both_go_their_own_way(
    make_manager: MakeManager, engine: StreamingEngine, database: Database
) -> None:
    manager = make_manager()
    tenant = new_tenant(database)
    source = manager.create(tenant).session_id
    tokens = flat(random_batches(4, seed=12))
    manager.append(tenant, source, tokens)
    fork = manager.fork(tenant, source, "copy")
    assert (fork.name, fork.position, fork.durable_position, fork.tier) == (
        "copy",
        len(tokens),
        len(tokens),
        Tier.DISK,
    )
    assert_states_equal(
        state_of(manager, tenant, fork.session_id), state_of(manager, tenant, source)
    )
    manager.append(tenant, source, [1])
    manager.append(tenant, fork.session_id, [2, 3])
    assert_matches_reference(manager, engine, tenant, source, [*tokens, 1])
    assert_matches_reference(manager, engine, tenant, fork.session_id, [*tokens, 2, 3])


def test_export_import_round_trip(
    make_manager: MakeManager, engine: StreamingEngine, any_database: Database
) -> None:
    manager = make_manager(database=any_database)
    alice, bob = new_tenant(any_database, "alice"), new_tenant(any_database, "bob")
    session = manager.create(alice).session_id
    tokens = flat(random_batches(3, seed=13))
    manager.append(alice, session, tokens)
    chunks = list(manager.export(alice, session, chunk_bytes=1000))
    assert len(chunks) > 1 and all(len(c) == 1000 for c in chunks[:-1])
    imported = manager.import_(bob, iter(chunks), "from alice")
    assert (imported.tenant_id, imported.name, imported.position) == (
        bob,
        "from alice",
        len(tokens),
    )
    assert_states_equal(
        state_of(manager, bob, imported.session_id), state_of(manager, alice, session)
    )
    manager.close()
    again = make_manager(database=any_database)
    assert again.append(bob, imported.session_id, [7]).position == len(tokens) + 1
    assert_matches_reference(again, engine, bob, imported.session_id, [*tokens, 7])


def test_imports_that_do_not_fit_are_refused(
    make_manager: MakeManager, engine: StreamingEngine, database: Database, data_dir: Path
) -> None:
    other_model = StreamingEngine(tiny_model(seed=1), max_segment=64)
    theirs = make_manager(engine=other_model, data_dir=data_dir / "theirs")
    ours = make_manager()
    tenant = new_tenant(database)
    session = theirs.create(tenant).session_id
    theirs.append(tenant, session, [1, 2])
    with pytest.raises(IncompatibleStateError, match="model hash"):
        ours.import_(tenant, theirs.export(tenant, session))

    good = b"".join(ours.export(tenant, ours.create(tenant).session_id))
    with pytest.raises(InvalidRequestError, match="not a valid export"):
        ours.import_(tenant, [good[:-10]])
    with pytest.raises(InvalidRequestError, match="at most"):
        ours.import_(tenant, [good] * 40)
    # A sound file with the right hashes but tensors of another shape: the layout check.
    state = engine.init_state().to_dict()
    state["blocks.0.attention.keys"] = state["blocks.0.attention.keys"][:, :, :3]
    forged, _ = encode_checkpoint(
        state,
        model_hash=ours.identity.model_hash,
        config_hash=ours.identity.config_hash,
        position=0,
        wal_offset=0,
    )
    with pytest.raises(IncompatibleStateError, match=r"attention\.keys: shape"):
        ours.import_(tenant, [forged])
    assert len(ours.list(tenant)) == 2  # the two created above, nothing imported


@pytest.fixture
def redis_tracker(redis_client: redis.Redis, redis_namespace: str) -> RedisHotStateTracker:
    return RedisHotStateTracker(redis_client, redis_namespace)


def test_a_lease_keeps_a_session_on_one_node(
    make_manager: MakeManager,
    engine: StreamingEngine,
    database: Database,
    redis_tracker: RedisHotStateTracker,
) -> None:
    node_a = make_manager(tracker=redis_tracker, node_id="node-a")
    node_b = make_manager(tracker=redis_tracker, node_id="node-b")
    tenant = new_tenant(database)
    session = node_a.create(tenant).session_id
    node_a.append(tenant, session, [1, 2, 3])
    hot = redis_tracker.get(session)
    assert (hot.node, hot.tier) == ("node-a", Tier.DEVICE)
    with pytest.raises(SessionBusyError, match="owned by node-a"):
        node_b.append(tenant, session, [4])
    node_a.evict(tenant, session)  # checkpoints and gives the lease back
    assert redis_tracker.lease_holder(session) is None
    assert redis_tracker.get(session).tier is Tier.DISK
    node_b.append(tenant, session, [4])
    assert redis_tracker.lease_holder(session).node == "node-b"
    assert_matches_reference(node_b, engine, tenant, session, [1, 2, 3, 4])
    with pytest.raises(SessionBusyError):
        node_a.prefetch(tenant, session)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _unreachable_tracker() -> RedisHotStateTracker:
    return RedisHotStateTracker(_client(f"redis://127.0.0.1:{_free_port()}/0"), "unreachable")


def _client(url: str) -> redis.Redis:
    """A client that fails at once when the server is gone (no retries with backoff)."""
    return redis.Redis.from_url(
        url, decode_responses=True, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )


def test_unreachable_redis_gives_clear_errors_and_changes_nothing(
    make_manager: MakeManager, engine: StreamingEngine, database: Database, data_dir: Path
) -> None:
    manager = make_manager(tracker=_unreachable_tracker())
    tenant = new_tenant(database)
    session = manager.create(tenant).session_id  # SQL only: no lease needed yet
    for call, args in (
        (manager.append, ([1, 2],)),
        (manager.query, ([1], PARAMS)),
        (manager.generate, ([1], PARAMS)),
        (manager.fork, ()),
        (manager.delete, ()),
    ):
        with pytest.raises(CoordinationUnavailableError):
            call(tenant, session, *args)
    [result] = manager.append_many([(tenant, session, [1, 2])])
    assert isinstance(result, CoordinationUnavailableError)
    assert not (data_dir / "sessions" / session).exists()
    assert [s.session_id for s in manager.list(tenant)] == [session]
    manager.close()
    working = make_manager()
    assert working.append(tenant, session, [5]).position == 1


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """A redis-server of this test's own, which the test may stop."""
    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server must be on PATH for this test"
    port = _free_port()
    server = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = _client(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline and server.poll() is None, "redis did not start"
            time.sleep(0.02)
    yield url, server
    server.kill()
    server.wait()


def test_redis_going_away_under_a_held_lease(
    make_manager: MakeManager,
    engine: StreamingEngine,
    database: Database,
    private_redis: tuple[str, subprocess.Popen],
) -> None:
    url, server = private_redis
    client = _client(url)
    ttl_ms = 1500
    manager = make_manager(tracker=RedisHotStateTracker(client, "memsvc"), lease_ttl_ms=ttl_ms)
    tenant = new_tenant(database)
    session = manager.create(tenant).session_id
    manager.append(tenant, session, [1])
    server.kill()
    server.wait()
    taken = time.monotonic()
    manager.append(tenant, session, [2])  # the lease is still ours: work goes on
    time.sleep(max(0.0, taken + 0.9 * ttl_ms / 1000 - time.monotonic()))
    with pytest.raises(CoordinationUnavailableError, match="about to expire"):
        manager.append(tenant, session, [3])
    assert manager.get(tenant, session).position == 2
    assert_matches_reference(make_manager(), engine, tenant, session, [1, 2])
