"""One suite, two trackers: Redis (real server) and in-process must behave the same."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable

import pytest
import redis

from memsvc.store.hot_state import (
    HotState,
    HotStateTracker,
    InProcessHotStateTracker,
    Lease,
    RedisHotStateTracker,
    Tier,
)

TrackerFactory = Callable[[], HotStateTracker]


@pytest.fixture(params=["in_process", "redis"])
def make_tracker(request: pytest.FixtureRequest) -> TrackerFactory:
    """Makes trackers that share one store (as nodes of a cluster do)."""
    if request.param == "in_process":
        shared = InProcessHotStateTracker()
        return lambda: shared
    client = request.getfixturevalue("redis_client")
    namespace = request.getfixturevalue("redis_namespace")
    return lambda: RedisHotStateTracker(client, namespace)


@pytest.fixture
def tracker(make_tracker: TrackerFactory) -> HotStateTracker:
    return make_tracker()


def _state(session_id: str, node: str = "node-a", last_access: float = 1000.0, **kw) -> HotState:
    fields = {"tier": Tier.DEVICE, "position": 0, "write_rate": 0.0, **kw}
    return HotState(session_id, node, last_access=last_access, **fields)


def test_set_get_round_trip(tracker: HotStateTracker) -> None:
    state = HotState("s1", "node-a", Tier.HOST, 1_732_000_000.123456, 2_000_000_000_123, 0.1 + 0.2)
    tracker.set(state)
    assert tracker.get("s1") == state
    assert tracker.get("s2") is None
    moved = HotState("s1", "node-b", Tier.DISK, 1_732_000_001.5, 2_000_000_000_200, 3.25)
    tracker.set(moved)
    assert tracker.get("s1") == moved


def test_touch_and_delete(tracker: HotStateTracker) -> None:
    assert tracker.touch("missing") is False
    assert tracker.delete("missing") is False
    tracker.set(_state("s1", last_access=10.0, position=7))
    assert tracker.touch("s1", at=20.5) is True
    assert tracker.get("s1") == _state("s1", last_access=20.5, position=7)
    before = time.time()
    assert tracker.touch("s1") is True
    assert before <= tracker.get("s1").last_access <= time.time()
    assert tracker.delete("s1") is True
    assert tracker.get("s1") is None
    assert tracker.least_recently_used(10) == []
    assert tracker.on_node("node-a") == []


def test_least_recently_used(tracker: HotStateTracker) -> None:
    for i, node in enumerate(["node-a", "node-b", "node-a", "node-b", "node-a"]):
        tracker.set(_state(f"s{i}", node, last_access=100.0 - i))
    tracker.set(_state("tie-b", "node-b", last_access=50.0))
    tracker.set(_state("tie-a", "node-b", last_access=50.0))
    lru = [s.session_id for s in tracker.least_recently_used(4)]
    assert lru == ["tie-a", "tie-b", "s4", "s3"]
    assert [s.session_id for s in tracker.least_recently_used(2, node="node-a")] == ["s4", "s2"]
    assert tracker.least_recently_used(0) == []
    tracker.touch("tie-a", at=500.0)
    assert [s.session_id for s in tracker.least_recently_used(100)][-1] == "tie-a"
    assert len(tracker.least_recently_used(100)) == 7


def test_sessions_by_node(tracker: HotStateTracker) -> None:
    tracker.set(_state("s1", "node-a", last_access=3.0))
    tracker.set(_state("s2", "node-a", last_access=1.0))
    tracker.set(_state("s3", "node-b", last_access=2.0))
    assert [s.session_id for s in tracker.on_node("node-a")] == ["s2", "s1"]
    tracker.set(_state("s1", "node-b", last_access=4.0))  # moved
    assert [s.session_id for s in tracker.on_node("node-a")] == ["s2"]
    assert [s.session_id for s in tracker.on_node("node-b")] == ["s3", "s1"]
    tracker.touch("s3", at=5.0)
    assert [s.session_id for s in tracker.on_node("node-b")] == ["s1", "s3"]
    tracker.delete("s3")
    assert [s.session_id for s in tracker.on_node("node-b")] == ["s1"]
    assert tracker.on_node("node-c") == []


def test_lease_acquire_renew_release(make_tracker: TrackerFactory) -> None:
    node_a, node_b = make_tracker(), make_tracker()
    assert node_a.current_fence("s1") == 0
    assert node_a.lease_holder("s1") is None
    lease = node_a.acquire_lease("s1", "node-a", ttl_ms=10_000)
    assert lease == Lease("s1", "node-a", 1)
    assert node_b.acquire_lease("s1", "node-b", ttl_ms=10_000) is None
    assert node_a.acquire_lease("s1", "node-a", ttl_ms=10_000) is None  # renew, don't re-acquire
    assert node_b.lease_holder("s1") == lease
    assert node_b.current_fence("s1") == 1
    assert node_a.renew_lease(lease, ttl_ms=10_000) is True
    impostor = Lease("s1", "node-b", 1)
    assert node_b.renew_lease(impostor, ttl_ms=10_000) is False
    assert node_b.release_lease(impostor) is False
    assert node_b.lease_holder("s1") == lease
    assert node_a.release_lease(lease) is True
    assert node_a.release_lease(lease) is False
    assert node_a.lease_holder("s1") is None
    second = node_b.acquire_lease("s1", "node-b", ttl_ms=10_000)
    assert second == Lease("s1", "node-b", 2)
    assert node_a.renew_lease(lease, ttl_ms=10_000) is False
    # Fences are per session.
    assert node_a.acquire_lease("s2", "node-a", ttl_ms=10_000) == Lease("s2", "node-a", 1)
    assert node_a.current_fence("s1") == 2


def test_lease_expires_and_the_old_owner_is_fenced_off(make_tracker: TrackerFactory) -> None:
    node_a, node_b = make_tracker(), make_tracker()
    old = node_a.acquire_lease("s1", "node-a", ttl_ms=60)
    assert old is not None
    time.sleep(0.12)
    assert node_b.lease_holder("s1") is None
    new = node_b.acquire_lease("s1", "node-b", ttl_ms=10_000)
    assert new is not None and new.fence > old.fence
    assert node_b.current_fence("s1") == new.fence
    assert node_a.renew_lease(old, ttl_ms=10_000) is False
    assert node_a.release_lease(old) is False  # must not delete the new owner's lease
    assert node_a.lease_holder("s1") == new


def test_renewal_extends_the_lease(tracker: HotStateTracker) -> None:
    lease = tracker.acquire_lease("s1", "node-a", ttl_ms=500)
    assert lease is not None
    time.sleep(0.1)
    assert tracker.renew_lease(lease, ttl_ms=2000) is True
    time.sleep(0.45)  # past the first deadline, well inside the renewed one
    assert tracker.lease_holder("s1") == lease


def test_one_winner_when_nodes_race_for_a_lease(make_tracker: TrackerFactory) -> None:
    winners: list[Lease] = []
    start = threading.Barrier(8)

    def contend(node: str) -> None:
        tracker = make_tracker()
        start.wait()
        lease = tracker.acquire_lease("s1", node, ttl_ms=10_000)
        if lease is not None:
            winners.append(lease)

    threads = [threading.Thread(target=contend, args=(f"node-{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(winners) == 1
    assert winners[0].fence == 1
    assert make_tracker().lease_holder("s1") == winners[0]


def test_ttl_must_be_positive(tracker: HotStateTracker) -> None:
    with pytest.raises(ValueError):
        tracker.acquire_lease("s1", "node-a", ttl_ms=0)
    lease = tracker.acquire_lease("s1", "node-a", ttl_ms=1000)
    assert lease is not None
    with pytest.raises(ValueError):
        tracker.renew_lease(lease, ttl_ms=-1)


def test_redis_namespaces_are_isolated(redis_client: redis.Redis) -> None:
    namespaces = [f"memsvc-test-{secrets.token_hex(6)}" for _ in range(2)]
    first, second = (RedisHotStateTracker(redis_client, namespace) for namespace in namespaces)
    try:
        first.set(_state("s1"))
        assert first.acquire_lease("s1", "node-a", ttl_ms=10_000) is not None
        assert second.get("s1") is None
        assert second.least_recently_used(10) == []
        assert second.acquire_lease("s1", "node-b", ttl_ms=10_000) == Lease("s1", "node-b", 1)
    finally:
        for namespace in namespaces:
            keys = list(redis_client.scan_iter(match=f"{namespace}:*"))
            if keys:
                redis_client.delete(*keys)


def test_redis_tracker_needs_decoded_responses(redis_url: str) -> None:
    raw = redis.Redis.from_url(redis_url)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            RedisHotStateTracker(raw)
    finally:
        raw.close()
