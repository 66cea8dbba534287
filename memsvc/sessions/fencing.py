"""Fencing on the shared volume: which lease holder's writes to a session's files count.

The Redis lease decides who serves a session, but a replica that lost its
lease without knowing it (paused, partitioned, its renewal overdue) still has
the session's log open. Its fence must stop it from getting a write
acknowledged, and from replacing the new owner's files, without a Redis call
per append. The session directory's ``owner`` file does that:

- Taking a session (a restore, or creating it) *seizes* it: under the
  directory's lock (``owner.lock``, flock), the claim ``{fence, node,
  incarnation}`` of the new lease replaces the old one, then the log is opened
  and, unless this process wrote the previous claim, copied to a new file
  renamed over ``wal.log``. A stale writer's open descriptor then points at the
  orphaned old file: whatever it writes from there on is invisible.
- Before an append is acknowledged (after its fsync) the owner reads the
  claim back: a different claim means it was fenced out, and nothing is
  acknowledged. Ordering makes this exact: a record fsynced before the
  stale writer's check read the old claim was written before the seize
  replaced the claim, so before the new owner opened (and copied) the log.
- Replacing files (a checkpoint's log truncation) happens under the lock
  after the same check, so it cannot land after a seize.

A claim older than the one on disk is refused (``FenceBehindError``): either
its lease is stale, or the lease store lost its counters (a Redis restart)
and the holder must have its fence raised above ``floor`` and try again.

The shared volume must give close-to-open consistency and working flock
(local disks; NFSv4 and most CSI file volumes do).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from memsvc.sessions.api import SessionBusyError
from memsvc.store.durable_files import write_atomically

OWNER_FILE = "owner"
LOCK_FILE = "owner.lock"


class FencedOutError(SessionBusyError):
    """Another lease holder claimed the session's files: this node must not write them."""


class FenceBehindError(SessionBusyError):
    """The claim is not newer than one already on disk (``floor``)."""

    def __init__(self, message: str, floor: int) -> None:
        super().__init__(message)
        self.floor = floor


@dataclass(frozen=True)
class Claim:
    """A lease holder's right to write a session's files."""

    fence: int
    node: str
    incarnation: str  # one per SessionManager: tells this process's own earlier claims apart

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> Claim | None:
        try:
            fields = json.loads(data)
            return cls(int(fields["fence"]), str(fields["node"]), str(fields["incarnation"]))
        except (ValueError, KeyError, TypeError):
            return None  # torn or foreign: any claim may replace it


class OwnerFile:
    """A session directory's claim and lock."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / OWNER_FILE

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Holds the directory's lock (between processes: flock)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def read(self) -> Claim | None:
        """The claim on disk (None: none yet)."""
        try:
            return Claim.decode(self.path.read_bytes())
        except FileNotFoundError:
            return None

    def seize(self, claim: Claim, floor: int = 0) -> Claim | None:
        """Makes ``claim`` the session's (hold ``locked``); returns the one it replaced.

        FenceBehindError if a claim on disk, or ``floor`` (fences recorded
        elsewhere, e.g. checkpoint rows), is newer; nothing changes then.
        """
        previous = self.read()
        newest = max(floor, previous.fence if previous is not None else 0)
        same = previous == claim
        if newest > claim.fence or (previous is not None and not same and newest >= claim.fence):
            raise FenceBehindError(
                f"session files in {self.directory.name} are claimed with fence {newest}, "
                f"this lease has {claim.fence}",
                newest,
            )
        if not same:
            write_atomically(self.path, lambda file: file.write(claim.encode()))
        return previous

    def check(self, claim: Claim) -> None:
        """FencedOutError unless ``claim`` is still the session's."""
        current = self.read()
        if current != claim:
            holder = "no one" if current is None else f"{current.node} (fence {current.fence})"
            raise FencedOutError(
                f"session {self.directory.name} was taken over by {holder}; "
                f"this node's fence {claim.fence} is stale"
            )
