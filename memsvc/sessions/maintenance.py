"""The maintenance thread: renews the leases of sessions in memory and writes the
time-based checkpoints (``checkpoint_every_seconds`` after the last one, if tokens came since).

A session in use is skipped: the call holding it renews its lease and
checkpoints it. A session whose lease was lost to another node is unloaded;
its next use restores it from disk (or is sent to its new owner).
"""

from __future__ import annotations

import threading

import structlog

from memsvc.sessions.live import LiveSession, SessionEnv
from memsvc.sessions.ownership import LeaseLostError, LeaseTakenError

log = structlog.get_logger(__name__)


class Maintenance:
    """A daemon thread over one manager's live sessions; ``stop`` ends it and waits."""

    def __init__(self, env: SessionEnv) -> None:
        self._env = env
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="memsvc-session-maintenance", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        config = self._env.config
        interval = min(config.lease_ttl_ms / 6000, config.checkpoint_every_seconds / 2)
        books = self._env.books
        while not self._stop.wait(max(interval, 0.01)):
            self._announce()
            for session in books.resident():
                if not books.acquire(session, timeout=0):
                    continue  # in use: the call that holds it renews and checkpoints
                try:
                    if session.state is not None and session.gone is None:
                        self._maintain(session)
                except Exception as error:
                    log.warning("maintenance_failed", session=session.id, error=repr(error))
                finally:
                    books.release(session)

    def _announce(self) -> None:
        address = self._env.config.advertise_address
        if address is not None:
            self._env.ownership.announce(address)

    def _maintain(self, session: LiveSession) -> None:
        try:
            self._env.ownership.keep(session.id)
        except (LeaseLostError, LeaseTakenError):
            session.unload()  # someone else owns it now; the next touch restores
            return
        session.maybe_checkpoint()
