"""Typed client exceptions; every `grpc.RpcError` from the service becomes one of these."""

from __future__ import annotations

import grpc


class EmbedwardenError(Exception):
    """Base class. `code` is the gRPC status code, `details` the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class InvalidArgument(EmbedwardenError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(EmbedwardenError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(EmbedwardenError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(EmbedwardenError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(EmbedwardenError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(EmbedwardenError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(EmbedwardenError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(EmbedwardenError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(EmbedwardenError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Cancelled(EmbedwardenError):
    code = grpc.StatusCode.CANCELLED


class InternalError(EmbedwardenError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[EmbedwardenError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Unauthenticated,
        PermissionDenied,
        Cancelled,
        InternalError,
    )
}


def from_rpc_error(error: grpc.RpcError) -> EmbedwardenError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    cls = _BY_CODE.get(code, EmbedwardenError)
    return cls(details, code)


def from_status(code_value: int, details: str) -> EmbedwardenError:
    """For per-message errors of a stream, which carry the numeric status code."""
    code = next((c for c in grpc.StatusCode if c.value[0] == code_value), grpc.StatusCode.UNKNOWN)
    return _BY_CODE.get(code, EmbedwardenError)(details, code)
