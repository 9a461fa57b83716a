"""The one place where domain errors become gRPC status codes.

Every RPC handler is wrapped by `rpc_method`/`rpc_stream_method`: a domain error aborts with its
code and message; anything else is a bug, logged with its traceback and reported as INTERNAL.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from .. import _errors as errors
from .._metrics import METRICS

log = logging.getLogger(__name__)

# Most specific first: the first matching class wins.
_STATUS_BY_ERROR: tuple[tuple[type[errors.EmbedwardenError], grpc.StatusCode], ...] = (
    (errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DiskFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.InternalFault, grpc.StatusCode.INTERNAL),
)


def status_for(error: BaseException) -> grpc.StatusCode:
    """The gRPC status code for an exception (INTERNAL for anything that is not a domain error)."""
    for cls, code in _STATUS_BY_ERROR:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def describe(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """Status code and client-facing message; logs a traceback for non-domain errors."""
    code = status_for(error)
    if code is grpc.StatusCode.INTERNAL and not isinstance(error, errors.InternalFault):
        log.exception("internal error", exc_info=error)
        return code, f"internal error ({type(error).__name__}); the server log has the traceback"
    return code, str(error)


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self = TypeVar("Self")


class _Handled:
    """The body every handler runs in: errors become status codes, and the request is timed.
    (A class rather than a generator-based context manager: this runs on every RPC.)"""

    __slots__ = ("context", "method", "start")

    def __init__(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.method = method
        self.context = context
        self.start = time.perf_counter()

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: object
    ) -> bool:
        code = grpc.StatusCode.OK
        try:
            if isinstance(error, grpc.aio.AbortError):  # the handler aborted the call itself
                code = _aborted_code(self.context)
            elif isinstance(error, Exception):
                code, message = describe(error)
                await self.context.abort(code, message)  # raises AbortError
            return False
        finally:
            METRICS.observe_request(self.method, code.name, time.perf_counter() - self.start)


def rpc_method(
    method: str,
) -> Callable[
    [Callable[[Self, Req, grpc.aio.ServicerContext], Awaitable[Resp]]],
    Callable[[Self, Req, grpc.aio.ServicerContext], Awaitable[Resp]],
]:
    """Decorates a unary handler: maps errors to status codes and records the request metrics."""

    def wrap(
        fn: Callable[[Self, Req, grpc.aio.ServicerContext], Awaitable[Resp]],
    ) -> Callable[[Self, Req, grpc.aio.ServicerContext], Awaitable[Resp]]:
        @functools.wraps(fn)
        async def handler(self: Self, request: Req, context: grpc.aio.ServicerContext) -> Resp:
            async with _Handled(method, context):
                return await fn(self, request, context)
            raise AssertionError("unreachable: context.abort raises")

        return handler

    return wrap


def rpc_stream_method(
    method: str,
) -> Callable[
    [Callable[[Self, Any, grpc.aio.ServicerContext], AsyncIterator[Resp]]],
    Callable[[Self, Any, grpc.aio.ServicerContext], AsyncIterator[Resp]],
]:
    """Like `rpc_method`, for handlers that yield a response stream."""

    def wrap(
        fn: Callable[[Self, Any, grpc.aio.ServicerContext], AsyncIterator[Resp]],
    ) -> Callable[[Self, Any, grpc.aio.ServicerContext], AsyncIterator[Resp]]:
        @functools.wraps(fn)
        async def handler(
            self: Self, request_iterator: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Resp]:
            async with _Handled(method, context):
                async for response in fn(self, request_iterator, context):
                    yield response

        return handler

    return wrap


def _aborted_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
