"""Errors raised by the metadata repository (``memsvc.store.metadata``)."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of the repository's errors."""


class NotFoundError(StoreError):
    """A row does not exist, or belongs to another tenant (the two are indistinguishable)."""


class AlreadyExistsError(StoreError):
    """A row with the same unique name exists."""


class QuotaExceededError(StoreError):
    """A tenant's quota would be exceeded by the request."""


class StaleFenceError(StoreError):
    """A write carries a fencing token older than one already recorded: its writer lost the lease.

    Attributes:
        session_id: the session written to.
        fence: the refused token.
        newest_fence: the newest token already recorded for the session.
    """

    def __init__(self, session_id: str, fence: int, newest_fence: int) -> None:
        super().__init__(
            f"session {session_id}: fence {fence} is older than the recorded fence "
            f"{newest_fence}; the writer no longer owns the session"
        )
        self.session_id = session_id
        self.fence = fence
        self.newest_fence = newest_fence


class GenerationConflictError(StoreError):
    """A checkpoint's generation is not newer than the newest one recorded for its session."""
