"""`append_many` with ``durable``: states applied at once, acknowledgements once the logs
are durable, from the acknowledging thread, in order; a record lost before it is
durable fails its acknowledgement and unloads the session (``batch.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

import kernels.decode_step as decode_step
from memsvc.engine import StreamingEngine
from memsvc.sessions.api import AppendResult, SessionMovedError
from memsvc.sessions.fencing import Claim, OwnerFile
from memsvc.store.database import Database
from tests.engine.conftest import tiny_model
from tests.sessions.conftest import MakeManager, new_tenant, random_batches
from tests.sessions.helpers import Acks, assert_matches_reference, flat

Outcome = AppendResult | Exception


def _same(got: AppendResult, want: AppendResult) -> None:
    assert (got.position, got.appended, got.writes_applied, got.writes_skipped) == (
        want.position,
        want.appended,
        want.writes_applied,
        want.writes_skipped,
    )
    assert got.wal_offset == want.wal_offset
    assert got.memory_norm == pytest.approx(want.memory_norm, rel=1e-9)
    assert got.surprise == pytest.approx(want.surprise, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("alone", [False, True], ids=["batched", "one-by-one"])
def test_deferred_acknowledgements_equal_the_synchronous_results(
    make_manager: MakeManager, database: Database, tmp_path: Path, alone: bool
) -> None:
    # Batched: the eager forward steps each round's sessions together. One by one: the
    # C++ chunk path steps them alone, so each item is a round of its own.
    if alone:
        decode_step.load()
    engine = StreamingEngine(tiny_model(seed=0), max_segment=64, decode_cpp=alone)
    assert engine.steps_alone() is alone
    deferred = make_manager(engine=engine)
    synced = make_manager(data_dir=tmp_path / "other", engine=engine)
    tenant = new_tenant(database)
    names = [deferred.create(tenant).session_id for _ in range(3)]
    twins = [synced.create(tenant).session_id for _ in range(3)]
    batches = random_batches(24, seed=5, high=40)
    acks = Acks()
    sent: dict[int, list[list[int]]] = {i: [] for i in range(3)}
    for call in range(4):
        # Session 0 twice per call (two rounds), a missing session, a bad token.
        plan = [0, 1, 0, 2, 1, 0][: 3 + call]
        tokens = [batches[6 * call + k] for k in range(len(plan))]
        items: list[tuple[str, str, list[int]]] = [
            (tenant, names[i], t) for i, t in zip(plan, tokens, strict=True)
        ]
        items.insert(1, (tenant, "missing", [1]))
        items.append((tenant, names[2], [10_000]))
        results = deferred.append_many(items, acks)
        want = synced.append_many(
            [(tenant, twins[i], t) for i, t in zip(plan, tokens, strict=True)]
        )
        applied = [i for i, r in enumerate(results) if isinstance(r, AppendResult)]
        assert len(applied) == len(plan) == len(results) - 2
        calls = acks.take(len(applied))
        # Once per applied item, in the order the rounds ran (batched: round n holds each
        # session's n-th item; one by one: item order), from the acknowledging thread,
        # with the result handed out.
        seen: dict[str, int] = {}
        rank = {}
        for i, item in enumerate(items):
            rank[i] = (0 if alone else seen.get(item[1], 0), i)
            seen[item[1]] = seen.get(item[1], 0) + 1
        assert [index for index, _, _ in calls] == sorted(applied, key=rank.__getitem__)
        for index, outcome, thread in calls:
            assert thread.startswith("memsvc-wal-ack")
            assert outcome is results[index]
        for got, expected in zip([results[i] for i in applied], want, strict=True):
            assert isinstance(expected, AppendResult)
            _same(got, expected)  # type: ignore[arg-type]
        for i, t in zip(plan, tokens, strict=True):
            sent[i].append(t)
    assert acks.calls.empty()
    for i, name in enumerate(names):
        assert_matches_reference(deferred, engine, tenant, name, flat(sent[i]))
        assert deferred.get(tenant, name).position == len(flat(sent[i]))


def test_an_acknowledgement_waits_for_the_log_and_a_lost_claim_fails_it(
    make_manager: MakeManager, engine: StreamingEngine, database: Database, data_dir: Path
) -> None:
    manager = make_manager()
    tenant = new_tenant(database)
    held, victim = (manager.create(tenant).session_id for _ in range(2))
    acks = Acks()
    acks.gate.clear()  # the acknowledging thread stops at the first acknowledgement
    [first] = manager.append_many([(tenant, held, [1, 2, 3])], acks)
    [second] = manager.append_many([(tenant, victim, [4, 5])], acks)
    assert isinstance(first, AppendResult) and isinstance(second, AppendResult)
    # Applied, not yet acknowledged: later appends build on it.
    [third] = manager.append_many([(tenant, victim, [6])], acks)
    assert isinstance(third, AppendResult) and third.position == 3
    assert acks.calls.empty()
    # Another node seizes the victim's files before its records are acknowledged.
    owner = OwnerFile(data_dir / "sessions" / victim)
    claim = owner.read()
    assert claim is not None
    with owner.locked():
        owner.seize(Claim(claim.fence + 1, "node-x", "node-x/1"))
    acks.gate.set()
    outcomes = [outcome for _, outcome, _ in acks.take(3)]
    assert outcomes[0] is first
    # Durable, but the claim they were written under no longer stands: refused, and the
    # state holding them is dropped (the next use restores from disk).
    for outcome in outcomes[1:]:
        assert isinstance(outcome, SessionMovedError)
    assert manager.get(tenant, held).position == 3
    assert_matches_reference(manager, engine, tenant, held, [1, 2, 3])
    assert sum(manager.stats().resident.values()) == 1  # the victim's state is gone
