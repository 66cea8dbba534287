"""A session whose update goes non-finite is rolled back: the request is refused with
StateRolledBackError, the session goes back to its last finite state (every acknowledged
token kept), a ROLLBACK event is recorded and the rollback counted; other sessions in the
same batched step go on as if stepped alone. The explosion is induced by infinite memory
weights (or a huge step scale) in the session's state in memory (``helpers.poison``);
nothing is mocked."""

from __future__ import annotations

import pytest

from memsvc.engine import SamplingParams, StreamingEngine
from memsvc.obs.metrics import ServiceMetrics
from memsvc.sessions.api import AppendResult, StateRolledBackError, Tier
from memsvc.store.database import Database
from tests.engine.conftest import CHUNK
from tests.sessions.conftest import MakeManager, new_tenant, random_batches
from tests.sessions.helpers import (
    assert_matches_reference,
    explosive,
    flat,
    poison,
    state_of,
)
from tests.state_asserts import assert_states_equal

ROLLBACKS = "memsvc_state_rollbacks_total"


def _rollback_events(manager, tenant: str, session: str) -> list[dict]:
    return [e.payload for e in manager.events(tenant, kind="rollback", session_id=session)]


def test_a_non_finite_append_is_refused_and_rolled_back(
    make_manager: MakeManager, engine: StreamingEngine, database: Database
) -> None:
    metrics = ServiceMetrics()
    manager = make_manager(observer=metrics)
    tenant = new_tenant(database)
    session = manager.create(tenant).session_id
    acknowledged = flat(random_batches(5, seed=1))
    manager.append(tenant, session, acknowledged)
    poison(manager, tenant, session)

    with pytest.raises(StateRolledBackError) as refused:
        manager.append(tenant, session, list(range(1, 2 * CHUNK + 1)))
    assert refused.value.position == len(acknowledged)
    assert "non-finite" in str(refused.value) and "rolled back" in str(refused.value)

    info = manager.get(tenant, session)
    assert info.position == len(acknowledged)
    assert metrics.registry.get_sample_value(ROLLBACKS) == 1
    events = _rollback_events(manager, tenant, session)
    assert len(events) == 1
    assert events[0]["request"] == "append" and events[0]["position"] == len(acknowledged)
    assert events[0]["from_disk"] is True  # the poisoned state in memory was not finite
    # The last finite state, and it takes appends again.
    more = [7, 8, 9]
    assert manager.append(tenant, session, more).position == len(acknowledged) + len(more)
    assert manager.get(tenant, session).tier is Tier.DEVICE
    assert_matches_reference(manager, engine, tenant, session, acknowledged + more)
    manager.close()  # and after a restart: nothing acknowledged lost, nothing refused kept
    restarted = make_manager()
    assert restarted.get(tenant, session).position == len(acknowledged) + len(more)
    assert_matches_reference(restarted, engine, tenant, session, acknowledged + more)


def test_a_batched_step_refuses_only_the_exploding_session(
    make_manager: MakeManager, engine: StreamingEngine, database: Database
) -> None:
    metrics = ServiceMetrics()
    manager = make_manager(observer=metrics)
    tenant = new_tenant(database)
    sessions = [manager.create(tenant).session_id for _ in range(3)]
    streams = {s: flat(random_batches(3, seed=i)) for i, s in enumerate(sessions)}
    for session, tokens in streams.items():
        manager.append(tenant, session, tokens)
    bad = sessions[1]
    poison(manager, tenant, bad)

    new = {s: flat(random_batches(4, seed=10 + i)) for i, s in enumerate(sessions)}
    results = manager.append_many([(tenant, s, new[s]) for s in sessions] + [(tenant, bad, [3])])
    assert isinstance(results[1], StateRolledBackError)
    assert results[1].position == len(streams[bad])
    # The session's later item in the same call runs on its last finite state.
    assert isinstance(results[3], AppendResult)
    assert results[3].position == len(streams[bad]) + 1
    for index in (0, 2):
        session = sessions[index]
        result = results[index]
        assert isinstance(result, AppendResult)
        assert result.position == len(streams[session]) + len(new[session])
        assert_matches_reference(manager, engine, tenant, session, streams[session] + new[session])
    assert_matches_reference(manager, engine, tenant, bad, [*streams[bad], 3])
    assert metrics.registry.get_sample_value(ROLLBACKS) == 1
    assert [e["request"] for e in _rollback_events(manager, tenant, bad)] == ["append"]


def test_generate_and_query_roll_back_and_commit_nothing(
    make_manager: MakeManager, engine: StreamingEngine, database: Database
) -> None:
    metrics = ServiceMetrics()
    manager = make_manager(observer=metrics)
    tenant = new_tenant(database)
    session = manager.create(tenant).session_id
    acknowledged = flat(random_batches(4, seed=5))
    manager.append(tenant, session, acknowledged)
    prompt = list(range(1, 2 * CHUNK + 1))  # writes the memory: the explosion shows
    params = SamplingParams(max_new_tokens=4, seed=0)

    poison(manager, tenant, session)
    with pytest.raises(StateRolledBackError):
        manager.query(tenant, session, prompt, params)
    poison(manager, tenant, session)
    steps = manager.generate(tenant, session, prompt, params)
    with pytest.raises(StateRolledBackError):
        list(steps)
    steps.close()  # nothing left to commit

    assert manager.get(tenant, session).position == len(acknowledged)
    assert metrics.registry.get_sample_value(ROLLBACKS) == 2
    requests = sorted(e["request"] for e in _rollback_events(manager, tenant, session))
    assert requests == ["generate", "query"]
    # The session was released and is whole: it generates and commits again.
    tokens = list(manager.generate(tenant, session, [4, 5], params))
    assert manager.get(tenant, session).position == len(acknowledged) + 2 + len(tokens)
    assert_matches_reference(manager, engine, tenant, session, [*acknowledged, 4, 5, *tokens])


def test_a_finite_state_that_explodes_is_kept_without_a_restore(
    make_manager: MakeManager, engine: StreamingEngine, database: Database
) -> None:
    metrics = ServiceMetrics()
    manager = make_manager(observer=metrics)
    tenant = new_tenant(database)
    session = manager.create(tenant).session_id
    acknowledged = flat(random_batches(3, seed=7))
    manager.append(tenant, session, acknowledged)
    poison(manager, tenant, session, explosive)  # finite, but its next write overflows
    before = state_of(manager, tenant, session)
    restores = manager.stats().restores

    with pytest.raises(StateRolledBackError):
        manager.append(tenant, session, list(range(1, 2 * CHUNK + 1)))

    assert manager.stats().restores == restores  # the state in memory was the finite one
    assert manager.get(tenant, session).tier is Tier.DEVICE
    assert_states_equal(state_of(manager, tenant, session), before, rtol=0, atol=0)
    (event,) = _rollback_events(manager, tenant, session)
    assert event["from_disk"] is False and event["position"] == len(acknowledged)
    assert metrics.registry.get_sample_value(ROLLBACKS) == 1
