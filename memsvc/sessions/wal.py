"""A session's write-ahead log: every appended token batch, durable before it is acknowledged.

File layout (little-endian)::

    header   magic "MSVCWAL1" | base_offset u64 | base_position u64 | crc32 u32
    record   magic "MWRC" | length u32 | crc32 u32 | payload (length bytes)
    payload  position u64 | token ids int32 * n

The header's CRC covers its first 24 bytes. A record's CRC covers its length
field and its payload, so a damaged length is caught like damaged data.
``position`` is the stream position of the record's first token; records are
contiguous (each starts where the previous ended).

Offsets are logical: a record's offset counts bytes of records from the start
of the session's log, forever. ``truncate_before`` drops records below an
offset by writing the remaining tail to a new file whose header carries the new
``base_offset`` (and the position there), then renaming it over the log, so
offsets stored elsewhere (a checkpoint's ``wal_offset``) stay valid and the
rename is atomic. The copy is bounded by the records since the oldest
checkpoint kept. (Segment files would avoid the copy but add a directory of
files to keep consistent; at these tail sizes the copy is simpler to get right.)

Damage: reading stops at the first record that is incomplete (``TORN``: a
crash mid-append) or fails its checks (``CORRUPT``); nothing after it is
trusted. Opening a log for appending cuts it there, so new records follow the
last good one. Opening an undamaged log does not fsync it (on many disks an
fsync flushes the device cache even when nothing is dirty, milliseconds a
restore should not pay): records a crashed writer left unsynced were never
acknowledged, and the next ``flush_and_sync`` makes them durable with the
new ones, before anything is acknowledged.

Group commit: ``append`` only writes (the bytes reach the page cache, so they
survive ``kill -9``); ``flush_and_sync`` makes everything appended so far
durable with one fsync (the manager syncs many sessions' logs at once, so
their fsyncs share the disk's flushes). The server syncs on a thread of its
own while the next records are written (``sync_through``): one fsync covers
every record written before it began. After a failed fsync the log refuses all
further use, so a later fsync can never report a record durable that the
failed one lost.
"""

from __future__ import annotations

import enum
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import numpy.typing as npt
import structlog

from memsvc.store.durable_files import write_atomically

log = structlog.get_logger(__name__)

_HEADER = struct.Struct("<8sQQ")
_HEADER_CRC = struct.Struct("<I")
HEADER_SIZE = _HEADER.size + _HEADER_CRC.size
_HEADER_MAGIC = b"MSVCWAL1"

_RECORD = struct.Struct("<4sII")
_RECORD_MAGIC = b"MWRC"
_LENGTH = struct.Struct("<I")
_POSITION = struct.Struct("<Q")
_TOKEN = np.dtype("<i4")
MAX_RECORD_TOKENS = 1 << 24
_MAX_PAYLOAD = _POSITION.size + MAX_RECORD_TOKENS * _TOKEN.itemsize
_INT32 = np.iinfo(np.int32)
# fdatasync flushes the data and the size, which is all a reader needs.
_datasync = getattr(os, "fdatasync", os.fsync)


class WalError(Exception):
    """Base class of the log's errors."""


class CorruptWalHeaderError(WalError):
    """The file header is unreadable: the file is not a log, or it is damaged beyond recovery."""


class WalSequenceError(WalError):
    """An append does not start where the log ends."""


class WalTruncatedError(WalError):
    """Records below the requested offset were dropped by ``truncate_before``."""


class WalFailedError(WalError):
    """An earlier write or fsync failed; the log refuses work until it is reopened.

    After a failed fsync the kernel may have dropped the dirty pages, and a
    later fsync can succeed without them, so retrying would acknowledge lost data.
    """


class DamageKind(enum.StrEnum):
    TORN = "torn"  # the record runs past the end of the file
    CORRUPT = "corrupt"  # bad magic, length, checksum or position


@dataclass(frozen=True)
class WalDamage:
    """Where reading stopped and why."""

    offset: int
    kind: DamageKind
    detail: str


class WalRecord(NamedTuple):
    """One appended batch: its first token's position, the tokens, and the offset just past it."""

    position: int
    tokens: npt.NDArray[np.int32]
    end_offset: int


@dataclass(frozen=True)
class _Header:
    base_offset: int
    base_position: int


def _encode_header(header: _Header) -> bytes:
    body = _HEADER.pack(_HEADER_MAGIC, header.base_offset, header.base_position)
    return body + _HEADER_CRC.pack(zlib.crc32(body))


def _read_header(file: BinaryIO, path: Path) -> _Header:
    raw = file.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE:
        raise CorruptWalHeaderError(f"{path}: {len(raw)} bytes, shorter than a log header")
    body, (crc,) = raw[: _HEADER.size], _HEADER_CRC.unpack(raw[_HEADER.size :])
    magic, base_offset, base_position = _HEADER.unpack(body)
    if magic != _HEADER_MAGIC:
        raise CorruptWalHeaderError(f"{path}: not a write-ahead log (magic {magic!r})")
    if zlib.crc32(body) != crc:
        raise CorruptWalHeaderError(f"{path}: header checksum mismatch")
    return _Header(base_offset, base_position)


def _encode_record(position: int, tokens: npt.ArrayLike) -> tuple[bytes, int]:
    """The framed record and its token count."""
    array = np.asarray(tokens)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"tokens must be a non-empty 1-d sequence, got shape {array.shape}")
    if array.size > MAX_RECORD_TOKENS:
        raise ValueError(f"{array.size} tokens in one record; the most is {MAX_RECORD_TOKENS}")
    if array.dtype.kind not in "iu":
        raise ValueError(f"token ids must be integers, got {array.dtype}")
    if array.min() < _INT32.min or array.max() > _INT32.max:
        raise ValueError("token ids must fit in int32")
    if position < 0:
        raise ValueError(f"position must be non-negative, got {position}")
    payload = _POSITION.pack(position) + array.astype(_TOKEN).tobytes()
    crc = zlib.crc32(payload, zlib.crc32(_LENGTH.pack(len(payload))))
    return _RECORD.pack(_RECORD_MAGIC, len(payload), crc) + payload, array.size


class WalReader:
    """The records of a log file from ``from_offset`` (default: its first), read once by iterating.

    Iteration stops at the end of the file or at the first damaged record; then
    ``damage`` says which (None at a clean end), ``end_offset`` is the offset
    just past the last good record and ``next_position`` the position the next
    record must start at. Raises WalTruncatedError if ``from_offset`` was
    dropped, ValueError if it is not a record boundary of the log.
    """

    def __init__(self, path: Path, from_offset: int | None = None) -> None:
        self.path = Path(path)
        self.from_offset = from_offset
        self.damage: WalDamage | None = None
        self.end_offset = 0
        self.next_position = 0

    def __iter__(self) -> Iterator[WalRecord]:
        with open(self.path, "rb") as file:
            header = _read_header(file, self.path)
            self.end_offset = header.base_offset
            self.next_position = header.base_position
            start = header.base_offset if self.from_offset is None else self.from_offset
            if start < header.base_offset:
                raise WalTruncatedError(
                    f"{self.path}: offset {start} was truncated; the log starts at "
                    f"{header.base_offset}"
                )
            for record in self._records(file):
                if record.end_offset > start:
                    if record.end_offset - self._size(record) < start:
                        raise ValueError(f"{self.path}: offset {start} is inside a record")
                    yield record
        if self.damage is None and start > self.end_offset:
            raise ValueError(f"{self.path}: offset {start} is past the end {self.end_offset}")
        if self.damage is not None:
            log.warning(
                "wal_damage",
                path=str(self.path),
                offset=self.damage.offset,
                kind=self.damage.kind.value,
                detail=self.damage.detail,
            )

    @staticmethod
    def _size(record: WalRecord) -> int:
        return _RECORD.size + _POSITION.size + record.tokens.size * _TOKEN.itemsize

    def _records(self, file: BinaryIO) -> Iterator[WalRecord]:
        while True:
            offset = self.end_offset
            raw = file.read(_RECORD.size)
            if not raw:
                return
            if len(raw) < _RECORD.size:
                self._stop(offset, DamageKind.TORN, "record header cut short")
                return
            magic, length, crc = _RECORD.unpack(raw)
            if magic != _RECORD_MAGIC:
                self._stop(offset, DamageKind.CORRUPT, f"bad record magic {magic!r}")
                return
            if length > _MAX_PAYLOAD or length < _POSITION.size + _TOKEN.itemsize or length % 4:
                self._stop(offset, DamageKind.CORRUPT, f"impossible record length {length}")
                return
            payload = bytearray(length)
            if file.readinto(payload) < length:
                self._stop(offset, DamageKind.TORN, "record payload cut short")
                return
            if zlib.crc32(payload, zlib.crc32(_LENGTH.pack(length))) != crc:
                self._stop(offset, DamageKind.CORRUPT, "record checksum mismatch")
                return
            (position,) = _POSITION.unpack_from(payload)
            if position != self.next_position:
                detail = f"record starts at position {position}, expected {self.next_position}"
                self._stop(offset, DamageKind.CORRUPT, detail)
                return
            tokens = np.frombuffer(payload, dtype=_TOKEN, offset=_POSITION.size)
            self.end_offset = offset + _RECORD.size + length
            self.next_position = position + tokens.size
            yield WalRecord(position, tokens, self.end_offset)

    def _stop(self, offset: int, kind: DamageKind, detail: str) -> None:
        self.damage = WalDamage(offset, kind, detail)


def read_wal(path: Path, from_offset: int | None = None) -> WalReader:
    """The records of the log at ``path`` from ``from_offset``; see WalReader."""
    return WalReader(path, from_offset)


class WriteAheadLog:
    """A session's log, open for appending. Thread-safe; one process at a time opens it.

    Open with ``WriteAheadLog.open``. ``recovered_damage`` reports what opening
    cut off the end of the file, if anything.
    """

    def __init__(self, path: Path, header: _Header, reader: WalReader, durable: int) -> None:
        self.path = path
        self.recovered_damage = reader.damage
        self._base_offset = header.base_offset
        self._base_position = header.base_position
        self._end_offset = reader.end_offset
        self._durable_offset = durable
        self._next_position = reader.next_position
        self._sync_count = 0
        self._failure: BaseException | None = None
        self._lock = threading.Lock()  # the file's end and the descriptor
        self._sync_lock = threading.Lock()  # one fsync (or file swap) at a time
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)

    @classmethod
    def open(cls, path: Path, *, start_position: int = 0, start_offset: int = 0) -> WriteAheadLog:
        """Opens the log at ``path``, creating it (first record at ``start_position``) if missing.

        A created log's offsets start at ``start_offset``: a log restarted at a
        checkpoint keeps the offsets that checkpoint and older ones refer to.
        A damaged tail is cut off (and logged) and the rest fsynced; an
        undamaged log is not fsynced (module docstring), so ``durable_offset``
        starts at ``base_offset`` and the first ``flush_and_sync`` fsyncs.
        """
        path = Path(path)
        if not path.exists():
            header = _Header(base_offset=start_offset, base_position=start_position)
            write_atomically(path, lambda file: file.write(_encode_header(header)))
        reader = WalReader(path)
        for _ in reader:
            pass
        with open(path, "rb" if reader.damage is None else "r+b") as file:
            header = _read_header(file, path)
            if reader.damage is not None:
                keep = HEADER_SIZE + reader.end_offset - header.base_offset
                dropped = file.seek(0, os.SEEK_END) - keep
                file.truncate(keep)
                log.warning(
                    "wal_tail_cut",
                    path=str(path),
                    offset=reader.end_offset,
                    dropped_bytes=dropped,
                    kind=reader.damage.kind.value,
                )
                file.flush()
                os.fsync(file.fileno())
        durable = reader.end_offset if reader.damage is not None else header.base_offset
        return cls(path, header, reader, durable)

    @property
    def base_offset(self) -> int:
        """The offset of the oldest record kept."""
        return self._base_offset

    @property
    def end_offset(self) -> int:
        """The offset just past the newest record appended."""
        return self._end_offset

    @property
    def durable_offset(self) -> int:
        """Everything below this offset has been fsynced."""
        return self._durable_offset

    @property
    def next_position(self) -> int:
        """The position the next append must start at."""
        return self._next_position

    @property
    def sync_count(self) -> int:
        """How many fsyncs ``flush_and_sync`` has issued."""
        return self._sync_count

    def append(self, position: int, tokens: npt.ArrayLike) -> int:
        """Writes one record (not yet durable: see flush_and_sync); returns its end offset.

        ``position`` must equal ``next_position`` (WalSequenceError otherwise).
        """
        record, count = _encode_record(position, tokens)
        with self._lock:
            self._check_usable()
            if position != self._next_position:
                raise WalSequenceError(
                    f"{self.path}: append at position {position}, the log ends at "
                    f"{self._next_position}"
                )
            self._write_all(record)
            self._end_offset += len(record)
            self._next_position = position + count
            return self._end_offset

    def _write_all(self, record: bytes) -> None:
        view = memoryview(record)
        written = 0
        try:
            while written < len(view):
                written += os.write(self._fd, view[written:])
        except BaseException as error:
            # Cut the partial record, or the next append would follow garbage.
            try:
                os.ftruncate(self._fd, HEADER_SIZE + self._end_offset - self._base_offset)
            except OSError:
                self._failure = error
            raise

    def flush_and_sync(self) -> int:
        """Makes every record appended so far durable (one fsync); returns the durable offset."""
        with self._sync_lock:
            with self._lock:
                self._check_usable()
                end = self._end_offset
                fd = self._fd
            if end > self._durable_offset:
                try:
                    _datasync(fd)
                except BaseException as error:
                    self._failure = error
                    raise
                self._sync_count += 1
                self._durable_offset = end
            return self._durable_offset

    def sync_through(self, offset: int) -> int:
        """Makes the log durable at least up to ``offset`` and returns the durable offset.

        Returns at once when an earlier fsync covered it, even if the log was
        closed since (``close`` after a ``flush_and_sync``, as ``LiveSession.unload``
        does): an acknowledgement that waited for this record may still be
        sent. Otherwise as ``flush_and_sync``: a log that failed or closed first
        raises, and the record is not durable.
        """
        with self._sync_lock:
            if self._durable_offset >= offset:
                return self._durable_offset
        return self.flush_and_sync()

    def replay(self, from_offset: int | None = None) -> WalReader:
        """The records from ``from_offset`` (default: the oldest kept); see WalReader."""
        return WalReader(self.path, from_offset)

    def truncate_before(self, offset: int) -> None:
        """Drops the records below ``offset`` (a record boundary), keeping offsets of the rest.

        Pass the ``wal_offset`` of the oldest checkpoint that restore may fall
        back to, not the newest: if the newest proves corrupt, restore replays
        from the previous one's offset.
        """
        with self._sync_lock, self._lock:
            self._check_usable()
            if offset <= self._base_offset:
                return
            if offset > self._end_offset:
                raise ValueError(f"{self.path}: offset {offset} is past the end {self._end_offset}")
            reader = WalReader(self.path, offset)
            first_position = None
            for record in reader:  # reads the whole tail: the copy must be sound
                if first_position is None:
                    first_position = record.position
            if reader.damage is not None:
                raise WalError(f"{self.path}: damaged at offset {reader.damage.offset}")
            position = reader.next_position if first_position is None else first_position
            self._rewrite(offset, position)

    def rotate(self) -> None:
        """Copies the log into a new file renamed over its path (offsets unchanged).

        Another process that still has the old file open (a writer fenced out:
        ``memsvc.sessions.fencing``) then writes only to the orphaned old file.
        The copy ends at ``end_offset``: bytes someone appended past what this
        log read are not carried over.
        """
        with self._sync_lock, self._lock:
            self._check_usable()
            self._rewrite(self._base_offset, self._base_position)

    def _rewrite(self, offset: int, position: int) -> None:
        """The records from ``offset`` (at ``position``) to ``end_offset`` in a new file
        renamed over the log (both locks held)."""
        header = _Header(base_offset=offset, base_position=position)
        keep_from = HEADER_SIZE + offset - self._base_offset
        remaining = self._end_offset - offset

        def write(file: BinaryIO) -> None:
            file.write(_encode_header(header))
            with open(self.path, "rb") as old:
                old.seek(keep_from)
                left = remaining
                while left > 0 and (chunk := old.read(min(left, 1 << 20))):
                    file.write(chunk)
                    left -= len(chunk)
                if left:
                    raise WalError(f"{self.path}: {left} bytes short while copying the log")

        write_atomically(self.path, write)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        os.close(self._fd)
        self._fd = fd
        self._base_offset, self._base_position = offset, position
        self._durable_offset = self._end_offset  # the new file was fsynced whole

    def _check_usable(self) -> None:
        if self._fd < 0:
            raise WalError(f"{self.path}: the log is closed")
        if self._failure is not None:
            raise WalFailedError(f"{self.path}: an earlier write failed") from self._failure

    def close(self) -> None:
        """Closes without fsyncing (call flush_and_sync first to keep the unsynced tail)."""
        with self._sync_lock, self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> WriteAheadLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
