"""The session manager's calls: lifecycle, appends (one by one, batched, concurrent), generation,
queries, checkpoints and their numbering, quotas, shutdown."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from memsvc.engine import SamplingParams, StreamingEngine
from memsvc.sessions.api import (
    InvalidRequestError,
    ManagerClosedError,
    QuotaExceededError,
    SessionNotFoundError,
    Tier,
)
from memsvc.sessions.checkpoint import CheckpointDirectory
from memsvc.sessions.wal import read_wal
from memsvc.store import metadata
from memsvc.store.database import Database
from tests.sessions.conftest import MakeManager, new_tenant, random_batches
from tests.sessions.helpers import assert_matches_reference, flat, reference, state_of
from tests.state_asserts import assert_states_equal

GREEDY = SamplingParams(temperature=0, max_new_tokens=6)
RECORD_OVERHEAD = 12 + 8  # a log record's header and position


def _wal_path(data_dir: Path, session_id: str) -> Path:
    return data_dir / "sessions" / session_id / "wal.log"


def _wal_bytes(data_dir: Path, session_id: str) -> int:
    path = _wal_path(data_dir, session_id)
    return path.stat().st_size if path.exists() else 0


def _log_start(data_dir: Path, session_id: str) -> int:
    """The offset the log starts at now (of its oldest record kept, or of its end if none)."""
    reader = read_wal(_wal_path(data_dir, session_id))
    records = list(reader)
    if not records:
        return reader.end_offset
    return records[0].end_offset - RECORD_OVERHEAD - 4 * len(records[0].tokens)


def test_lifecycle(make_manager: MakeManager, any_database: Database, data_dir: Path) -> None:
    manager = make_manager(database=any_database)
    tenant = new_tenant(any_database)
    info = manager.create(tenant, "notes")
    assert (info.name, info.position, info.durable_position, info.tier) == ("notes", 0, 0, None)
    assert info.model_hash == manager.identity.model_hash
    result = manager.append(tenant, info.session_id, [104, 105])
    assert (result.position, result.appended, result.wal_offset) == (2, 2, 28)
    got = manager.get(tenant, info.session_id)
    assert (got.position, got.tier, got.created_at) == (2, Tier.DEVICE, info.created_at)
    assert got.state_bytes > 0
    other = manager.create(tenant)
    assert [s.session_id for s in manager.list(tenant)] == [info.session_id, other.session_id]
    manager.delete(tenant, info.session_id)
    assert not (data_dir / "sessions" / info.session_id).exists()
    for call in (manager.get, manager.delete):
        with pytest.raises(SessionNotFoundError):
            call(tenant, info.session_id)
    with pytest.raises(SessionNotFoundError):
        manager.append(tenant, info.session_id, [1])
    assert [s.session_id for s in manager.list(tenant)] == [other.session_id]
    assert manager.stats().resident[Tier.DEVICE] == 0


def test_appends_survive_a_restart(
    make_manager: MakeManager, engine: StreamingEngine, database: Database
) -> None:
    manager = make_manager(checkpoint_every_tokens=40)
    tenant = new_tenant(database)
    session = manager.create(tenant).session_id
    batches = random_batches(12, seed=1)
    for batch in batches:
        manager.append(tenant, session, batch)
    assert_matches_reference(manager, engine, tenant, session, flat(batches))
    manager.close()
    reopened = make_manager()
    info = reopened.get(tenant, session)
    assert (info.position, info.durable_position, info.tier) == (len(flat(batches)),) * 2 + (
        Tier.DISK,
    )
    assert_matches_reference(reopened, engine, tenant, session, flat(batches))


@pytest.mark.parametrize(
    "tokens",
    [[], [1, 300000], [-1], [1.5, 2.0], [[1, 2]], "abc", None, list(range(9))],
    ids=["empty", "outside-vocab", "negative", "floats", "2-d", "string", "none", "too-many"],
)
def test_bad_input_changes_nothing(
    make_manager: MakeManager, database: Database, data_dir: Path, tokens
) -> None:
    manager = make_manager(max_tokens_per_append=8)
    tenant = new_tenant(database)
    session = manager.create(tenant).session_id
    manager.append(tenant, session, [1, 2, 3])
    size, stats = _wal_bytes(data_dir, session), manager.stats()
    with pytest.raises(InvalidRequestError):
        manager.append(tenant, session, tokens)
    [error] = manager.append_many([(tenant, session, tokens)])
    assert isinstance(error, InvalidRequestError)
    for call in (manager.query, manager.generate):
        with pytest.raises(InvalidRequestError):
            call(tenant, session, tokens, GREEDY)
    assert _wal_bytes(data_dir, session) == size
    assert manager.get(tenant, session).position == 3
    assert manager.stats() == stats


def test_other_bad_requests(make_manager: MakeManager, database: Database) -> None:
    manager = make_manager()
    tenant = new_tenant(database)
    session = manager.create(tenant).session_id
    with pytest.raises(InvalidRequestError):
        manager.export(tenant, session, chunk_bytes=0)
    with pytest.raises(InvalidRequestError):
        manager.create(tenant, "x" * 201)
    with pytest.raises(InvalidRequestError):
        manager.create("no-such-tenant")
    with pytest.raises(InvalidRequestError):
        manager.evict(tenant, session, Tier.DEVICE)


def test_append_many_equals_one_by_one(
    make_manager: MakeManager, engine: StreamingEngine, database: Database
) -> None:
    manager = make_manager()
    tenant = new_tenant(database)
    batched = [manager.create(tenant).session_id for _ in range(4)]
    single = [manager.create(tenant).session_id for _ in range(4)]
    batches = random_batches(10, seed=2, high=30)
    # Session 0 appears three times (three engine steps), session 3 never with the others.
    plan = [(0, batches[0]), (1, batches[1]), (0, batches[2]), (2, batches[3]), (0, batches[4])]
    items = [(tenant, batched[i], tokens) for i, tokens in plan]
    items.insert(2, (tenant, "missing", [1]))
    items.insert(4, (tenant, batched[1], [999]))
    results = manager.append_many(items)
    assert isinstance(results[2], SessionNotFoundError)
    assert isinstance(results[4], InvalidRequestError)
    ok = [r for r in results if not isinstance(r, Exception)]
    expected = [manager.append(tenant, single[i], tokens) for i, tokens in plan]
    assert len(ok) == len(expected)
    for got, want in zip(ok, expected, strict=True):
        assert (got.position, got.appended, got.writes_applied, got.writes_skipped) == (
            want.position,
            want.appended,
            want.writes_applied,
            want.writes_skipped,
        )
        assert got.memory_norm == pytest.approx(want.memory_norm, rel=1e-9)
        assert got.surprise == pytest.approx(want.surprise, rel=1e-9, abs=1e-12)
    for a, b in zip(batched[:3], single[:3], strict=True):
        assert_states_equal(
            state_of(manager, tenant, a), state_of(manager, tenant, b), rtol=1e-9, atol=1e-9
        )


def test_concurrent_appends_to_one_session_serialise(
    make_manager: MakeManager, engine: StreamingEngine, database: Database, data_dir: Path
) -> None:
    manager = make_manager(checkpoint_every_tokens=50)
    tenant = new_tenant(database)
    session = manager.create(tenant).session_id
    results: dict[int, tuple[int, list[int]]] = {}
    lock = threading.Lock()

    def appender(worker: int) -> None:
        for tokens in random_batches(8, seed=100 + worker, high=10):
            result = manager.append(tenant, session, tokens)
            with lock:
                results[result.position] = (result.appended, tokens)

    threads = [threading.Thread(target=appender, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # The acknowledged positions tile the stream: each append saw the one before it whole.
    order, position = [], 0
    for end in sorted(results):
        appended, tokens = results[end]
        assert end - appended == position
        order.append(tokens)
        position = end
    assert len(order) == 32
    assert_matches_reference(manager, engine, tenant, session, flat(order))
    wal = read_wal(_wal_path(data_dir, session))
    assert [r.tokens.tolist() for r in wal][-5:] == order[-5:]


def test_generate_appends_the_prompt_and_what_was_seen(
    make_manager: MakeManager, engine: StreamingEngine, database: Database
) -> None:
    manager = make_manager()
    tenant = new_tenant(database)
    session = manager.create(tenant).session_id
    manager.append(tenant, session, [10, 20, 30])
    params = SamplingParams(max_new_tokens=5, seed=11)
    generation = manager.generate(tenant, session, [40, 50], params)
    tokens = list(generation)
    assert generation.finish_reason in {"length", "eos"}
    expected = list(engine.generate(reference(engine, [10, 20, 30]), [40, 50], params))
    assert tokens == expected
    stream = [10, 20, 30, 40, 50, *tokens]
    assert manager.get(tenant, session).position == len(stream)
    assert_matches_reference(manager, engine, tenant, session, stream)

    early = manager.generate(tenant, session, [60], SamplingParams(max_new_tokens=8, seed=5))
    seen = [next(early), next(early)]
    early.close()
    early.close()  # closing twice is harmless
    stream += [60, *seen]
    assert manager.get(tenant, session).position == len(stream)
    manager.close()
    assert_matches_reference(make_manager(), engine, tenant, session, stream)


def test_an_open_generation_holds_its_session(
    make_manager: MakeManager, engine: StreamingEngine, database: Database
) -> None:
    manager = make_manager()
    tenant = new_tenant(database)
    session = manager.create(tenant).session_id
    generation = manager.generate(tenant, session, [1, 2], SamplingParams(max_new_tokens=4, seed=0))
    appended = threading.Event()
    worker = threading.Thread(target=lambda: (manager.append(tenant, session, [3]), appended.set()))
    worker.start()
    assert not appended.wait(0.3)  # blocked behind the generation
    out = list(generation)
    worker.join(timeout=30)
    assert appended.is_set()
    assert_matches_reference(manager, engine, tenant, session, [1, 2, *out, 3])


def test_query_changes_nothing(
    make_manager: MakeManager, engine: StreamingEngine, database: Database, data_dir: Path
) -> None:
    manager = make_manager()
    tenant = new_tenant(database)
    session = manager.create(tenant).session_id
    manager.append(tenant, session, [7, 8, 9, 10])
    size = _wal_bytes(data_dir, session)
    params = SamplingParams(max_new_tokens=6, seed=4)
    answer = manager.query(tenant, session, [11, 12], params)
    assert answer == list(engine.generate(reference(engine, [7, 8, 9, 10]), [11, 12], params))
    assert manager.query(tenant, session, [11, 12], params) == answer
    assert manager.get(tenant, session).position == 4
    assert _wal_bytes(data_dir, session) == size
    assert_matches_reference(manager, engine, tenant, session, [7, 8, 9, 10])


def test_checkpoints_keep_the_newest_and_cut_the_log(
    make_manager: MakeManager, engine: StreamingEngine, database: Database, data_dir: Path
) -> None:
    manager = make_manager(checkpoint_every_tokens=16, keep_checkpoints=2, wal_truncate_bytes=0)
    tenant = new_tenant(database)
    session = manager.create(tenant).session_id
    batches = random_batches(20, seed=3)
    for batch in batches:
        manager.append(tenant, session, batch)
    with database.unit_of_work() as db:
        rows = metadata.list_checkpoints(db, session)
    assert len(rows) == 2 and rows[0].generation > rows[1].generation
    # The log starts at the OLDEST kept checkpoint, so that one can still be replayed from.
    assert _log_start(data_dir, session) == rows[1].wal_offset
    assert next(iter(read_wal(_wal_path(data_dir, session)))).position == rows[1].position
    info = manager.checkpoint(tenant, session)
    assert (info.sequence, info.position) == (rows[0].generation + 1, len(flat(batches)))
    assert manager.checkpoint(tenant, session) == info  # nothing new: the same checkpoint
    assert manager.get(tenant, session).durable_position == info.position
    assert Path(info.path).is_file() and info.checksum.startswith("sha256:")
    assert_matches_reference(manager, engine, tenant, session, flat(batches))
    manager.close()  # waits for the pruned files' deletion
    with database.unit_of_work() as db:
        kept = [row.generation for row in metadata.list_checkpoints(db, session)]
    directory = CheckpointDirectory(data_dir / "sessions" / session / "checkpoints")
    assert directory.sequences() == kept == [info.sequence, rows[0].generation]


def test_files_without_a_row_are_removed_on_restore(
    make_manager: MakeManager, engine: StreamingEngine, database: Database, data_dir: Path
) -> None:
    manager = make_manager()
    tenant = new_tenant(database)
    session = manager.create(tenant).session_id
    manager.append(tenant, session, [1, 2, 3])
    info = manager.checkpoint(tenant, session)
    manager.close()
    directory = CheckpointDirectory(data_dir / "sessions" / session / "checkpoints")
    orphans = [directory.path_for(info.sequence + 1), directory.path_for(0)]
    for orphan in orphans:  # a checkpoint cut before its row, one whose deletion was lost
        orphan.write_bytes(Path(info.path).read_bytes())
    (directory.directory / ".ckpt-000000000009.safetensors.0a1b2c3d.tmp").write_bytes(b"x")
    reopened = make_manager()
    assert_matches_reference(reopened, engine, tenant, session, [1, 2, 3])
    assert sorted(directory.directory.iterdir()) == [Path(info.path)]


def test_the_log_is_cut_only_past_the_threshold(
    make_manager: MakeManager, database: Database, data_dir: Path
) -> None:
    manager = make_manager(checkpoint_every_tokens=8, keep_checkpoints=1, wal_truncate_bytes=200)
    tenant = new_tenant(database)
    session = manager.create(tenant).session_id
    starts = []
    for batch in random_batches(30, seed=4, low=8, high=9):
        manager.append(tenant, session, batch)  # 52 bytes a record, a checkpoint each
        starts.append(_log_start(data_dir, session))
    steps = np.diff(starts)
    assert np.count_nonzero(steps) >= 4
    assert set(steps[steps > 0]) == {208}  # four records, the first boundary past 200 bytes


def test_checkpoints_by_time(make_manager: MakeManager, database: Database) -> None:
    manager = make_manager(checkpoint_every_seconds=0.2)
    tenant = new_tenant(database)
    session = manager.create(tenant).session_id
    manager.append(tenant, session, [1, 2, 3])
    assert manager.get(tenant, session).durable_position == 0
    deadline = time.monotonic() + 20
    while manager.get(tenant, session).durable_position != 3:
        assert time.monotonic() < deadline, "no time-based checkpoint"
        time.sleep(0.05)


def test_close_checkpoints_and_refuses_later_calls(
    make_manager: MakeManager, engine: StreamingEngine, database: Database
) -> None:
    manager = make_manager()
    tenant = new_tenant(database)
    session = manager.create(tenant).session_id
    manager.append(tenant, session, [5, 6, 7])
    manager.close()
    manager.close()
    for call, args in (
        (manager.get, (tenant, session)),
        (manager.append, (tenant, session, [1])),
        (manager.create, (tenant,)),
        (manager.list, (tenant,)),
    ):
        with pytest.raises(ManagerClosedError):
            call(*args)
    with database.unit_of_work() as db:
        [row] = metadata.list_checkpoints(db, session)
    assert row.position == 3
    assert make_manager().get(tenant, session).durable_position == 3


def test_sessions_per_tenant_quota(make_manager: MakeManager, database: Database) -> None:
    manager = make_manager()
    tenant = new_tenant(database, max_sessions=2)
    first = manager.create(tenant).session_id
    manager.append(tenant, first, [1])
    manager.fork(tenant, first)
    for call, args in (
        (manager.create, (tenant,)),
        (manager.fork, (tenant, first)),
        (manager.import_, (tenant, list(manager.export(tenant, first)))),
    ):
        with pytest.raises(QuotaExceededError):
            call(*args)
    manager.delete(tenant, first)
    manager.create(tenant)
    assert len(manager.list(tenant)) == 2
