"""Residency: the LRU table on its own, then many sessions cycling through a small device budget."""

from __future__ import annotations

import threading

import pytest

from memsvc.engine import SamplingParams, StreamingEngine
from memsvc.sessions.api import AppendResult, InvalidRequestError, QuotaExceededError, Tier
from memsvc.sessions.residency import ResidencyTable, tier_below
from memsvc.sessions.state_check import max_state_bytes
from tests.sessions.conftest import MakeManager, new_tenant, random_batches
from tests.sessions.helpers import assert_matches_reference, state_of
from tests.state_asserts import assert_states_equal


def _table() -> ResidencyTable:
    table = ResidencyTable({Tier.DEVICE: 100, Tier.HOST: 50})
    for i, name in enumerate("abcd"):
        table.place(name, Tier.DEVICE, 25, now=float(10 - i))  # d is the least recent
    return table


def test_victims_are_least_recently_used_first() -> None:
    table = _table()
    assert table.used(Tier.DEVICE) == 100
    assert table.victims(Tier.DEVICE, 0) == []
    assert table.victims(Tier.DEVICE, 25) == ["d"]
    assert table.victims(Tier.DEVICE, 26) == ["d", "c"]
    table.touch("d", now=100.0)
    assert table.victims(Tier.DEVICE, 50) == ["c", "b"]


def test_pinned_sessions_are_never_victims() -> None:
    table = _table()
    table.pin("d")
    table.pin("d")
    table.unpin("d")
    assert table.pinned("d")
    assert table.victims(Tier.DEVICE, 50) == ["c", "b"]
    for name in "abc":
        table.pin(name)
    with pytest.raises(QuotaExceededError, match="0 free and 0 held"):
        table.victims(Tier.DEVICE, 1)
    table.unpin("d")
    assert not table.pinned("d")
    assert table.victims(Tier.DEVICE, 25) == ["d"]


def test_a_state_over_the_budget_never_fits() -> None:
    table = ResidencyTable({Tier.DEVICE: 100})
    with pytest.raises(QuotaExceededError):
        table.victims(Tier.DEVICE, 101)
    assert table.victims(Tier.HOST, 0) == []  # no host tier: nothing there, nothing fits
    with pytest.raises(QuotaExceededError):
        table.victims(Tier.HOST, 1)


def test_moving_between_tiers_moves_the_bytes() -> None:
    table = _table()
    table.place("d", Tier.HOST, 25, now=0.0)
    table.resize("c", 30)
    assert (table.used(Tier.DEVICE), table.used(Tier.HOST)) == (80, 25)
    assert (table.count(Tier.DEVICE), table.count(Tier.HOST)) == (3, 1)
    table.remove("d")
    assert table.get("d") is None and table.used(Tier.HOST) == 0
    assert [tier_below(t) for t in (Tier.DEVICE, Tier.HOST)] == [Tier.HOST, Tier.DISK]


def test_hundreds_of_sessions_cycle_through_a_small_budget(
    make_manager: MakeManager, engine: StreamingEngine, database
) -> None:
    slot = max_state_bytes(engine.init_state(), engine.chunk_size)
    manager = make_manager(device_budget_bytes=3 * slot, checkpoint_every_tokens=24)
    tenant = new_tenant(database)
    sessions = [manager.create(tenant).session_id for _ in range(200)]
    # The reference: each session's state kept here, stepped by the engine alone.
    references = {s: engine.init_state() for s in sessions}
    batches = iter(random_batches(2 * len(sessions), seed=7, high=12))

    def check(session: str, tokens: list[int], result: AppendResult) -> None:
        references[session], expected = engine.append(references[session], tokens)
        assert result.position == expected.position
        assert result.writes_applied == expected.writes_applied
        assert result.memory_norm == pytest.approx(expected.memory_norm, rel=1e-9)
        assert result.surprise == pytest.approx(expected.surprise_ema, rel=1e-9, abs=1e-12)

    for s in sessions:  # one by one: every touch restores one session and evicts another
        tokens = next(batches)
        check(s, tokens, manager.append(tenant, s, tokens))
    for i in range(0, len(sessions), 3):  # batched: three sessions per engine step
        items = [(tenant, s, next(batches)) for s in sessions[i : i + 3]]
        for (_, s, tokens), result in zip(items, manager.append_many(items), strict=True):
            check(s, tokens, result)
        stats = manager.stats()
        assert stats.bytes_used[Tier.DEVICE] <= 3 * slot
        assert stats.resident[Tier.DEVICE] <= 3
    stats = manager.stats()
    assert stats.evictions >= 2 * len(sessions) - 3
    assert stats.restores >= 2 * len(sessions) - 3
    for s in sessions[::8] + sessions[-3:]:  # whole states, attention caches included
        assert_states_equal(state_of(manager, tenant, s), references[s], rtol=1e-9, atol=1e-9)
        assert manager.get(tenant, s).position == int(references[s].position[0])


def test_a_session_in_use_is_never_evicted(
    make_manager: MakeManager, engine: StreamingEngine, database
) -> None:
    slot = max_state_bytes(engine.init_state(), engine.chunk_size)
    manager = make_manager(device_budget_bytes=2 * slot)
    tenant = new_tenant(database)
    busy, *others = [manager.create(tenant).session_id for _ in range(6)]
    manager.append(tenant, busy, [1, 2, 3])
    generation = manager.generate(tenant, busy, [4], SamplingParams(max_new_tokens=3, seed=0))
    for s in others:
        manager.append(tenant, s, [5, 6])  # one slot left: the others take turns in it
        resident = {r.session_id: r for r in manager.resident()}
        assert resident[busy].pinned and resident[busy].tier is Tier.DEVICE
        assert set(resident) == {busy, s}
    second = manager.generate(tenant, others[-1], [7], SamplingParams(max_new_tokens=2, seed=0))
    with pytest.raises(QuotaExceededError):  # both slots are in use
        manager.append(tenant, others[0], [8])
    generated = list(generation) + list(second)
    assert len(generated) == 5
    manager.append(tenant, others[0], [8])  # free again
    assert manager.stats().resident[Tier.DEVICE] == 2


def test_evict_and_prefetch(make_manager: MakeManager, engine: StreamingEngine, database) -> None:
    manager = make_manager()
    tenant = new_tenant(database)
    session = manager.create(tenant).session_id
    assert manager.get(tenant, session).tier is None  # never materialised
    manager.append(tenant, session, [1, 2, 3])
    assert manager.get(tenant, session).tier is Tier.DEVICE
    manager.evict(tenant, session)
    info = manager.get(tenant, session)
    assert (info.tier, info.state_bytes, info.durable_position) == (Tier.DISK, 0, 3)
    manager.evict(tenant, session)  # already there
    manager.prefetch(tenant, session)
    assert manager.get(tenant, session).tier is Tier.DEVICE
    assert manager.stats().restores == 2
    for tier in (Tier.DEVICE, Tier.HOST):  # no host tier without a GPU
        with pytest.raises(InvalidRequestError):
            manager.evict(tenant, session, tier)
    assert_matches_reference(manager, engine, tenant, session, [1, 2, 3])


def test_eviction_waits_for_the_call_in_progress(
    make_manager: MakeManager, engine: StreamingEngine, database
) -> None:
    manager = make_manager()
    tenant = new_tenant(database)
    session = manager.create(tenant).session_id
    generation = manager.generate(tenant, session, [1, 2], SamplingParams(max_new_tokens=4, seed=3))
    evicted = threading.Event()
    worker = threading.Thread(target=lambda: (manager.evict(tenant, session), evicted.set()))
    worker.start()
    assert not evicted.wait(0.3)
    tokens = [1, 2, *generation]
    worker.join(timeout=30)
    assert evicted.is_set()
    assert manager.get(tenant, session).tier is Tier.DISK
    assert_matches_reference(manager, engine, tenant, session, tokens)
