"""`SessionRepository`: sessions' durable storage, the one owner of their files and SQL rows.

It holds the write-ahead logs, the checkpoint files, the session and checkpoint
rows and the audit events; the session layer reads and writes them only
through it, and it reaches SQL only through the typed ``memsvc.store`` layer.

Layout under the data directory::

    sessions/<session id>/wal.log                                    the write-ahead log
    sessions/<session id>/owner, owner.lock                          the fencing claim (fencing.py)
    sessions/<session id>/checkpoints/ckpt-<sequence>.safetensors    checkpoints, numbered

Writing a checkpoint: the file is made durable first (``checkpoint.py``:
temporary, fsync, rename, directory fsync); then, in one SQL transaction, its
row is recorded with the lease's fence (a node that lost the lease is
refused) and rows beyond the newest ``keep`` are pruned; after the commit the
pruned files are deleted and the log is truncated before the OLDEST kept
checkpoint's WAL offset, so that when the newest file proves damaged, restore
can still start from an older one and replay a longer tail. Truncation copies
the log's tail and costs two fsyncs, so it waits until the dead prefix reaches
``truncate_bytes`` (readers skip a dead prefix, but still scan it). Pruned
files are deleted off the caller's path (a big unlink can take milliseconds)
and without a directory fsync: a file whose row is gone is never read, and
one a crash leaves behind is removed by the next restore (``remove_unrecorded``).
Rows keep paths relative to the data directory, so the directory can move.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy.orm import Session

from memsvc.model import MAGModel, ModelState, model_hash
from memsvc.sessions.api import (
    CheckpointInfo,
    InvalidRequestError,
    SessionEvent,
    SessionNotFoundError,
)
from memsvc.sessions.checkpoint import CheckpointDirectory, WrittenCheckpoint
from memsvc.sessions.fencing import Claim, FenceBehindError, OwnerFile
from memsvc.sessions.wal import WriteAheadLog
from memsvc.store import metadata
from memsvc.store.database import Database
from memsvc.store.durable_files import fsync_directory
from memsvc.store.errors import NotFoundError, StaleFenceError
from memsvc.store.models import CheckpointRow, EventKind, SessionRow, SessionStatus

log = structlog.get_logger(__name__)

SESSIONS_DIR = "sessions"
WAL_FILE = "wal.log"
CHECKPOINTS_DIR = "checkpoints"


@dataclass(frozen=True)
class StateIdentity:
    """What a checkpoint or an export must match to be restored here: the model and its config."""

    model_hash: str
    config_hash: str

    @classmethod
    def of(cls, model: MAGModel) -> StateIdentity:
        config = json.dumps(model.config.to_dict(), sort_keys=True, separators=(",", ":"))
        return cls(model_hash(model), hashlib.sha256(config.encode()).hexdigest())


class SessionRepository:
    """The files and rows of every session under one data directory.

    Callers serialise the work on one session (the manager's per-session lock);
    different sessions may be written concurrently.
    """

    def __init__(
        self,
        data_dir: Path,
        database: Database,
        identity: StateIdentity,
        *,
        keep: int,
        truncate_bytes: int,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be at least 1, got {keep}")
        self.data_dir = Path(data_dir).absolute()
        self.database = database
        self.identity = identity
        self.keep = keep
        self.truncate_bytes = truncate_bytes
        self.corruptions = 0  # damaged files found (a counter for the metrics)
        self._count_lock = threading.Lock()
        self._deletions = ThreadPoolExecutor(1, thread_name_prefix="memsvc-prune")
        (self.data_dir / SESSIONS_DIR).mkdir(parents=True, exist_ok=True)

    # ---- session rows and events ------------------------------------------------------

    @contextmanager
    def creating(self, tenant_id: str, name: str) -> Iterator[tuple[Session, SessionRow]]:
        """A new session row in an open unit of work, committed when the block ends;
        if the block raises, nothing is committed and the session's files are removed."""
        row = None
        try:
            with self.database.unit_of_work() as db:
                try:
                    row = metadata.create_session(
                        db, tenant_id, name=name, model_hash=self.identity.model_hash
                    )
                except NotFoundError as error:
                    raise InvalidRequestError(f"unknown tenant {tenant_id}") from error
                yield db, row
        except BaseException:
            if row is not None:
                self.remove(row.id)  # never committed: nothing refers to the files
            raise

    def row(self, tenant_id: str, session_id: str) -> SessionRow:
        """The session's row; SessionNotFoundError if it is missing or not the tenant's."""
        try:
            with self.database.unit_of_work() as db:
                return metadata.get_session(db, tenant_id, session_id)
        except NotFoundError as error:
            raise SessionNotFoundError(f"session {session_id} not found") from error

    def rows(self, tenant_id: str) -> list[SessionRow]:
        """The tenant's session rows, oldest first."""
        with self.database.unit_of_work() as db:
            return list(metadata.list_sessions(db, tenant_id))

    def delete_row(self, tenant_id: str, session_id: str) -> None:
        try:
            with self.database.unit_of_work() as db:
                metadata.delete_session(db, tenant_id, session_id)
        except NotFoundError as error:
            raise SessionNotFoundError(str(error)) from error

    def record_event(
        self,
        tenant_id: str,
        kind: EventKind,
        payload: dict[str, Any],
        *,
        session_id: str | None = None,
    ) -> None:
        with self.database.unit_of_work() as db:
            metadata.record_event(db, tenant_id, kind, payload, session_id=session_id)

    def events(
        self, tenant_id: str | None, *, session_id: str | None, kind: EventKind | None, limit: int
    ) -> list[SessionEvent]:
        """Audit events, newest first (of every tenant when ``tenant_id`` is None)."""
        with self.database.unit_of_work() as db:
            rows = metadata.list_events(
                db, tenant_id, session_id=session_id, kind=kind, limit=limit
            )
            return [
                SessionEvent(
                    event_id=row.id,
                    tenant_id=row.tenant_id,
                    session_id=row.session_id,
                    kind=row.kind,
                    created_at=row.created_at,
                    payload=dict(row.payload),
                )
                for row in rows
            ]

    def initialise(
        self, db: Session, row: SessionRow, state: ModelState, claim: Claim
    ) -> CheckpointInfo:
        """The files of a session created holding ``state``: its claim, an empty log at the
        state's position and checkpoint 1, recorded in ``db`` (see ``creating``)."""
        session_id = row.id
        row.fence = claim.fence
        owner = self.owner(session_id)
        with owner.locked():
            owner.seize(claim)
        position = int(state.position[0])
        self.create_log(session_id, offset=0, position=position).close()
        written = self.write_file(session_id, 1, state, wal_offset=0)
        info, _, _ = self.record(db, session_id, 1, written, claim.fence)
        return info

    # ---- files ------------------------------------------------------------------------

    def directory(self, session_id: str) -> Path:
        return self.data_dir / SESSIONS_DIR / session_id

    def wal_path(self, session_id: str) -> Path:
        return self.directory(session_id) / WAL_FILE

    def owner(self, session_id: str) -> OwnerFile:
        """The session's claim file (``fencing.py``)."""
        return OwnerFile(self.directory(session_id))

    def claim(self, session_id: str, claim: Claim) -> Claim | None:
        """Makes ``claim`` the session's, in SQL and in its owner file (hold ``owner().locked``);
        returns the claim it replaced. FenceBehindError if a newer fence is recorded."""
        try:
            with self.database.unit_of_work() as db:
                floor = metadata.claim_session(db, session_id, claim.fence)
        except StaleFenceError as error:
            raise FenceBehindError(str(error), error.newest_fence) from error
        return self.owner(session_id).seize(claim, floor)

    def checkpoint_directory(self, session_id: str) -> CheckpointDirectory:
        return CheckpointDirectory(self.directory(session_id) / CHECKPOINTS_DIR)

    def absolute(self, stored_path: str) -> Path:
        """A path as a checkpoint row stores it, made absolute."""
        return self.data_dir / stored_path

    def create_log(self, session_id: str, *, offset: int, position: int) -> WriteAheadLog:
        """A new, empty log whose first record will be at ``offset`` and ``position``."""
        directory = self.directory(session_id)
        if not directory.is_dir():
            directory.mkdir(parents=True)
            fsync_directory(directory.parent)
        return WriteAheadLog.open(
            self.wal_path(session_id), start_position=position, start_offset=offset
        )

    def checkpoint_rows(self, session_id: str) -> list[CheckpointRow]:
        """The session's recorded checkpoints, newest first."""
        with self.database.unit_of_work() as db:
            return metadata.list_checkpoints(db, session_id)

    def write_file(
        self, session_id: str, sequence: int, state: ModelState, *, wal_offset: int
    ) -> WrittenCheckpoint:
        """Makes a checkpoint file durable (not yet recorded: see ``record``)."""
        return self.checkpoint_directory(session_id).write(
            sequence,
            state.to_dict(),
            model_hash=self.identity.model_hash,
            config_hash=self.identity.config_hash,
            position=int(state.position[0]),
            wal_offset=wal_offset,
        )

    def record(
        self,
        db: Session,
        session_id: str,
        sequence: int,
        written: WrittenCheckpoint,
        fence: int,
    ) -> tuple[CheckpointInfo, list[CheckpointRow], int]:
        """Records a written file in ``db`` and prunes old rows (their files stay: ``checkpoint``).

        Returns the checkpoint, the pruned rows, and the WAL offset of the
        oldest checkpoint kept. StaleFenceError if another owner recorded since.
        """
        metadata.record_checkpoint(
            db,
            session_id,
            generation=sequence,  # the SQL column keeps its first name
            path=str(written.path.relative_to(self.data_dir)),
            position=written.header.position,
            wal_offset=written.header.wal_offset,
            checksum=written.header.checksum,
            size_bytes=written.size_bytes,
            fence=fence,
        )
        pruned = metadata.prune_checkpoints(db, session_id, self.keep)
        oldest_kept = min(row.wal_offset for row in metadata.list_checkpoints(db, session_id))
        info = CheckpointInfo(
            session_id=session_id,
            sequence=sequence,
            position=written.header.position,
            wal_offset=written.header.wal_offset,
            path=str(written.path),
            size_bytes=written.size_bytes,
            checksum=written.header.checksum,
        )
        return info, pruned, oldest_kept

    def checkpoint(
        self,
        session_id: str,
        sequence: int,
        state: ModelState,
        wal: WriteAheadLog,
        fence: int,
        claim: Claim | None = None,
    ) -> CheckpointInfo:
        """Writes, records and prunes checkpoint ``sequence``, then cuts the log (module doc).

        The checkpoint claims every record in ``wal``, so they are made durable first
        (an fsync only if some are not yet). With ``claim`` (a lease holder's:
        ``fencing.py``), FencedOutError before anything is written if another
        holder took the session's files, and the log is truncated only under
        the directory's lock while the claim still stands.
        """
        owner = self.owner(session_id)
        if claim is not None:
            owner.check(claim)
        wal.flush_and_sync()
        # If recording fails the file stays, unrecorded: restore reads only recorded
        # checkpoints, and the next write of this sequence number replaces it.
        written = self.write_file(session_id, sequence, state, wal_offset=wal.end_offset)
        with self.database.unit_of_work() as db:
            info, pruned, oldest_kept = self.record(db, session_id, sequence, written, fence)
        for row in pruned:
            try:
                self._deletions.submit(self._delete, self.absolute(row.path))
            except RuntimeError:  # closed: a checkpoint that was in flight at shutdown
                self._delete(self.absolute(row.path))
        if oldest_kept - wal.base_offset >= self.truncate_bytes:
            if claim is None:
                wal.truncate_before(oldest_kept)
            else:
                with owner.locked():
                    owner.check(claim)
                    wal.truncate_before(oldest_kept)
        return info

    @staticmethod
    def _delete(path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            log.warning("checkpoint_delete_failed", path=str(path), error=repr(error))

    def remove_unrecorded(self, session_id: str, rows: list[CheckpointRow]) -> None:
        """Deletes the session's checkpoint files without a row, and temporaries of cut writes.

        Call it only while no checkpoint of the session is being written (a restore).
        """
        directory = self.checkpoint_directory(session_id)
        directory.remove_temporaries()
        recorded = {row.generation for row in rows}
        for sequence in directory.sequences():
            if sequence not in recorded:
                directory.path_for(sequence).unlink(missing_ok=True)

    def close(self) -> None:
        """Waits for pending deletions."""
        self._deletions.shutdown()

    def record_corruption(self, tenant_id: str, session_id: str, **payload: Any) -> None:
        """Logs a damaged file at error level and records a CORRUPTION event."""
        log.error("session_corruption", tenant=tenant_id, session=session_id, **payload)
        with self._count_lock:
            self.corruptions += 1
        with self.database.unit_of_work() as db:
            metadata.record_event(
                db, tenant_id, EventKind.CORRUPTION, payload, session_id=session_id
            )

    def quarantine(self, tenant_id: str, session_id: str, reason: str) -> None:
        """Marks the session QUARANTINED (it will not be served) and records why."""
        log.error("session_quarantined", tenant=tenant_id, session=session_id, reason=reason)
        with self.database.unit_of_work() as db:
            row = metadata.get_session(db, tenant_id, session_id)
            row.status = SessionStatus.QUARANTINED
            metadata.record_event(
                db,
                tenant_id,
                EventKind.CORRUPTION,
                {"action": "quarantined", "reason": reason},
                session_id=session_id,
            )

    def remove(self, session_id: str) -> None:
        """Deletes the session's log and checkpoint files."""
        directory = self.directory(session_id)
        if directory.exists():
            shutil.rmtree(directory)
            fsync_directory(directory.parent)
