"""`RpcMetricsInterceptor`: every finished RPC of the server, counted by method and status code
and timed (`ServiceMetrics.observe_rpc`).

The method is gRPC's full name ("/memsvc.v1.MemoryService/Append"), so the label set is
the methods this server registers (health and reflection included); a streaming RPC is
timed from its start to its end, and one whose client went away counts as CANCELLED.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from memsvc.obs.metrics import ServiceMetrics

Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]
_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # no such method: gRPC answers UNIMPLEMENTED, nothing to time
        method = handler_call_details.method
        for kind in _KINDS:
            behavior = getattr(handler, kind)
            if behavior is not None:
                return handler._replace(**{kind: self._timed(method, behavior)})
        return handler

    def _timed(self, method: str, behavior: Behavior) -> Behavior:
        observe = self._metrics.observe_rpc

        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator:
                started, error = time.perf_counter(), None
                try:
                    async for response in behavior(request, context):
                        yield response
                except BaseException as raised:
                    error = raised
                    raise
                finally:
                    observe(method, _code(context, error), time.perf_counter() - started)

            return stream

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started, error = time.perf_counter(), None
            try:
                return await behavior(request, context)
            except BaseException as raised:
                error = raised
                raise
            finally:
                observe(method, _code(context, error), time.perf_counter() - started)

        return call


def _code(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    """The status name the call ends with."""
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED.name  # the client went away
    code = context.code()  # set by an abort (every refusal: `status.rpc`) or set_code
    if code is not None:
        return code.name
    return grpc.StatusCode.OK.name if error is None else grpc.StatusCode.UNKNOWN.name
