"""`append_many` items that *join*: applied with the item of their session before them, in
one engine step and one log record (``batch.py``), with results equal to appending them
one by one, and one fate."""

from __future__ import annotations

import pytest

from memsvc.engine import StreamingEngine
from memsvc.sessions.api import AppendResult, InvalidRequestError, PositionConflictError
from memsvc.store.database import Database
from tests.sessions.conftest import MakeManager, new_tenant, random_batches
from tests.sessions.helpers import Acks, assert_matches_reference, flat


def _same(got: AppendResult, want: AppendResult, *, statistics: bool) -> None:
    assert (got.position, got.appended) == (want.position, want.appended)
    if statistics:
        assert (got.writes_applied, got.writes_skipped) == (
            want.writes_applied,
            want.writes_skipped,
        )
        assert got.memory_norm == pytest.approx(want.memory_norm, rel=1e-9)
        assert got.surprise == pytest.approx(want.surprise, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_joined_items_equal_appending_them_one_by_one(
    make_manager: MakeManager, engine: StreamingEngine, database: Database, seed: int
) -> None:
    manager = make_manager()
    tenant = new_tenant(database)
    joined, other, twin = (manager.create(tenant).session_id for _ in range(3))
    batches = random_batches(9, seed=seed, high=70)  # across the 16-token chunks
    # Three joined behind a first one, another session between, then a group of two and
    # one more that does not join (the next round).
    plan = [
        (joined, 0, False),
        (joined, 1, True),
        (other, 2, False),
        (joined, 3, True),
        (joined, 4, True),
        (joined, 5, False),
        (joined, 6, True),
        (joined, 7, False),
    ]
    results = manager.append_many([(tenant, s, batches[b], None, joins) for s, b, joins in plan])
    sent = [b for s, b, _ in plan if s == joined]
    want = [manager.append(tenant, twin, batches[b]) for b in sent]
    got = [r for (s, _, _), r in zip(plan, results, strict=True) if s == joined]
    assert all(isinstance(r, AppendResult) for r in results)
    # Positions and lengths are each item's own; the statistics are those after the last
    # item of each group (items 4, 6 and 7 of the plan).
    last_of_group = [False, False, False, True, False, True, True]
    for g, w, last in zip(got, want, last_of_group, strict=True):
        _same(g, w, statistics=last)
    assert_matches_reference(manager, engine, tenant, joined, flat(batches[b] for b in sent))
    manager.close()
    # The group's one log record replays to the same stream.
    again = make_manager()
    assert again.get(tenant, joined).position == len(flat(batches[b] for b in sent))
    assert_matches_reference(again, engine, tenant, joined, flat(batches[b] for b in sent))


def test_a_joined_item_shares_the_fate_of_the_item_it_joins(
    make_manager: MakeManager, engine: StreamingEngine, database: Database
) -> None:
    manager = make_manager()
    tenant = new_tenant(database)
    session = manager.create(tenant).session_id
    manager.append(tenant, session, [1, 2, 3])
    # Refused before the step (a bad token): the item joining it is refused too.
    bad, follower = manager.append_many(
        [(tenant, session, [10_000], None, False), (tenant, session, [4, 5], None, True)]
    )
    assert isinstance(bad, InvalidRequestError) and follower is bad
    # Refused in the step (the position is not the expected one): the same.
    conflict, follower = manager.append_many(
        [(tenant, session, [4], 7, False), (tenant, session, [5], None, True)]
    )
    assert isinstance(conflict, PositionConflictError) and follower is conflict
    # Neither went in; an item that does not join is applied on its own.
    alone, second = manager.append_many(
        [(tenant, session, [4], 9, False), (tenant, session, [5, 6], None, False)]
    )
    assert isinstance(alone, PositionConflictError)
    assert isinstance(second, AppendResult) and second.position == 5
    assert_matches_reference(manager, engine, tenant, session, [1, 2, 3, 5, 6])


def test_joined_items_are_acknowledged_each_once_their_record_is_durable(
    make_manager: MakeManager, engine: StreamingEngine, database: Database
) -> None:
    manager = make_manager()
    tenant = new_tenant(database)
    session = manager.create(tenant).session_id
    acks = Acks()
    items = [(tenant, session, [k, k + 1], None, k > 0) for k in range(0, 8, 2)]
    results = manager.append_many(items, acks)
    calls = acks.take(len(items))
    assert [index for index, _, _ in calls] == [0, 1, 2, 3]
    assert [outcome for _, outcome, _ in calls] == results
    assert [r.position for r in results] == [2, 4, 6, 8]
    # One record: every acknowledgement names its end.
    assert len({r.wal_offset for r in results}) == 1
    assert_matches_reference(manager, engine, tenant, session, list(range(8)))
