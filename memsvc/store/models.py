"""The SQL schema: tenants, sessions, checkpoints and audit events (SQLAlchemy 2 typed ORM).

Every change here needs an Alembic revision in ``migrations/versions``; the test
``tests/store/test_migrations.py`` fails while the two disagree.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Deterministic constraint names, so that revisions can address them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
_BIG_ID = BigInteger().with_variant(Integer(), "sqlite")
_JSON = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


def new_id() -> str:
    """A fresh random identifier (a UUID4 in its canonical 36-character form)."""
    return str(uuid.uuid4())


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always returned timezone-aware.

    PostgreSQL keeps the zone (``timestamptz``); SQLite keeps none, so values are
    normalised to UTC on the way in and tagged UTC on the way out. Naive values
    are refused rather than guessed.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware value")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class SessionStatus(enum.StrEnum):
    """Whether a session can be served."""

    ACTIVE = "active"
    # Its state could not be restored or kept finite; an operator must look at it.
    QUARANTINED = "quarantined"


class EventKind(enum.StrEnum):
    """What an audit event records. Stored as plain text: a new kind needs no revision."""

    MITIGATION = "mitigation"  # a guard or an operator set a session's memory knobs
    CORRUPTION = "corruption"  # a damaged file found, or a session quarantined
    ROLLBACK = "rollback"  # a non-finite update refused, the session rolled back


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UtcDateTime(), dict[str, Any]: _JSON}


class TenantRow(Base):
    """A customer. Its API key is stored only as a SHA-256 digest, found by a public key id."""

    __tablename__ = "tenants"
    __table_args__ = (
        CheckConstraint("max_sessions >= 0", name="max_sessions_nonnegative"),
        CheckConstraint("tokens_per_minute >= 0", name="tokens_per_minute_nonnegative"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    api_key_id: Mapped[str] = mapped_column(String(32), unique=True)
    api_key_hash: Mapped[str] = mapped_column(String(64))  # sha256 hex of the whole key
    max_sessions: Mapped[int]
    tokens_per_minute: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SessionRow(Base):
    """A memory session. ``position`` is the durable position (as of the newest checkpoint)."""

    __tablename__ = "sessions"
    __table_args__ = (
        CheckConstraint("position >= 0", name="position_nonnegative"),
        Index("ix_sessions_tenant_id_deleted", "tenant_id", "deleted"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    model_hash: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    position: Mapped[int] = mapped_column(BigInteger, default=0)
    status: Mapped[SessionStatus] = mapped_column(
        Enum(
            SessionStatus,
            native_enum=False,
            length=32,
            values_callable=lambda kinds: [kind.value for kind in kinds],
        ),
        default=SessionStatus.ACTIVE,
    )
    deleted: Mapped[bool] = mapped_column(default=False)
    # The newest lease fence that claimed the session (memsvc.sessions.fencing).
    fence: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class CheckpointRow(Base):
    """A checkpoint file of a session, recorded after the file is durable on disk."""

    __tablename__ = "checkpoints"
    __table_args__ = (
        UniqueConstraint("session_id", "generation"),
        CheckConstraint("generation >= 0", name="generation_nonnegative"),
        CheckConstraint("fence >= 0", name="fence_nonnegative"),
    )

    id: Mapped[int] = mapped_column(_BIG_ID, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    generation: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(String(1024))
    position: Mapped[int] = mapped_column(BigInteger)
    wal_offset: Mapped[int] = mapped_column(BigInteger)
    checksum: Mapped[str] = mapped_column(String(128))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    fence: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EventRow(Base):
    """An audit event: an alert fired, a mitigation applied, a corrupt file skipped, ..."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_tenant_id_created_at", "tenant_id", "created_at"),)

    id: Mapped[int] = mapped_column(_BIG_ID, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    session_id: Mapped[str | None] = mapped_column(
        ForeignKey("sessions.id", ondelete="SET NULL"), index=True
    )
    kind: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
