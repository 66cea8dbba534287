"""`SessionManager.mitigate`: the memory's knobs are set, checkpointed with the state (a restart
keeps them), recorded as a MITIGATION event, and observed."""

from __future__ import annotations

import pytest

from memsvc.engine import StreamingEngine
from memsvc.sessions.api import InvalidRequestError
from memsvc.store.database import Database
from memsvc.store.models import EventKind
from tests.sessions.conftest import MakeManager, new_tenant, random_batches
from tests.sessions.helpers import flat, state_of
from tests.state_asserts import assert_states_equal


class Timings:
    """An observer that notes what it heard."""

    def __init__(self) -> None:
        self.heard: list[tuple[str, ...]] = []

    def observe_eviction(self, seconds: float, tier: str) -> None:
        self.heard.append(("eviction", tier))

    def observe_restore(self, seconds: float, tier: str) -> None:
        self.heard.append(("restore", tier))

    def observe_checkpoint(self, seconds: float) -> None:
        self.heard.append(("checkpoint",))

    def count_checkpoint_failure(self) -> None:
        self.heard.append(("checkpoint_failure",))

    def observe_wal_sync(self, seconds: float) -> None:
        self.heard.append(("wal_sync",))

    def count_rollback(self) -> None:
        self.heard.append(("rollback",))


def test_mitigation_is_applied_durable_and_recorded(
    make_manager: MakeManager, database: Database, engine: StreamingEngine
) -> None:
    timings = Timings()
    manager = make_manager(observer=timings)
    tenant = new_tenant(database)
    session = manager.create(tenant).session_id
    before, after = random_batches(3, seed=1), random_batches(3, seed=2)
    for batch in before:
        manager.append(tenant, session, batch)
    checkpoints = manager.stats().checkpoints

    manager.mitigate(tenant, session, 0.25, 1e-4, reason="update_explosion")

    assert manager.stats().checkpoints == checkpoints + 1  # durable at once
    (resident,) = manager.resident()
    assert (resident.step_scale, resident.forget_boost) == (0.25, 1e-4)
    (event,) = manager.events(tenant, kind="mitigation")
    assert (event.session_id, event.kind) == (session, EventKind.MITIGATION.value)
    assert event.payload["step_scale"] == 0.25 and event.payload["forget_boost"] == 1e-4
    assert event.payload["previous_step_scale"] == 1.0
    assert event.payload["reason"] == "update_explosion"
    assert event.payload["position"] == len(flat(before))
    assert manager.events(None, kind="mitigation") == [event]  # the operator's view
    assert manager.events(new_tenant(database, "other")) == []

    # A restart restores the knobs from the checkpoint; the stream goes on under them.
    manager.close()
    restarted = make_manager(observer=timings)
    for batch in after:
        result = restarted.append(tenant, session, batch)
    assert (result.step_scale, result.forget_boost) == (0.25, 1e-4)
    expected, _ = engine.append(engine.init_state(), flat(before))
    expected, _ = engine.append(expected.with_mitigation(0.25, 1e-4), flat(after))
    assert_states_equal(state_of(restarted, tenant, session), expected, rtol=1e-9, atol=1e-9)
    assert {"restore", "checkpoint", "wal_sync"} <= {heard[0] for heard in timings.heard}
    assert ("restore", "disk") in timings.heard


def test_knobs_out_of_range_change_nothing(make_manager: MakeManager, database: Database) -> None:
    manager = make_manager()
    tenant = new_tenant(database)
    session = manager.create(tenant).session_id
    manager.append(tenant, session, [1, 2, 3])
    for step_scale, forget_boost in ((0.0, 0.0), (1.5, 0.0), (0.5, 1.0), (0.5, -0.1)):
        with pytest.raises(InvalidRequestError):
            manager.mitigate(tenant, session, step_scale, forget_boost)
    (resident,) = manager.resident()
    assert (resident.step_scale, resident.forget_boost) == (1.0, 0.0)
    assert manager.events(tenant) == []
    with pytest.raises(InvalidRequestError, match="unknown event kind"):
        manager.events(tenant, kind="nonsense")
