"""Requests whose bytes do not decode: INVALID_ARGUMENT, like any other malformed request.

grpc decodes a request before the servicer sees it and answers a decoding error
itself: UNKNOWN for a unary request, and inside a request stream the error
reaches the servicer, where it is INTERNAL. This interceptor makes each
decoding fail softly, into an `Undecodable` value, and refuses that value
before the servicer runs (or, in a stream, when the servicer reads it).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

Context = grpc.aio.ServicerContext
_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


@dataclass(frozen=True)
class Undecodable:
    """A request message that did not decode, and why."""

    reason: str


class DecodingInterceptor(grpc.aio.ServerInterceptor):
    """Answers undecodable requests with INVALID_ARGUMENT (module docstring)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        kind = next(kind for kind in _KINDS if getattr(handler, kind) is not None)
        check = _check_stream if kind.startswith("stream_") else _check_one
        return handler._replace(
            request_deserializer=_lenient(handler.request_deserializer),
            **{kind: _checking(getattr(handler, kind), check)},
        )


def _lenient(decode: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def lenient(raw: bytes) -> Any:
        try:
            return decode(raw)
        except DecodeError as error:
            return Undecodable(str(error))

    return lenient


async def _refuse(context: Context, request: Undecodable) -> None:
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT, f"the request does not decode: {request.reason}"
    )


async def _check_one(request: Any, context: Context) -> Any:
    if isinstance(request, Undecodable):
        await _refuse(context, request)
    return request


async def _check_stream(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
    async def checked() -> AsyncIterator[Any]:
        async for request in requests:
            yield await _check_one(request, context)

    return checked()


def _checking(
    behaviour: Callable[..., Any], check: Callable[[Any, Context], Awaitable[Any]]
) -> Callable[..., Any]:
    """``behaviour`` (a coroutine, or an async generator of responses) given its request,
    or its request stream, through ``check``."""
    if inspect.isasyncgenfunction(behaviour):

        async def generator(request: Any, context: Context) -> AsyncIterator[Any]:
            async for response in behaviour(await check(request, context), context):
                yield response

        return generator

    async def coroutine(request: Any, context: Context) -> Any:
        return await behaviour(await check(request, context), context)

    return coroutine
