"""Fencing on the shared volume: a node that lost its lease gets nothing acknowledged and
cannot write into the log its successor continues; fences outlive a lease store's restart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from memsvc.engine import StreamingEngine
from memsvc.sessions.api import SessionMovedError
from memsvc.sessions.fencing import Claim, FenceBehindError, FencedOutError, OwnerFile
from memsvc.sessions.wal import WriteAheadLog, read_wal
from memsvc.store.database import Database
from memsvc.store.hot_state import InProcessHotStateTracker
from tests.sessions.conftest import MakeManager, new_tenant
from tests.sessions.helpers import assert_matches_reference


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_newer_claim_fences_out_the_older_one(tmp_path: Path) -> None:
    owner = OwnerFile(tmp_path / "s")
    old, new = Claim(3, "a", "a/1"), Claim(4, "b", "b/1")
    with owner.locked():
        assert owner.seize(old) is None
    owner.check(old)
    with owner.locked():
        assert owner.seize(new) == old
    with pytest.raises(FencedOutError, match="taken over by b"):
        owner.check(old)
    owner.check(new)
    with owner.locked(), pytest.raises(FenceBehindError) as behind:
        owner.seize(Claim(4, "c", "c/1"))  # the same fence from another holder: a reset counter
    assert behind.value.floor == 4
    with owner.locked(), pytest.raises(FenceBehindError):
        owner.seize(Claim(5, "c", "c/1"), floor=5)  # a newer fence recorded elsewhere (SQL)
    owner.check(new)  # refusals change nothing
    with owner.locked():
        assert owner.seize(new) == new  # the holder itself again: fine


def test_a_rotated_log_is_out_of_reach_of_a_stale_descriptor(tmp_path: Path) -> None:
    path = tmp_path / "wal.log"
    current = WriteAheadLog.open(path)
    current.append(0, np.arange(5))
    current.flush_and_sync()
    stale = WriteAheadLog.open(path)  # another process's handle on the same file
    current.rotate()
    stale.append(5, np.arange(3))  # lands in the orphaned file
    stale.flush_and_sync()
    current.append(5, np.arange(7))
    current.flush_and_sync()
    records = list(read_wal(path))
    assert [(r.position, r.tokens.tolist()) for r in records] == [
        (0, list(range(5))),
        (5, list(range(7))),
    ]
    stale.close()
    current.close()


def test_a_node_that_lost_its_lease_gets_nothing_acknowledged(
    make_manager: MakeManager, engine: StreamingEngine, database: Database
) -> None:
    # The tracker's clock runs ahead of node A's: A believes its lease is fresh while the
    # tracker let it expire and gave the session to B (a paused or partitioned node).
    clock = Clock()
    tracker = InProcessHotStateTracker(clock=clock)
    node_a = make_manager(tracker=tracker, node_id="node-a", lease_ttl_ms=60_000)
    node_b = make_manager(tracker=tracker, node_id="node-b", lease_ttl_ms=60_000)
    tenant = new_tenant(database)
    session = node_a.create(tenant).session_id
    node_a.append(tenant, session, [1, 2, 3])
    clock.now += 61
    node_b.append(tenant, session, [4, 5])  # takes over: restores A's log
    with pytest.raises(SessionMovedError, match="owned by node-b"):
        node_a.append(tenant, session, [9, 9])  # logged to the orphaned file, not acknowledged
    with pytest.raises(SessionMovedError):
        node_a.checkpoint(tenant, session)
    node_b.append(tenant, session, [6])
    assert node_b.get(tenant, session).position == 6
    assert_matches_reference(node_b, engine, tenant, session, [1, 2, 3, 4, 5, 6])
    # B goes silent without a checkpoint: a third node rebuilds it from the log alone,
    # which holds A's and B's acknowledged appends and nothing of A's fenced-out one.
    clock.now += 61
    node_c = make_manager(tracker=tracker, node_id="node-c", lease_ttl_ms=60_000)
    assert_matches_reference(node_c, engine, tenant, session, [1, 2, 3, 4, 5, 6])


def test_fences_outlive_a_lease_store_that_lost_its_counters(
    make_manager: MakeManager, engine: StreamingEngine, database: Database, data_dir: Path
) -> None:
    node_a = make_manager(tracker=InProcessHotStateTracker(), node_id="node-a")
    tenant = new_tenant(database)
    session = node_a.create(tenant).session_id
    node_a.append(tenant, session, [1, 2, 3])
    node_a.checkpoint(tenant, session)
    node_a.evict(tenant, session)
    owner = OwnerFile(data_dir / "sessions" / session)
    fence_a = owner.read().fence
    fresh = InProcessHotStateTracker()  # a restarted Redis: fences count from 1 again
    node_b = make_manager(tracker=fresh, node_id="node-b")
    node_b.append(tenant, session, [4])
    claim_b = owner.read()
    assert claim_b.node == "node-b" and claim_b.fence > fence_a  # raised past those on disk
    assert fresh.current_fence(session) == claim_b.fence
    node_b.checkpoint(tenant, session)  # and its checkpoints are not refused as stale
    assert_matches_reference(node_b, engine, tenant, session, [1, 2, 3, 4])
