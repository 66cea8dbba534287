"""Who is calling: `authorization: Bearer <key>` metadata to a tenant, or to the operator.

Tenant keys are checked by the metadata store (`memsvc.store.metadata.authenticate`:
stored hashed, compared in constant time). A key that checked out is remembered
by its digest for `cache_ttl_s`, so a client making many unary calls costs one
SQL round trip per TTL; a revoked key keeps working at most that long.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from memsvc.server.status import PermissionDeniedError, UnauthenticatedError
from memsvc.store import metadata
from memsvc.store.database import Database

AUTHORIZATION = "authorization"
_SCHEME = "bearer "


@dataclass(frozen=True)
class Tenant:
    """The caller of a tenant-facing RPC, with the quotas the server enforces."""

    tenant_id: str
    name: str
    max_sessions: int
    tokens_per_minute: int


class Authenticator:
    """Resolves the caller of each RPC; admin_key None means admin calls are refused."""

    def __init__(
        self,
        database: Database,
        admin_key: str | None = None,
        cache_ttl_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._database = database
        self._admin_digest = metadata.hash_api_key(admin_key) if admin_key else None
        self._ttl = cache_ttl_s
        self._clock = clock
        self._cache: dict[str, tuple[Tenant, float]] = {}

    async def tenant(self, context: grpc.aio.ServicerContext) -> Tenant:
        """The tenant whose key the call carries; UnauthenticatedError otherwise."""
        key = _bearer_key(context)
        digest = metadata.hash_api_key(key)
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > self._clock():
            return cached[0]
        tenant = await asyncio.to_thread(self._lookup, key)
        if tenant is None:
            raise UnauthenticatedError("the API key names no tenant")
        self._cache[digest] = (tenant, self._clock() + self._ttl)
        return tenant

    def require_admin(self, context: grpc.aio.ServicerContext) -> None:
        """Returns if the call carries the admin key; PermissionDeniedError otherwise."""
        if self._admin_digest is None:
            raise PermissionDeniedError("admin calls are disabled: the server has no admin key")
        given = metadata.hash_api_key(_bearer_key(context))
        if not hmac.compare_digest(given, self._admin_digest):
            raise PermissionDeniedError("admin calls need the admin key")

    def _lookup(self, key: str) -> Tenant | None:
        with self._database.unit_of_work() as db:
            row = metadata.authenticate(db, key)
            if row is None:
                return None
            return Tenant(row.id, row.name, row.max_sessions, row.tokens_per_minute)


def _bearer_key(context: grpc.aio.ServicerContext) -> str:
    values = [v for k, v in context.invocation_metadata() or () if k == AUTHORIZATION]
    if not values:
        raise UnauthenticatedError("missing metadata 'authorization: Bearer <api key>'")
    if len(values) > 1:  # which one would win is the proxy's choice, not ours: refuse both
        raise UnauthenticatedError(
            f"{len(values)} authorization metadata entries; send exactly one"
        )
    value = values[0]
    if not isinstance(value, str) or not value.lower().startswith(_SCHEME):
        raise UnauthenticatedError("the authorization metadata must be 'Bearer <api key>'")
    key = value[len(_SCHEME) :].strip()
    if not key:
        raise UnauthenticatedError("the authorization metadata carries an empty key")
    return key
