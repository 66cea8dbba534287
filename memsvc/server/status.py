"""How failures become gRPC status codes: one table, one decorator for every RPC.

Servicers raise the session layer's errors (`memsvc.sessions.api`) or the ones
below; `rpc` turns them into a status with the error's message, so no servicer
builds a status by hand. Anything else is a bug: INTERNAL, logged with its traceback.
"""

from __future__ import annotations

import errno
import functools
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
import structlog
from sqlalchemy.exc import DataError, OperationalError

from memsvc.obs.capping import MESSAGE_LIMIT, capped
from memsvc.sessions.api import (
    CoordinationUnavailableError,
    IncompatibleStateError,
    InvalidRequestError,
    ManagerClosedError,
    PositionConflictError,
    QuotaExceededError,
    SessionBusyError,
    SessionMovedError,
    StateRolledBackError,
)
from memsvc.store.errors import NotFoundError
from memsvc.wire import OWNER_METADATA, POSITION_METADATA

log = structlog.get_logger(__name__)


class UnauthenticatedError(Exception):
    """No API key, or one that names no tenant."""


class PermissionDeniedError(Exception):
    """An admin call without the admin key."""


class DeadlineExceededError(Exception):
    """The call's deadline passed before its work started: nothing was done."""


class ShuttingDownError(Exception):
    """The server is stopping: an idle stream is ended so that the client moves on."""


STATUS_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),  # SessionNotFoundError, and the store's
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (QuotaExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (CoordinationUnavailableError, grpc.StatusCode.UNAVAILABLE),  # before its base class
    (SessionMovedError, grpc.StatusCode.UNAVAILABLE),  # with OWNER_METADATA: see `rpc`
    (SessionBusyError, grpc.StatusCode.ABORTED),
    (IncompatibleStateError, grpc.StatusCode.FAILED_PRECONDITION),
    (PositionConflictError, grpc.StatusCode.FAILED_PRECONDITION),  # with POSITION_METADATA
    (StateRolledBackError, grpc.StatusCode.FAILED_PRECONDITION),  # refused; rolled back
    (ManagerClosedError, grpc.StatusCode.UNAVAILABLE),
    (ShuttingDownError, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    # The metadata database cannot be reached (restarting, network): try again later.
    (OperationalError, grpc.StatusCode.UNAVAILABLE),
    # A value the database refuses to store (a backstop: fields are checked before).
    (DataError, grpc.StatusCode.INVALID_ARGUMENT),
)


# A full disk (or quota): the write was refused and nothing acknowledged; retry later.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or what it was raised from) is the disk running out of space."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return False


def status_code(error: Exception) -> grpc.StatusCode:
    """The status a failure is reported with (INTERNAL for anything unexpected)."""
    if disk_full(error):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    for kind, code in STATUS_CODES:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


F = TypeVar("F", bound=Callable[..., Any])


def rpc(method: F) -> F:
    """Wraps a servicer method (coroutine or async generator): errors become statuses,
    and a call whose deadline has passed by the time it arrives is refused unseen."""
    name = method.__name__

    async def fail(context: grpc.aio.ServicerContext, error: Exception) -> None:
        code = status_code(error)
        if code is grpc.StatusCode.INTERNAL:
            log.exception("rpc_failed", method=name)
            await context.abort(code, f"internal error: {type(error).__name__}")
        # A message may quote what the client sent (a session id of any length): capped.
        reason = (
            "the server's disk is full; nothing was written"
            if disk_full(error)
            else capped(str(error), MESSAGE_LIMIT)
        )
        log.info("rpc_refused", method=name, code=code.name, reason=reason)
        trailing: tuple[tuple[str, str], ...] = ()
        if isinstance(error, SessionMovedError):  # empty: refused, the owner's address unknown
            trailing = ((OWNER_METADATA, error.address or ""),)
        elif isinstance(error, PositionConflictError):
            trailing = ((POSITION_METADATA, str(error.position)),)
        await context.abort(code, reason, trailing_metadata=trailing)

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(
            self: Any, request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            try:
                check_deadline(context)
                async for response in method(self, request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await fail(context, error)

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            check_deadline(context)
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await fail(context, error)

    return unary  # type: ignore[return-value]


def check_deadline(context: grpc.aio.ServicerContext) -> float | None:
    """Seconds left before the call's deadline (None: it has none); DeadlineExceededError
    if none are left."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise DeadlineExceededError("the deadline passed before the call was served")
    return remaining
