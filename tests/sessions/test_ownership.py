"""Leases as the manager keeps them: renewal timing, lapses, and another owner in between.

The in-process tracker and the ownership share one controllable clock, so a
lapse is a step of the clock rather than a sleep.
"""

from __future__ import annotations

import pytest

from memsvc.sessions.api import SessionBusyError, Tier
from memsvc.sessions.ownership import LeaseLostError, LeaseTakenError, Ownership
from memsvc.store.hot_state import InProcessHotStateTracker

TTL_MS = 3000


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tracker(clock: Clock) -> InProcessHotStateTracker:
    return InProcessHotStateTracker(clock=clock)


def _node(tracker: InProcessHotStateTracker, clock: Clock, name: str) -> Ownership:
    return Ownership(tracker, name, TTL_MS, clock=clock)


def test_a_lease_is_renewed_after_a_third_of_its_ttl(tracker, clock) -> None:
    node = _node(tracker, clock, "a")
    lease = node.acquire("s")
    clock.now += 0.9
    assert node.keep("s") == lease and node.due_for_renewal() == []
    clock.now += 0.2  # 1.1 s: due
    assert node.due_for_renewal() == ["s"]
    assert node.keep("s") == lease
    clock.now += 2.5  # 3.6 s after the start, 2.5 s after the renewal: still held
    assert tracker.lease_holder("s") == lease
    with pytest.raises(SessionBusyError, match="owned by a"):
        _node(tracker, clock, "b").acquire("s")


def test_a_lapsed_lease_nobody_took_is_taken_again(tracker, clock) -> None:
    node = _node(tracker, clock, "a")
    lease = node.acquire("s")
    clock.now += 10
    fresh = node.keep("s")
    assert (fresh.node, fresh.fence) == ("a", lease.fence + 1)


def test_another_owner_in_between_invalidates_the_copy(tracker, clock) -> None:
    node, other = _node(tracker, clock, "a"), _node(tracker, clock, "b")
    lease = node.acquire("s")
    clock.now += 10
    other.acquire("s")
    other.release("s")
    with pytest.raises(LeaseLostError):
        node.keep("s")
    assert node.lease("s").fence == lease.fence + 2  # held again, for a restore from disk


def test_another_owner_holding_it_now(tracker, clock) -> None:
    node, other = _node(tracker, clock, "a"), _node(tracker, clock, "b")
    node.acquire("s")
    clock.now += 10
    other.acquire("s")
    with pytest.raises(LeaseTakenError):
        node.keep("s")
    assert node.lease("s") is None


def test_hot_state_refreshes_are_throttled(tracker, clock) -> None:
    node = _node(tracker, clock, "a")
    node.publish("s", Tier.DEVICE, 10, 1.0)
    node.refresh("s", Tier.DEVICE, 20, 1.0)
    assert tracker.get("s").position == 10
    clock.now += 1.0
    node.refresh("s", Tier.DEVICE, 30, 2.0)
    assert (tracker.get("s").position, tracker.get("s").write_rate) == (30, 2.0)
    node.forget("s")
    assert tracker.get("s") is None
