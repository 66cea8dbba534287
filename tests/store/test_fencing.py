"""Leases with the metadata store: a node whose lease expired cannot record a checkpoint."""

from __future__ import annotations

import time

import pytest

from memsvc.store import metadata as repo
from memsvc.store.database import Database
from memsvc.store.errors import StaleFenceError
from memsvc.store.hot_state import HotStateTracker, InProcessHotStateTracker, RedisHotStateTracker


@pytest.fixture(params=["in_process", "redis"])
def tracker(request: pytest.FixtureRequest) -> HotStateTracker:
    if request.param == "in_process":
        return InProcessHotStateTracker()
    return RedisHotStateTracker(
        request.getfixturevalue("redis_client"), request.getfixturevalue("redis_namespace")
    )


def test_expired_owner_cannot_record_a_checkpoint(
    tracker: HotStateTracker, database: Database
) -> None:
    with database.unit_of_work() as db:
        tenant, _ = repo.create_tenant(db, "acme")
        session = repo.create_session(db, tenant.id, name="s", model_hash="m")

    def record(generation: int, fence: int) -> None:
        with database.unit_of_work() as db:
            repo.record_checkpoint(
                db,
                session.id,
                generation=generation,
                path=f"ckpt-{generation}",
                position=generation,
                wal_offset=0,
                checksum="c",
                size_bytes=1,
                fence=fence,
            )

    paused = tracker.acquire_lease(session.id, "node-a", ttl_ms=50)
    assert paused is not None
    record(1, paused.fence)
    time.sleep(0.1)  # node-a stalls past its lease
    successor = tracker.acquire_lease(session.id, "node-b", ttl_ms=10_000)
    assert successor is not None
    record(2, successor.fence)
    with pytest.raises(StaleFenceError):
        record(3, paused.fence)
    assert tracker.renew_lease(paused, ttl_ms=10_000) is False
