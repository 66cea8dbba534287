"""The metadata repository on SQLite and PostgreSQL: tenants, sessions, checkpoints, events."""

from __future__ import annotations

import hashlib
import threading
from datetime import UTC, timedelta

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from memsvc.store import metadata as repo
from memsvc.store.database import Database
from memsvc.store.errors import (
    AlreadyExistsError,
    GenerationConflictError,
    NotFoundError,
    QuotaExceededError,
    StaleFenceError,
)
from memsvc.store.models import EventKind, SessionStatus, TenantRow, utcnow

MODEL = "sha256:" + "ab" * 32


def _checkpoint(db, session_id: str, generation: int, fence: int, position: int = 0):
    return repo.record_checkpoint(
        db,
        session_id,
        generation=generation,
        path=f"/data/{session_id}/ckpt-{generation:012d}.safetensors",
        position=position,
        wal_offset=position * 4,
        checksum="sha256:" + f"{generation:064x}",
        size_bytes=1000 + generation,
        fence=fence,
    )


def test_tenant_key_is_returned_once_and_stored_as_digest(database: Database) -> None:
    with database.unit_of_work() as db:
        tenant, key = repo.create_tenant(db, "acme", max_sessions=3, tokens_per_minute=500)
    assert key.startswith("msk_")
    with database.unit_of_work() as db:
        row = db.get(TenantRow, tenant.id)
        assert row is not None
        stored = [str(value) for value in row.__dict__.values()]
        assert all(key not in value for value in stored)
        assert row.api_key_hash == hashlib.sha256(key.encode()).hexdigest()
        assert (row.max_sessions, row.tokens_per_minute) == (3, 500)
        assert repo.authenticate(db, key).id == tenant.id


def test_tenant_names_are_unique(database: Database) -> None:
    with database.unit_of_work() as db:
        repo.create_tenant(db, "acme")
    with pytest.raises(AlreadyExistsError), database.unit_of_work() as db:
        repo.create_tenant(db, "acme")
    with pytest.raises(ValueError), database.unit_of_work() as db:
        repo.create_tenant(db, "negative", max_sessions=-1)


def test_authenticate_refuses_wrong_keys(database: Database) -> None:
    with database.unit_of_work() as db:
        acme, acme_key = repo.create_tenant(db, "acme")
        other, other_key = repo.create_tenant(db, "other")
    scheme, key_id, secret = acme_key.split("_", 2)
    forged = f"{scheme}_{key_id}_{'A' * len(secret)}"
    with database.unit_of_work() as db:
        assert repo.authenticate(db, other_key).id == other.id
        for wrong in (forged, acme_key[:-1], "", "msk_", "msk__x", "Bearer " + acme_key, "x" * 80):
            assert repo.authenticate(db, wrong) is None, wrong
        assert repo.authenticate(db, acme_key).id == acme.id


def test_session_lifecycle(database: Database) -> None:
    with database.unit_of_work() as db:
        tenant, _ = repo.create_tenant(db, "acme")
        first = repo.create_session(db, tenant.id, name="first", model_hash=MODEL)
        second = repo.create_session(db, tenant.id, name="second", model_hash=MODEL)
    assert len(first.id) == 36 and first.id != second.id
    assert (first.position, first.status, first.deleted) == (0, SessionStatus.ACTIVE, False)
    with database.unit_of_work() as db:
        got = repo.get_session(db, tenant.id, first.id)
        assert (got.name, got.model_hash, got.status) == ("first", MODEL, SessionStatus.ACTIVE)
        assert [s.id for s in repo.list_sessions(db, tenant.id)] == [first.id, second.id]
        repo.delete_session(db, tenant.id, first.id)
    with database.unit_of_work() as db:
        with pytest.raises(NotFoundError):
            repo.get_session(db, tenant.id, first.id)
        with pytest.raises(NotFoundError):
            repo.delete_session(db, tenant.id, first.id)
        assert [s.id for s in repo.list_sessions(db, tenant.id)] == [second.id]


def test_tenants_see_only_their_sessions(database: Database) -> None:
    with database.unit_of_work() as db:
        acme, _ = repo.create_tenant(db, "acme")
        rival, _ = repo.create_tenant(db, "rival")
        secret = repo.create_session(db, acme.id, name="secret", model_hash=MODEL)
    with database.unit_of_work() as db:
        assert repo.list_sessions(db, rival.id) == []
        with pytest.raises(NotFoundError) as foreign:
            repo.get_session(db, rival.id, secret.id)
        with pytest.raises(NotFoundError):
            repo.delete_session(db, rival.id, secret.id)
        with pytest.raises(NotFoundError) as missing:
            repo.get_session(db, rival.id, "00000000-0000-0000-0000-000000000000")
        # A foreign session reads exactly like a missing one.
        assert str(foreign.value).replace(secret.id, "?") == str(missing.value).replace(
            "00000000-0000-0000-0000-000000000000", "?"
        )
    with database.unit_of_work() as db:
        assert repo.get_session(db, acme.id, secret.id).deleted is False


def test_session_quota(database: Database) -> None:
    with database.unit_of_work() as db:
        tenant, _ = repo.create_tenant(db, "small", max_sessions=2)
        first = repo.create_session(db, tenant.id, name="a", model_hash=MODEL)
        repo.create_session(db, tenant.id, name="b", model_hash=MODEL)
    with pytest.raises(QuotaExceededError), database.unit_of_work() as db:
        repo.create_session(db, tenant.id, name="c", model_hash=MODEL)
    with database.unit_of_work() as db:
        repo.delete_session(db, tenant.id, first.id)
        repo.create_session(db, tenant.id, name="c", model_hash=MODEL)
    with pytest.raises(NotFoundError), database.unit_of_work() as db:
        repo.create_session(db, "no-such-tenant", name="x", model_hash=MODEL)


def test_session_quota_holds_under_concurrent_creates(database: Database) -> None:
    with database.unit_of_work() as db:
        tenant, _ = repo.create_tenant(db, "busy", max_sessions=3)
    outcomes: list[str] = []
    start = threading.Barrier(8)

    def create() -> None:
        start.wait()
        try:
            with database.unit_of_work() as db:
                repo.create_session(db, tenant.id, name="s", model_hash=MODEL)
            outcomes.append("created")
        except QuotaExceededError:
            outcomes.append("refused")

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["created"] * 3 + ["refused"] * 5
    with database.unit_of_work() as db:
        assert len(repo.list_sessions(db, tenant.id)) == 3


def test_checkpoints_are_listed_newest_first_and_advance_the_session(database: Database) -> None:
    with database.unit_of_work() as db:
        tenant, _ = repo.create_tenant(db, "acme")
        session = repo.create_session(db, tenant.id, name="s", model_hash=MODEL)
    for generation in (1, 2, 3):
        with database.unit_of_work() as db:
            _checkpoint(db, session.id, generation, fence=1, position=100 * generation)
    with database.unit_of_work() as db:
        rows = repo.list_checkpoints(db, session.id)
        assert [r.generation for r in rows] == [3, 2, 1]
        newest = rows[0]
        assert (newest.position, newest.wal_offset, newest.size_bytes, newest.fence) == (
            300,
            1200,
            1003,
            1,
        )
        assert newest.path.endswith("ckpt-000000000003.safetensors")
        assert repo.get_session(db, tenant.id, session.id).position == 300


def test_stale_fence_is_refused(database: Database) -> None:
    with database.unit_of_work() as db:
        tenant, _ = repo.create_tenant(db, "acme")
        session = repo.create_session(db, tenant.id, name="s", model_hash=MODEL)
        _checkpoint(db, session.id, 1, fence=1, position=10)
    with database.unit_of_work() as db:
        _checkpoint(db, session.id, 2, fence=2, position=20)  # a new owner took over
    with pytest.raises(StaleFenceError) as refused, database.unit_of_work() as db:
        _checkpoint(db, session.id, 3, fence=1, position=15)  # the old owner wakes up
    assert (refused.value.fence, refused.value.newest_fence) == (1, 2)
    assert refused.value.session_id == session.id
    with database.unit_of_work() as db:
        assert [r.generation for r in repo.list_checkpoints(db, session.id)] == [2, 1]
        assert repo.get_session(db, tenant.id, session.id).position == 20
        _checkpoint(db, session.id, 3, fence=2, position=30)  # the owner writes again
        _checkpoint(db, session.id, 4, fence=7, position=40)  # fences may jump


def test_generation_must_grow(database: Database) -> None:
    with database.unit_of_work() as db:
        tenant, _ = repo.create_tenant(db, "acme")
        session = repo.create_session(db, tenant.id, name="s", model_hash=MODEL)
        _checkpoint(db, session.id, 5, fence=1)
    for generation in (5, 4):
        with pytest.raises(GenerationConflictError), database.unit_of_work() as db:
            _checkpoint(db, session.id, generation, fence=1)


def test_checkpoint_of_a_missing_or_deleted_session_is_refused(database: Database) -> None:
    with database.unit_of_work() as db:
        tenant, _ = repo.create_tenant(db, "acme")
        session = repo.create_session(db, tenant.id, name="s", model_hash=MODEL)
        repo.delete_session(db, tenant.id, session.id)
    for session_id in (session.id, "00000000-0000-0000-0000-000000000000"):
        with pytest.raises(NotFoundError), database.unit_of_work() as db:
            _checkpoint(db, session_id, 1, fence=1)


def test_prune_keeps_the_newest_generations_and_their_fence(database: Database) -> None:
    with database.unit_of_work() as db:
        tenant, _ = repo.create_tenant(db, "acme")
        session = repo.create_session(db, tenant.id, name="s", model_hash=MODEL)
        for generation in range(1, 6):
            _checkpoint(db, session.id, generation, fence=generation)
    with database.unit_of_work() as db:
        pruned = repo.prune_checkpoints(db, session.id, keep=2)
        assert [r.generation for r in pruned] == [3, 2, 1]
        with pytest.raises(ValueError):
            repo.prune_checkpoints(db, session.id, keep=0)
    with database.unit_of_work() as db:
        assert [r.generation for r in repo.list_checkpoints(db, session.id)] == [5, 4]
        assert repo.prune_checkpoints(db, session.id, keep=2) == []
    with pytest.raises(StaleFenceError), database.unit_of_work() as db:
        _checkpoint(db, session.id, 6, fence=4)


def test_events(database: Database) -> None:
    with database.unit_of_work() as db:
        tenant, _ = repo.create_tenant(db, "acme")
        other, _ = repo.create_tenant(db, "other")
        session = repo.create_session(db, tenant.id, name="s", model_hash=MODEL)
        payload = {"metric": "update_rate", "value": 0.75, "nested": {"ids": [1, 2]}}
        repo.record_event(db, tenant.id, EventKind.ROLLBACK, payload, session_id=session.id)
        repo.record_event(db, tenant.id, EventKind.MITIGATION, {"step_size": 0.5})
        repo.record_event(db, other.id, EventKind.CORRUPTION, {"path": "/x"})
    with database.unit_of_work() as db:
        events = repo.list_events(db, tenant.id)
        assert [e.kind for e in events] == ["mitigation", "rollback"]
        assert events[1].payload == payload
        assert events[0].session_id is None
        alerts = repo.list_events(db, tenant.id, session_id=session.id, kind=EventKind.ROLLBACK)
        assert [e.payload for e in alerts] == [payload]
        assert repo.list_events(db, tenant.id, limit=1)[0].kind == "mitigation"
        assert [e.kind for e in repo.list_events(db, other.id)] == ["corruption"]


def test_timestamps_are_utc(database: Database) -> None:
    before = utcnow()
    with database.unit_of_work() as db:
        tenant, _ = repo.create_tenant(db, "acme")
        session = repo.create_session(db, tenant.id, name="s", model_hash=MODEL)
    with database.unit_of_work() as db:
        row = repo.get_session(db, tenant.id, session.id)
        created, updated = row.created_at, row.updated_at
        repo.delete_session(db, tenant.id, session.id)
    assert created.tzinfo is UTC and updated.tzinfo is UTC
    assert before - timedelta(seconds=1) <= created <= utcnow()


def test_unit_of_work_rolls_back_on_error(database: Database) -> None:
    with pytest.raises(RuntimeError), database.unit_of_work() as db:
        repo.create_tenant(db, "ghost")
        raise RuntimeError("abort")
    with database.unit_of_work() as db:
        assert db.scalars(select(TenantRow)).all() == []


def test_foreign_keys_are_enforced(database: Database) -> None:
    with pytest.raises(IntegrityError, match=r"(?i)foreign key"), database.unit_of_work() as db:
        db.execute(
            text(
                "INSERT INTO sessions (id, tenant_id, name, model_hash, created_at, updated_at,"
                " position, status, deleted) VALUES ('s', 'nobody', 'n', 'm', :t, :t, 0,"
                " 'active', false)"
            ),
            {"t": utcnow()},
        )
