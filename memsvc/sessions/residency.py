"""Residency bookkeeping: which sessions hold state in memory, in which tier, and who goes first.

Tiers, fastest first: DEVICE (where the engine computes), HOST (pinned CPU
memory, only beside a GPU), DISK (the data directory: checkpoint + log, no
bytes counted here). DEVICE and HOST have byte budgets. When a state must be
admitted to a full tier, the least recently used sessions of that tier that
are not pinned (a pin means a call is using or moving the session) are moved
one tier down, and so on. This module only keeps the books and answers "who
must go"; the manager moves the states. It is not thread-safe on its own: the
manager guards it with its lock.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from memsvc.sessions.api import QuotaExceededError, Tier

# The order states fall in when evicted.
TIERS_DOWN = (Tier.DEVICE, Tier.HOST, Tier.DISK)


@dataclass
class Resident:
    """A session whose state is held in a memory tier."""

    tier: Tier
    nbytes: int
    last_access: float  # time.time()


class ResidencyTable:
    """Sessions per memory tier with their bytes and recency, pins, and LRU victim choice."""

    def __init__(self, budgets: dict[Tier, int]) -> None:
        self.budgets = {tier: budgets.get(tier, 0) for tier in (Tier.DEVICE, Tier.HOST)}
        self._residents: dict[str, Resident] = {}
        self._pins: Counter[str] = Counter()

    def place(self, session_id: str, tier: Tier, nbytes: int, now: float) -> None:
        """Records the session's state in ``tier`` (moving its entry if it was elsewhere)."""
        if tier not in self.budgets:
            raise ValueError(f"{tier} is not a memory tier")
        self._residents[session_id] = Resident(tier, nbytes, now)

    def remove(self, session_id: str) -> None:
        """Forgets the session's state (it went to disk or was deleted)."""
        self._residents.pop(session_id, None)

    def resize(self, session_id: str, nbytes: int) -> None:
        """Updates the bytes of a resident state (its partial-chunk buffer grows and empties)."""
        self._residents[session_id].nbytes = nbytes

    def touch(self, session_id: str, now: float) -> None:
        """Marks the session used now."""
        resident = self._residents.get(session_id)
        if resident is not None:
            resident.last_access = now

    def get(self, session_id: str) -> Resident | None:
        return self._residents.get(session_id)

    def items(self) -> list[tuple[str, Resident]]:
        return list(self._residents.items())

    def pin(self, session_id: str) -> None:
        """Protects the session from eviction until the matching ``unpin``; pins nest."""
        self._pins[session_id] += 1

    def unpin(self, session_id: str) -> None:
        self._pins[session_id] -= 1
        if self._pins[session_id] <= 0:
            del self._pins[session_id]

    def pinned(self, session_id: str) -> bool:
        return self._pins[session_id] > 0

    def used(self, tier: Tier) -> int:
        """Bytes of the states in ``tier``."""
        return sum(r.nbytes for r in self._residents.values() if r.tier == tier)

    def count(self, tier: Tier) -> int:
        return sum(1 for r in self._residents.values() if r.tier == tier)

    def victims(self, tier: Tier, nbytes: int) -> list[str]:
        """The least recently used unpinned sessions of ``tier`` whose leaving makes ``nbytes`` fit.

        Empty when it fits already. QuotaExceededError when it cannot fit even
        with every unpinned session gone (too many pinned, or ``nbytes`` over
        the budget).
        """
        budget = self.budgets[tier]
        free_now = budget - self.used(tier)
        if nbytes <= free_now:
            return []
        candidates = sorted(
            (r.last_access, session_id, r.nbytes)
            for session_id, r in self._residents.items()
            if r.tier == tier and not self.pinned(session_id)
        )
        chosen, free = [], free_now
        for _, session_id, size in candidates:
            chosen.append(session_id)
            free += size
            if nbytes <= free:
                return chosen
        raise QuotaExceededError(
            f"a state of {nbytes} bytes does not fit the {tier} budget of {budget} bytes: "
            f"{free_now} free and {free - free_now} held by sessions not in use"
        )


def tier_below(tier: Tier) -> Tier:
    """The tier a state of ``tier`` is evicted to."""
    return TIERS_DOWN[TIERS_DOWN.index(tier) + 1]
