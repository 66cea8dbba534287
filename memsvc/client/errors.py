"""Typed errors for the SDK, one per gRPC status code the service answers with.

Every failed call raises a `MemsvcError` subclass carrying the status code and
the server's message; `from_rpc_error` is the one place that maps them.
"""

from __future__ import annotations

import grpc


class MemsvcError(Exception):
    """A call failed; `code` is the gRPC status, the message is the server's."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class NotFoundError(MemsvcError):
    """No such session for this tenant (another tenant's session looks the same)."""

    code = grpc.StatusCode.NOT_FOUND


class InvalidArgumentError(MemsvcError):
    """The request is malformed: empty, ids outside the vocabulary, bad UTF-8, too many tokens."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class UnauthenticatedError(MemsvcError):
    """The API key is missing or names no tenant."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(MemsvcError):
    """An admin call without the admin key."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(MemsvcError):
    """A quota or limit: sessions per tenant, tokens per minute, message size."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class SessionBusyError(MemsvcError):
    """The session is quarantined or moving; retry later."""

    code = grpc.StatusCode.ABORTED


class FailedPreconditionError(MemsvcError):
    """An imported state does not fit the served model."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExceededError(MemsvcError):
    """The call's deadline passed first."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnavailableError(MemsvcError):
    """The server cannot be reached or is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


_BY_CODE = {
    kind.code: kind
    for kind in (
        NotFoundError,
        InvalidArgumentError,
        UnauthenticatedError,
        PermissionDeniedError,
        ResourceExhaustedError,
        SessionBusyError,
        FailedPreconditionError,
        DeadlineExceededError,
        UnavailableError,
    )
}


def from_rpc_error(error: grpc.RpcError) -> MemsvcError:
    """The typed error for a failed call (MemsvcError itself for other codes)."""
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    message = error.details() or code.name  # type: ignore[attr-defined]
    kind = _BY_CODE.get(code)
    return kind(message) if kind is not None else MemsvcError(message, code)
