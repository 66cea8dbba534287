"""The metadata repository: typed functions over one unit of work (a SQLAlchemy ``Session``).

Each function takes the unit of work as ``db`` and neither commits nor rolls
back: the caller's ``Database.unit_of_work()`` block does, so several calls
compose into one transaction. Tenant-facing reads and writes are scoped by
``tenant_id``; a session of another tenant is reported exactly like a missing one.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from memsvc.store.errors import (
    AlreadyExistsError,
    GenerationConflictError,
    NotFoundError,
    QuotaExceededError,
    StaleFenceError,
)
from memsvc.store.models import CheckpointRow, EventKind, EventRow, SessionRow, TenantRow, utcnow

API_KEY_SCHEME = "msk"
DEFAULT_MAX_SESSIONS = 100
DEFAULT_TOKENS_PER_MINUTE = 1_000_000

# Compared against when a key's id is unknown, so both outcomes cost the same.
_NO_SUCH_KEY_DIGEST = hashlib.sha256(b"no such key").hexdigest()


def hash_api_key(api_key: str) -> str:
    """The stored form of an API key: its SHA-256, hex.

    A key carries 256 random bits, so an unsalted fast hash cannot be inverted
    by guessing; salting and stretching protect low-entropy passwords, not this.
    """
    return hashlib.sha256(api_key.encode()).hexdigest()


def _key_id(api_key: str) -> str | None:
    scheme, _, rest = api_key.partition("_")
    key_id, _, secret = rest.partition("_")
    if scheme != API_KEY_SCHEME or not key_id or not secret:
        return None
    return key_id


def create_tenant(
    db: Session,
    name: str,
    *,
    max_sessions: int = DEFAULT_MAX_SESSIONS,
    tokens_per_minute: int = DEFAULT_TOKENS_PER_MINUTE,
) -> tuple[TenantRow, str]:
    """Creates a tenant; returns it and its API key, shown this once and never stored.

    Keys look like ``msk_<key id>_<secret>``: the public key id finds the row,
    the digest of the whole key authenticates it. AlreadyExistsError if the
    name is taken (a concurrent create of the same name fails on the unique
    constraint instead).
    """
    if max_sessions < 0 or tokens_per_minute < 0:
        raise ValueError("quotas must be non-negative")
    if db.scalar(select(TenantRow.id).where(TenantRow.name == name)) is not None:
        raise AlreadyExistsError(f"tenant {name!r} already exists")
    key_id = secrets.token_hex(8)
    api_key = f"{API_KEY_SCHEME}_{key_id}_{secrets.token_urlsafe(32)}"
    tenant = TenantRow(
        name=name,
        api_key_id=key_id,
        api_key_hash=hash_api_key(api_key),
        max_sessions=max_sessions,
        tokens_per_minute=tokens_per_minute,
    )
    db.add(tenant)
    db.flush()
    return tenant, api_key


def authenticate(db: Session, api_key: str) -> TenantRow | None:
    """The tenant owning ``api_key``, or None. Digests are compared in constant time."""
    key_id = _key_id(api_key)
    tenant = None
    if key_id is not None:
        tenant = db.scalars(select(TenantRow).where(TenantRow.api_key_id == key_id)).one_or_none()
    stored = tenant.api_key_hash if tenant is not None else _NO_SUCH_KEY_DIGEST
    if hmac.compare_digest(stored, hash_api_key(api_key)) and tenant is not None:
        return tenant
    return None


def find_tenant(db: Session, name: str) -> TenantRow | None:
    """The tenant named ``name``, or None."""
    return db.scalars(select(TenantRow).where(TenantRow.name == name)).one_or_none()


def create_session(db: Session, tenant_id: str, *, name: str, model_hash: str) -> SessionRow:
    """Creates a session for a tenant; QuotaExceededError if it has ``max_sessions`` live ones."""
    # Locking the tenant row serialises concurrent creates (PostgreSQL; SQLite's
    # units of work are serialised already), so the count cannot go stale.
    tenant = db.scalars(
        select(TenantRow).where(TenantRow.id == tenant_id).with_for_update()
    ).one_or_none()
    if tenant is None:
        raise NotFoundError(f"tenant {tenant_id} not found")
    live = db.scalar(
        select(func.count())
        .select_from(SessionRow)
        .where(SessionRow.tenant_id == tenant_id, SessionRow.deleted.is_(False))
    )
    if live is not None and live >= tenant.max_sessions:
        raise QuotaExceededError(
            f"tenant {tenant_id} has {live} sessions, its quota is {tenant.max_sessions}"
        )
    session = SessionRow(tenant_id=tenant_id, name=name, model_hash=model_hash)
    db.add(session)
    db.flush()
    return session


def get_session(db: Session, tenant_id: str, session_id: str) -> SessionRow:
    """A live session of the tenant; NotFoundError if missing, deleted or another tenant's."""
    session = db.scalars(
        select(SessionRow).where(
            SessionRow.id == session_id,
            SessionRow.tenant_id == tenant_id,
            SessionRow.deleted.is_(False),
        )
    ).one_or_none()
    if session is None:
        raise NotFoundError(f"session {session_id} not found")
    return session


def list_sessions(db: Session, tenant_id: str) -> list[SessionRow]:
    """The tenant's live sessions, oldest first."""
    return list(
        db.scalars(
            select(SessionRow)
            .where(SessionRow.tenant_id == tenant_id, SessionRow.deleted.is_(False))
            .order_by(SessionRow.created_at, SessionRow.id)
        )
    )


def delete_session(db: Session, tenant_id: str, session_id: str) -> SessionRow:
    """Marks a live session of the tenant deleted and returns it; NotFoundError otherwise.

    The row and its checkpoint rows stay (audit, file clean-up); the session no
    longer counts against the quota and is invisible to the tenant.
    """
    session = get_session(db, tenant_id, session_id)
    session.deleted = True
    session.updated_at = utcnow()
    db.flush()
    return session


def _fenced_session(db: Session, session_id: str, fence: int) -> tuple[SessionRow, int]:
    """The live session's row, locked, and the newest fence recorded for it (the row's or a
    checkpoint's); StaleFenceError if ``fence`` is older, NotFoundError if it is gone."""
    session = db.scalars(
        select(SessionRow)
        .where(SessionRow.id == session_id, SessionRow.deleted.is_(False))
        .with_for_update()
    ).one_or_none()
    if session is None:
        raise NotFoundError(f"session {session_id} not found")
    newest = db.scalar(
        select(func.max(CheckpointRow.fence)).where(CheckpointRow.session_id == session_id)
    )
    newest = max(newest or 0, session.fence)
    if fence < newest:
        raise StaleFenceError(session_id, fence, newest)
    return session, newest


def claim_session(db: Session, session_id: str, fence: int) -> int:
    """Records that the holder of lease ``fence`` took the session; returns the newest fence
    recorded for it before (its checkpoints' included).

    Raises StaleFenceError if a newer fence is recorded already, NotFoundError
    if the session is missing or deleted. Checkpoints recorded with an older
    fence are refused from then on (``record_checkpoint``).
    """
    session, newest = _fenced_session(db, session_id, fence)
    session.fence = fence
    return newest


def record_checkpoint(
    db: Session,
    session_id: str,
    *,
    generation: int,
    path: str,
    position: int,
    wal_offset: int,
    checksum: str,
    size_bytes: int,
    fence: int,
) -> CheckpointRow:
    """Records a checkpoint file written by the holder of lease ``fence`` and advances the session.

    Raises StaleFenceError if a checkpoint with a newer fence is already
    recorded (the writer lost its lease and must not overwrite the new owner's
    progress), GenerationConflictError if ``generation`` is not newer than the
    newest recorded one, NotFoundError if the session is missing or deleted.
    """
    session, _ = _fenced_session(db, session_id, fence)
    newest_generation = db.scalar(
        select(func.max(CheckpointRow.generation)).where(CheckpointRow.session_id == session_id)
    )
    if newest_generation is not None and generation <= newest_generation:
        raise GenerationConflictError(
            f"session {session_id}: generation {generation} is not newer than "
            f"the recorded generation {newest_generation}"
        )
    checkpoint = CheckpointRow(
        session_id=session_id,
        generation=generation,
        path=path,
        position=position,
        wal_offset=wal_offset,
        checksum=checksum,
        size_bytes=size_bytes,
        fence=fence,
    )
    db.add(checkpoint)
    session.position = position
    session.updated_at = utcnow()
    db.flush()
    return checkpoint


def list_checkpoints(db: Session, session_id: str) -> list[CheckpointRow]:
    """A session's recorded checkpoints, newest generation first."""
    return list(
        db.scalars(
            select(CheckpointRow)
            .where(CheckpointRow.session_id == session_id)
            .order_by(CheckpointRow.generation.desc())
        )
    )


def prune_checkpoints(db: Session, session_id: str, keep: int) -> list[CheckpointRow]:
    """Deletes all but the ``keep`` newest checkpoint rows and returns the deleted ones.

    Their files remain: the caller deletes them (after this unit of work commits).

    ``keep`` is at least 1: the newest row carries the session's newest fence.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    pruned = list_checkpoints(db, session_id)[keep:]
    for checkpoint in pruned:
        db.delete(checkpoint)
    db.flush()
    return pruned


def record_event(
    db: Session,
    tenant_id: str,
    kind: EventKind,
    payload: dict[str, Any],
    *,
    session_id: str | None = None,
) -> EventRow:
    """Appends an audit event; ``payload`` must be JSON-serialisable."""
    event = EventRow(tenant_id=tenant_id, session_id=session_id, kind=kind.value, payload=payload)
    db.add(event)
    db.flush()
    return event


def list_events(
    db: Session,
    tenant_id: str | None,
    *,
    session_id: str | None = None,
    kind: EventKind | None = None,
    limit: int = 100,
) -> list[EventRow]:
    """The tenant's newest events first (every tenant's for None: the operator's view),
    optionally of one session and one kind."""
    query = select(EventRow)
    if tenant_id is not None:
        query = query.where(EventRow.tenant_id == tenant_id)
    if session_id is not None:
        query = query.where(EventRow.session_id == session_id)
    if kind is not None:
        query = query.where(EventRow.kind == kind.value)
    return list(db.scalars(query.order_by(EventRow.id.desc()).limit(limit)))
