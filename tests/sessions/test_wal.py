"""The write-ahead log on disk: round trip, damage, truncation, group commit, kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from structlog.testing import capture_logs

from memsvc.sessions.wal import (
    HEADER_SIZE,
    CorruptWalHeaderError,
    DamageKind,
    WalError,
    WalSequenceError,
    WalTruncatedError,
    WriteAheadLog,
    read_wal,
)

RECORD_OVERHEAD = 12 + 8  # record header + position


def _batches(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.integers(-(2**31), 2**31, size=int(rng.integers(1, 40)), dtype=np.int64)
        for _ in range(count)
    ]


def _fill(wal: WriteAheadLog, batches: list[np.ndarray]) -> list[int]:
    ends = []
    for batch in batches:
        ends.append(wal.append(wal.next_position, batch))
    wal.flush_and_sync()
    return ends


def _flat(records) -> list[int]:
    return [int(t) for record in records for t in record.tokens]


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "s.wal"
    batches = _batches(20)
    with WriteAheadLog.open(path, start_position=1000) as wal:
        assert (wal.base_offset, wal.end_offset, wal.next_position) == (0, 0, 1000)
        ends = _fill(wal, batches)
        assert wal.durable_offset == wal.end_offset == ends[-1]
        assert ends[0] == RECORD_OVERHEAD + 4 * batches[0].size
        assert os.path.getsize(path) == HEADER_SIZE + ends[-1]
    with WriteAheadLog.open(path, start_position=0) as wal:  # start_position only when creating
        assert wal.recovered_damage is None
        assert wal.end_offset == ends[-1]
        assert wal.next_position == 1000 + sum(b.size for b in batches)
        records = list(wal.replay())
    position = 1000
    for record, batch, end in zip(records, batches, ends, strict=True):
        assert record.position == position
        assert record.tokens.dtype == np.int32
        np.testing.assert_array_equal(record.tokens, batch)
        assert record.end_offset == end
        position += batch.size


def test_replay_from_an_offset(tmp_path: Path) -> None:
    path = tmp_path / "s.wal"
    batches = _batches(10)
    with WriteAheadLog.open(path) as wal:
        ends = _fill(wal, batches)
    reader = read_wal(path, from_offset=ends[3])
    records = list(reader)
    assert [r.end_offset for r in records] == ends[4:]
    assert records[0].position == sum(b.size for b in batches[:4])
    assert reader.damage is None and reader.end_offset == ends[-1]
    assert list(read_wal(path, from_offset=ends[-1])) == []
    with pytest.raises(ValueError, match="inside a record"):
        list(read_wal(path, from_offset=ends[3] + 1))
    with pytest.raises(ValueError, match="past the end"):
        list(read_wal(path, from_offset=ends[-1] + 4))


def test_appends_are_checked(tmp_path: Path) -> None:
    with WriteAheadLog.open(tmp_path / "s.wal") as wal:
        wal.append(0, [1, 2, 3])
        with pytest.raises(WalSequenceError):
            wal.append(2, [4])
        with pytest.raises(WalSequenceError):
            wal.append(5, [4])
        for bad in ([], [[1, 2]], [1.5], [2**31], [-(2**31) - 1]):
            with pytest.raises(ValueError):
                wal.append(3, bad)
        wal.append(3, torch.tensor([7, 8], dtype=torch.int64))
        wal.append(5, np.array([9], dtype=np.uint16))
        end = wal.append(6, [2**31 - 1, -(2**31)])
        assert wal.next_position == 8 and wal.end_offset == end
        wal.flush_and_sync()
        assert _flat(wal.replay()) == [1, 2, 3, 7, 8, 9, 2**31 - 1, -(2**31)]


@pytest.mark.parametrize(
    "cut",
    [1, RECORD_OVERHEAD - 9, RECORD_OVERHEAD - 1, RECORD_OVERHEAD + 3, -1],
    ids=["in-magic", "in-header", "in-position", "in-tokens", "last-byte"],
)
def test_torn_tail_is_detected_and_cut_on_open(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "s.wal"
    batches = _batches(6)
    with WriteAheadLog.open(path) as wal:
        ends = _fill(wal, batches)
    last_start = ends[-2]
    keep = HEADER_SIZE + (ends[-1] + cut if cut < 0 else last_start + cut)
    os.truncate(path, keep)

    with capture_logs() as logs:
        reader = read_wal(path)
        records = list(reader)
    assert [r.end_offset for r in records] == ends[:-1]
    assert reader.damage is not None
    assert (reader.damage.offset, reader.damage.kind) == (last_start, DamageKind.TORN)
    assert reader.end_offset == last_start
    assert any(e["event"] == "wal_damage" and e["kind"] == "torn" for e in logs)

    with WriteAheadLog.open(path) as wal:
        assert wal.recovered_damage == reader.damage
        assert os.path.getsize(path) == HEADER_SIZE + last_start
        position = wal.next_position
        assert position == sum(b.size for b in batches[:-1])
        end = wal.append(position, [42, 43])
        wal.flush_and_sync()
    records = list(read_wal(path))
    assert records[-1].position == position and list(records[-1].tokens) == [42, 43]
    assert records[-1].end_offset == end


@pytest.mark.parametrize(
    ("where", "detail"),
    [
        (0, "magic"),
        (4, "checksum"),  # a plausible length: the CRC covers it
        (7, "impossible record length"),
        (8, "checksum"),
        (12, "checksum"),
        (RECORD_OVERHEAD, "checksum"),
    ],
    ids=["magic", "length", "length-high-byte", "crc", "position", "tokens"],
)
def test_flipped_byte_stops_replay_at_the_damaged_record(
    tmp_path: Path, where: int, detail: str
) -> None:
    path = tmp_path / "s.wal"
    batches = _batches(8)
    with WriteAheadLog.open(path) as wal:
        ends = _fill(wal, batches)
    damaged = ends[3]  # the fifth record starts here; three more follow it
    with open(path, "r+b") as file:
        file.seek(HEADER_SIZE + damaged + where)
        byte = file.read(1)
        file.seek(-1, os.SEEK_CUR)
        file.write(bytes([byte[0] ^ 0x40]))

    reader = read_wal(path)
    assert [r.end_offset for r in reader] == ends[:4]
    assert reader.damage is not None
    assert (reader.damage.offset, reader.damage.kind) == (damaged, DamageKind.CORRUPT)
    assert detail in reader.damage.detail
    with WriteAheadLog.open(path) as wal:
        assert wal.recovered_damage == reader.damage
        assert wal.end_offset == damaged
        assert os.path.getsize(path) == HEADER_SIZE + damaged


def test_damaged_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.wal"
    with WriteAheadLog.open(path) as wal:
        _fill(wal, _batches(2))
    with open(path, "r+b") as file:
        file.seek(10)
        file.write(b"\xff")
    with pytest.raises(CorruptWalHeaderError, match="checksum"):
        WriteAheadLog.open(path)
    (tmp_path / "other").write_bytes(b"not a log at all, but long enough")
    with pytest.raises(CorruptWalHeaderError, match="not a write-ahead log"):
        list(read_wal(tmp_path / "other"))


def test_truncate_before_keeps_offsets(tmp_path: Path) -> None:
    path = tmp_path / "s.wal"
    batches = _batches(10)
    with WriteAheadLog.open(path, start_position=5) as wal:
        ends = _fill(wal, batches)
        expected_tail = list(wal.replay(ends[5]))
        wal.truncate_before(ends[5])
        assert wal.base_offset == ends[5]
        assert os.path.getsize(path) == HEADER_SIZE + ends[-1] - ends[5]
        wal.truncate_before(ends[2])  # already gone: nothing to do
        with pytest.raises(WalTruncatedError):
            list(wal.replay(ends[4]))
        with pytest.raises(ValueError, match="inside a record"):
            wal.truncate_before(ends[7] + 2)
        with pytest.raises(ValueError, match="past the end"):
            wal.truncate_before(ends[-1] + 1)
        tail = list(wal.replay())
        assert [(r.position, r.end_offset) for r in tail] == [
            (r.position, r.end_offset) for r in expected_tail
        ]
        end = wal.append(wal.next_position, [1, 2, 3])  # appends go to the new file
        wal.flush_and_sync()
    assert not list(tmp_path.glob(".*.tmp"))
    with WriteAheadLog.open(path) as wal:
        assert (wal.base_offset, wal.end_offset) == (ends[5], end)
        assert _flat(wal.replay()) == [*_flat(expected_tail), 1, 2, 3]


def test_truncate_everything_keeps_the_position(tmp_path: Path) -> None:
    path = tmp_path / "s.wal"
    with WriteAheadLog.open(path) as wal:
        ends = _fill(wal, _batches(3))
        position = wal.next_position
        wal.truncate_before(ends[-1])
    with WriteAheadLog.open(path) as wal:
        assert (wal.base_offset, wal.end_offset, wal.next_position) == (
            ends[-1],
            ends[-1],
            position,
        )
        assert list(wal.replay()) == []
        wal.append(position, [7])
        wal.flush_and_sync()
        assert [(r.position, list(r.tokens)) for r in wal.replay()] == [(position, [7])]


def test_flush_and_sync_only_syncs_new_records(tmp_path: Path) -> None:
    with WriteAheadLog.open(tmp_path / "s.wal") as wal:
        assert wal.flush_and_sync() == 0 and wal.sync_count == 0
        end = wal.append(0, [1])
        assert wal.durable_offset == 0
        assert wal.flush_and_sync() == end and wal.sync_count == 1
        assert wal.flush_and_sync() == end and wal.sync_count == 1


def test_sync_through_answers_for_records_synced_before_the_log_closed(tmp_path: Path) -> None:
    wal = WriteAheadLog.open(tmp_path / "s.wal")
    first = wal.append(0, [1, 2])
    assert wal.sync_through(first) == first and wal.sync_count == 1
    second = wal.append(2, [3])
    assert wal.sync_through(first) == first and wal.sync_count == 1  # covered already
    wal.flush_and_sync()
    third = wal.append(3, [4])
    wal.close()  # without syncing the third
    assert wal.sync_through(second) == second  # synced before the close: durable
    with pytest.raises(WalError, match="closed"):
        wal.sync_through(third)  # never synced: not durable, and the log cannot sync it


_CHILD = """
import sys
from memsvc.sessions.wal import WriteAheadLog
wal = WriteAheadLog.open(sys.argv[1])
step = 0
while True:
    end = wal.append(wal.next_position, [step] * 50)
    wal.flush_and_sync()
    print(end, flush=True)  # acknowledged
    step += 1
"""


def test_acknowledged_records_survive_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "s.wal"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    acknowledged = [int(child.stdout.readline()) for _ in range(200)]
    child.send_signal(signal.SIGKILL)
    child.wait()
    with WriteAheadLog.open(path) as wal:
        ends = [record.end_offset for record in wal.replay()]
        assert ends[: len(acknowledged)] == acknowledged
        assert wal.next_position == 50 * len(ends)


def test_opening_an_undamaged_log_does_not_fsync(tmp_path: Path) -> None:
    path = tmp_path / "s.wal"
    with WriteAheadLog.open(path) as wal:
        end = wal.append(0, [1, 2])
        wal.flush_and_sync()
    with WriteAheadLog.open(path) as wal:
        # Nothing proven durable by this opening: the first flush fsyncs, later ones do not.
        assert (wal.durable_offset, wal.sync_count) == (0, 0)
        assert wal.flush_and_sync() == end and wal.sync_count == 1
        assert wal.flush_and_sync() == end and wal.sync_count == 1
    with open(path, "ab") as file:
        file.write(b"MWRC")  # a torn record: cut, and the rest fsynced, by the opening
    with WriteAheadLog.open(path) as wal:
        assert wal.recovered_damage is not None
        assert wal.durable_offset == wal.end_offset == end
        assert wal.flush_and_sync() == end and wal.sync_count == 0
