"""Restoring a session from disk: the newest checkpoint that verifies, then a replay of its log.

Recovery, step by step:

1. The log is opened. A torn tail (a crash mid-append: never acknowledged)
   is cut with a warning; a corrupt record is cut too, but acknowledged
   tokens after it are lost, so that is an error and a CORRUPTION event. A
   log with an unreadable header is moved aside (``wal.log.damaged-<time>``).
2. The recorded checkpoints are tried newest first (``newest_valid_checkpoint``):
   a damaged or truncated file is skipped with an error and a CORRUPTION
   event, and the previous checkpoint plus a longer replay is used; nothing
   is ever served from a file that fails its checksum.
3. If the log does not reach the checkpoint (it was damaged or lost before
   the checkpoint's offset), the checkpoint holds everything up to its
   position: the log restarts there, at the checkpoint's offset.
4. The records after the checkpoint are replayed through the engine in one
   append (any split of a stream gives the same state).

A restore by a lease holder first seizes the session (``fencing.py``): its
claim goes to SQL and to the owner file, and the log is copied to a new file,
so a replica that lost the lease can neither get a write acknowledged nor
write into the log this node continues.

Checkpoint files without a row (pruned, or written by a crashed checkpoint
before its row committed) are deleted first: nothing refers to them.

Without any usable checkpoint a session can start from a fresh state only
if its log still begins at position 0; otherwise it cannot be restored
(UnrecoverableSessionError) and the manager quarantines it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
import torch

from memsvc.engine import StreamingEngine
from memsvc.model import ModelState
from memsvc.sessions.checkpoint import CheckpointError, newest_valid_checkpoint
from memsvc.sessions.durability import SessionRepository
from memsvc.sessions.fencing import Claim
from memsvc.sessions.wal import CorruptWalHeaderError, DamageKind, WriteAheadLog
from memsvc.store.models import CheckpointRow

log = structlog.get_logger(__name__)


class UnrecoverableSessionError(Exception):
    """No checkpoint verifies and the log cannot rebuild the state from the start."""


@dataclass
class Restored:
    """A session back in memory, with its log open for appending."""

    state: ModelState
    wal: WriteAheadLog
    sequence: int  # number of the newest recorded checkpoint (0: none yet)
    checkpoint_position: int  # position of the checkpoint the state was built from (0: none)
    fell_back: bool  # the newest recorded checkpoint was unusable: an older one (or none) served
    claim: Claim | None = None  # the claim the files were seized with


def restore_session(
    store: SessionRepository,
    engine: StreamingEngine,
    tenant_id: str,
    session_id: str,
    claim: Claim | None = None,
) -> Restored:
    """Rebuilds the session's state from its files (module docstring).

    With ``claim`` (the restoring lease holder's), the session is seized first
    (``fencing.py``): FenceBehindError if a newer claim is recorded.
    """
    if claim is None:
        rows, wal = _read_files(store, tenant_id, session_id)
    else:
        with store.owner(session_id).locked():
            previous = store.claim(session_id, claim)
            rows, wal = _read_files(store, tenant_id, session_id)
            if wal is not None and (previous is None or previous.incarnation != claim.incarnation):
                try:
                    wal.rotate()  # a fenced-out writer's descriptor no longer reaches the log
                except BaseException:
                    wal.close()
                    raise
    try:
        floor = 0 if wal is None else wal.base_offset
        reachable = [row for row in rows if row.wal_offset >= floor or wal is None]

        def rejected(path: Path, error: CheckpointError | OSError) -> None:
            reason = error.reason if isinstance(error, CheckpointError) else repr(error)
            store.record_corruption(
                tenant_id, session_id, file=str(path), error=type(error).__name__, reason=reason
            )

        checkpoint = newest_valid_checkpoint(
            (store.absolute(row.path) for row in reachable),
            model_hash=store.identity.model_hash,
            config_hash=store.identity.config_hash,
            on_rejected=rejected,
        )
        if checkpoint is not None:
            state = ModelState.from_dict(checkpoint.tensors).to(engine.device)
            start, position = checkpoint.header.wal_offset, checkpoint.header.position
            if wal is None or wal.end_offset < start:
                wal = _restart_log(store, tenant_id, session_id, wal, start, position)
        else:
            if wal is None and rows:
                raise UnrecoverableSessionError(
                    f"none of the {len(rows)} recorded checkpoints is usable, and no log"
                )
            if wal is None:
                wal = store.create_log(session_id, offset=0, position=0)
            state, start, position = engine.init_state(), wal.base_offset, 0
        state = _replay(engine, state, wal, start, position)
    except BaseException:
        if wal is not None:
            wal.close()
        raise
    return Restored(
        state=state,
        wal=wal,
        sequence=rows[0].generation if rows else 0,
        checkpoint_position=0 if checkpoint is None else checkpoint.header.position,
        fell_back=bool(rows)
        and (checkpoint is None or checkpoint.path != store.absolute(rows[0].path)),
        claim=claim,
    )


def _read_files(
    store: SessionRepository, tenant_id: str, session_id: str
) -> tuple[list[CheckpointRow], WriteAheadLog | None]:
    """The recorded checkpoints (files without a row removed) and the opened log."""
    rows = store.checkpoint_rows(session_id)
    store.remove_unrecorded(session_id, rows)
    return rows, _open_log(store, tenant_id, session_id)


def _open_log(store: SessionRepository, tenant_id: str, session_id: str) -> WriteAheadLog | None:
    """The session's log with any damaged tail cut; None if it is missing or unreadable."""
    path = store.wal_path(session_id)
    if not path.exists():
        return None
    try:
        wal = WriteAheadLog.open(path)
    except CorruptWalHeaderError as error:
        aside = _move_aside(path)
        store.record_corruption(
            tenant_id,
            session_id,
            file=str(path),
            error="CorruptWalHeaderError",
            reason=str(error),
            moved_to=str(aside),
        )
        return None
    damage = wal.recovered_damage
    if damage is not None and damage.kind is DamageKind.CORRUPT:
        store.record_corruption(
            tenant_id,
            session_id,
            file=str(path),
            error="WalDamage",
            reason=damage.detail,
            offset=damage.offset,
        )
    return wal


def _restart_log(
    store: SessionRepository,
    tenant_id: str,
    session_id: str,
    wal: WriteAheadLog | None,
    offset: int,
    position: int,
) -> WriteAheadLog:
    """A fresh log at the checkpoint's offset, the old one (if any) moved aside."""
    path = store.wal_path(session_id)
    if wal is not None:
        wal.close()
        aside = _move_aside(path)
        store.record_corruption(
            tenant_id,
            session_id,
            file=str(path),
            error="WalBehindCheckpoint",
            reason=f"the log ends at offset {wal.end_offset}, the checkpoint is at {offset}",
            moved_to=str(aside),
        )
    return store.create_log(session_id, offset=offset, position=position)


def _move_aside(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.damaged-{time.time_ns()}")
    path.rename(aside)
    return aside


def _replay(
    engine: StreamingEngine, state: ModelState, wal: WriteAheadLog, start: int, position: int
) -> ModelState:
    """``state`` (at ``position``) after every record of ``wal`` from offset ``start``."""
    batches = []
    expected = position
    for record in wal.replay(start):
        if record.position != expected:  # e.g. no usable checkpoint and a cut log
            raise UnrecoverableSessionError(
                f"the log record ending at offset {record.end_offset} starts at position "
                f"{record.position}, the state is at {expected}"
            )
        batches.append(record.tokens)
        expected += record.tokens.size
    if expected != wal.next_position:
        raise UnrecoverableSessionError(
            f"the log ends at position {wal.next_position}, the replay reached {expected}"
        )
    if batches:
        tokens = torch.from_numpy(np.concatenate(batches)).to(torch.int64)
        state, _ = engine.append(state, tokens)
        log.info("wal_replayed", tokens=int(tokens.numel()), from_position=position)
    return state
