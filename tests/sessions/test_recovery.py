"""Recovery on real files: kill -9 mid-stream, damaged checkpoints, damaged or lost log tails.

Whatever is damaged, a session is either restored to exactly the reference
state over the tokens that survive (every acknowledged one, unless a log
record itself was corrupted) or quarantined; never served from a bad file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from memsvc.engine import StreamingEngine
from memsvc.sessions.api import SessionBusyError
from memsvc.sessions.wal import HEADER_SIZE, WriteAheadLog
from memsvc.store import metadata
from memsvc.store.database import Database
from memsvc.store.models import EventKind, SessionStatus
from tests.sessions.conftest import MakeManager, new_tenant, random_batches
from tests.sessions.helpers import assert_matches_reference, flat

ROOT = Path(__file__).resolve().parents[2]


def _wal_path(data_dir: Path, session: str) -> Path:
    return data_dir / "sessions" / session / "wal.log"


def _checkpoint_paths(database: Database, data_dir: Path, session: str) -> list[Path]:
    """The recorded checkpoint files, newest first."""
    with database.unit_of_work() as db:
        return [data_dir / row.path for row in metadata.list_checkpoints(db, session)]


def _corruptions(database: Database, tenant: str, session: str) -> list[dict]:
    with database.unit_of_work() as db:
        events = metadata.list_events(db, tenant, session_id=session, kind=EventKind.CORRUPTION)
        return [event.payload for event in events]


def _flip_byte(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x40
    path.write_bytes(bytes(data))


def _damage(path: Path, how: str) -> None:
    if how == "flipped":
        _flip_byte(path)
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.unlink()


def _stream_with_checkpoints(
    make_manager: MakeManager, database: Database, **config
) -> tuple[str, str, list[int]]:
    """A session with several checkpoint generations, closed (so its newest covers it all)."""
    manager = make_manager(checkpoint_every_tokens=16, **config)
    tenant = new_tenant(database)
    session = manager.create(tenant).session_id
    batches = random_batches(10, seed=5)
    for batch in batches:
        manager.append(tenant, session, batch)
    manager.close()
    return tenant, session, flat(batches)


@pytest.mark.parametrize("how", ["flipped", "truncated", "missing"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(
    make_manager: MakeManager,
    engine: StreamingEngine,
    database: Database,
    data_dir: Path,
    how: str,
) -> None:
    tenant, session, tokens = _stream_with_checkpoints(make_manager, database)
    newest, previous, *_ = _checkpoint_paths(database, data_dir, session)
    _damage(newest, how)
    manager = make_manager()
    with capture_logs() as logs:
        manager.prefetch(tenant, session)
    assert_matches_reference(manager, engine, tenant, session, tokens)
    [event] = _corruptions(database, tenant, session)
    assert event["file"] == str(newest)
    assert any(e["event"] == "session_corruption" and e["log_level"] == "error" for e in logs)
    assert manager.stats().corruptions == 1
    # A sound generation is written at once, so the damaged one ages out.
    fresh = _checkpoint_paths(database, data_dir, session)[0]
    assert fresh not in (newest, previous)
    assert manager.get(tenant, session).durable_position == len(tokens)


def test_every_checkpoint_damaged_and_no_full_log_quarantines(
    make_manager: MakeManager, database: Database, data_dir: Path
) -> None:
    tenant, session, _ = _stream_with_checkpoints(
        make_manager, database, keep_checkpoints=2, wal_truncate_bytes=0
    )
    for path in _checkpoint_paths(database, data_dir, session):
        _flip_byte(path)
    manager = make_manager()
    with pytest.raises(SessionBusyError, match="quarantined"):
        manager.prefetch(tenant, session)
    with pytest.raises(SessionBusyError):
        manager.append(tenant, session, [1])
    assert manager.stats().quarantined == 1
    with database.unit_of_work() as db:
        assert metadata.get_session(db, tenant, session).status is SessionStatus.QUARANTINED
    events = _corruptions(database, tenant, session)
    assert [e.get("action") for e in events].count("quarantined") == 1
    assert len(events) == 3  # two files, then the quarantine
    with pytest.raises(SessionBusyError):
        make_manager().get(tenant, session)  # recorded: another manager refuses it too


def test_every_checkpoint_damaged_with_the_whole_log_replays_it(
    make_manager: MakeManager, engine: StreamingEngine, database: Database, data_dir: Path
) -> None:
    tenant, session, tokens = _stream_with_checkpoints(make_manager, database)
    for path in _checkpoint_paths(database, data_dir, session):
        _damage(path, "truncated")
    manager = make_manager()
    assert_matches_reference(manager, engine, tenant, session, tokens)
    assert len(_corruptions(database, tenant, session)) == 3


def _append_behind_the_manager(data_dir: Path, session: str, batches: list[list[int]]) -> None:
    """Records a crashed manager had acknowledged after its last checkpoint."""
    with WriteAheadLog.open(_wal_path(data_dir, session)) as wal:
        for batch in batches:
            wal.append(wal.next_position, batch)
        wal.flush_and_sync()


def test_a_torn_log_tail_is_cut_and_the_rest_replayed(
    make_manager: MakeManager, engine: StreamingEngine, database: Database, data_dir: Path
) -> None:
    tenant, session, tokens = _stream_with_checkpoints(make_manager, database)
    tail = random_batches(3, seed=6)
    _append_behind_the_manager(data_dir, session, tail)
    with open(_wal_path(data_dir, session), "ab") as file:
        file.write(b"MWRC\x40\x00")  # a record cut short by the crash: never acknowledged
    manager = make_manager()
    stream = tokens + flat(tail)
    assert manager.get(tenant, session).position == len(stream)
    assert_matches_reference(manager, engine, tenant, session, stream)
    assert _corruptions(database, tenant, session) == []  # a torn tail is not damage
    manager.append(tenant, session, [1, 2])
    manager.close()
    assert_matches_reference(make_manager(), engine, tenant, session, [*stream, 1, 2])


def test_a_corrupt_log_record_loses_it_and_what_follows(
    make_manager: MakeManager, engine: StreamingEngine, database: Database, data_dir: Path
) -> None:
    tenant, session, tokens = _stream_with_checkpoints(make_manager, database)
    tail = [[11, 12, 13], [14, 15, 16, 17], [18]]
    _append_behind_the_manager(data_dir, session, tail)
    _flip_byte(_wal_path(data_dir, session), offset_from_end=4 * 1 + 20 + 4 * 2)  # the 2nd
    manager = make_manager()
    with capture_logs() as logs:
        assert_matches_reference(manager, engine, tenant, session, tokens + tail[0])
    [event] = _corruptions(database, tenant, session)
    assert event["error"] == "WalDamage"
    assert any(e["event"] == "session_corruption" for e in logs)
    assert manager.append(tenant, session, [20]).position == len(tokens) + 4


def test_an_unreadable_log_restarts_at_the_checkpoint(
    make_manager: MakeManager, engine: StreamingEngine, database: Database, data_dir: Path
) -> None:
    tenant, session, tokens = _stream_with_checkpoints(make_manager, database)
    path = _wal_path(data_dir, session)
    with open(path, "r+b") as file:
        file.write(b"garbage!")
    manager = make_manager()
    assert_matches_reference(manager, engine, tenant, session, tokens)
    [event] = _corruptions(database, tenant, session)
    assert event["error"] == "CorruptWalHeaderError"
    assert Path(event["moved_to"]).is_file() and path.is_file()
    manager.append(tenant, session, [3, 4])
    manager.close()
    assert_matches_reference(make_manager(), engine, tenant, session, [*tokens, 3, 4])


def test_a_log_cut_before_the_checkpoint_restarts_there(
    make_manager: MakeManager, engine: StreamingEngine, database: Database, data_dir: Path
) -> None:
    tenant, session, tokens = _stream_with_checkpoints(make_manager, database)
    path = _wal_path(data_dir, session)
    os.truncate(path, HEADER_SIZE + 30)  # lost with the disk's cache, say
    manager = make_manager()
    assert_matches_reference(manager, engine, tenant, session, tokens)
    [event] = _corruptions(database, tenant, session)
    assert event["error"] == "WalBehindCheckpoint"
    manager.append(tenant, session, [9])
    manager.close()
    assert_matches_reference(make_manager(), engine, tenant, session, [*tokens, 9])


def test_kill_9_mid_stream_keeps_every_acknowledged_token(
    make_manager: MakeManager, engine: StreamingEngine, database: Database, data_dir: Path
) -> None:
    tenant = new_tenant(database)
    setup = make_manager()
    session = setup.create(tenant).session_id
    setup.close()
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.sessions.crash_driver", str(data_dir), tenant, session],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline() == "ready\n"
        sent: list[list[int]] = []
        acknowledged = 0
        for batch in random_batches(40, seed=8, high=16):
            child.stdin.write(" ".join(map(str, batch)) + "\n")
            child.stdin.flush()
            sent.append(batch)
            if len(sent) == 40:
                break  # in flight: the kill lands while it is being appended
            assert child.stdout.readline() == f"ack {len(flat(sent))}\n"
            acknowledged = len(flat(sent))
    finally:
        child.kill()  # SIGKILL
        child.wait()
    assert child.returncode == -9
    manager = make_manager()
    position = manager.get(tenant, session).position
    assert position in (acknowledged, len(flat(sent)))  # the last batch: all or nothing
    assert manager.get(tenant, session).durable_position > 0  # a checkpoint plus a log tail
    assert_matches_reference(manager, engine, tenant, session, flat(sent)[:position])
