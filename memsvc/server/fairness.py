"""Fair share of the model thread between tenants: least-served tenant first.

Each step of the scheduler hands out a budget of work units. A tenant's
`served` count grows by what it was given (an appended token costs 1 unit, a
sampled token SAMPLED_TOKEN_COST, since one decode step costs about as much
as a small append of that many tokens); the next unit goes to the waiting
tenant served least. This is deficit round robin with unit quanta: over any
stretch where two tenants both wait, their units differ by at most one item.

A tenant that was idle does not bank credit: when it comes back its count is
raised to the least count among the tenants waiting now, so a tenant quiet
for an hour gets its fair share, not the whole server for a minute.
"""

from __future__ import annotations

from collections.abc import Iterable

SAMPLED_TOKEN_COST = 16  # units of one sampled token; an appended token is 1


class FairShare:
    """Units served per tenant, and who goes next. Used by the model thread only."""

    def __init__(self) -> None:
        self._served: dict[str, float] = {}

    def served(self, tenant_id: str) -> float:
        return self._served.get(tenant_id, 0.0)

    def wake(self, waiting: Iterable[str]) -> None:
        """Brings tenants that were idle up to the least count among those waiting
        (call once per step with every tenant that has work)."""
        waiting = set(waiting)
        for tenant_id in list(self._served):  # the idle are forgotten: they bank nothing
            if tenant_id not in waiting:
                del self._served[tenant_id]
        floor = min(self._served.values(), default=0.0)
        for tenant_id in waiting:
            self._served.setdefault(tenant_id, floor)

    def next(self, candidates: Iterable[str]) -> str | None:
        """The candidate served least (ties: the first given); None if there is none."""
        return min(candidates, key=self.served, default=None)

    def charge(self, tenant_id: str, units: float) -> None:
        self._served[tenant_id] = self.served(tenant_id) + units
