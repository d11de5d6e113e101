"""The one table mapping domain errors to gRPC status, and the abort helper every servicer uses.

Domain packages raise the kinds in ``pdserve.engine.errors`` (or Python's ValueError, KeyError,
TimeoutError, ConnectionError) and know nothing of gRPC. ``RpcStatusError`` is the serving layer's own: it
relays a status a peer returned, unchanged, with optional trailing metadata.
"""

from __future__ import annotations

import logging

import grpc

from pdserve.engine.errors import (
    CancelledError,
    CapacityError,
    DeadlineError,
    InvalidRequestError,
    PermissionDeniedError,
    PreconditionError,
    RequestNotFoundError,
    UnauthenticatedError,
    UnavailableError,
)

logger = logging.getLogger(__name__)


class RpcStatusError(Exception):
    """A gRPC status to return as is (a peer's status relayed, or a servicer's own refusal)."""

    def __init__(self, code: grpc.StatusCode, message: str, trailing_metadata: tuple = ()):
        super().__init__(message)
        self.code = code
        self.trailing_metadata = tuple(trailing_metadata)


# Checked in order along the exception's MRO: the first class found decides the status.
STATUS_TABLE: dict[type[BaseException], grpc.StatusCode] = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    CapacityError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RequestNotFoundError: grpc.StatusCode.NOT_FOUND,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
    PreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    DeadlineError: grpc.StatusCode.DEADLINE_EXCEEDED,
    CancelledError: grpc.StatusCode.CANCELLED,
    ValueError: grpc.StatusCode.INVALID_ARGUMENT,
    KeyError: grpc.StatusCode.NOT_FOUND,
    TimeoutError: grpc.StatusCode.DEADLINE_EXCEEDED,
    ConnectionError: grpc.StatusCode.UNAVAILABLE,
}


def status_for(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, RpcStatusError):
        return exc.code
    for cls in type(exc).__mro__:
        code = STATUS_TABLE.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def message_for(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return str(exc) or type(exc).__name__


def trailers_for(exc: BaseException) -> tuple:
    trailing = tuple(getattr(exc, "trailing_metadata", ()) or ())
    retry_after_s = getattr(exc, "retry_after_s", 0.0) or 0.0
    if retry_after_s > 0 and not any(k == "retry-after-ms" for k, _ in trailing):
        trailing += (("retry-after-ms", str(int(retry_after_s * 1000))),)
    return trailing


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Abort the RPC with the status that ``exc`` maps to (raises AbortError, as grpc.aio does)."""
    code = status_for(exc)
    trailing = trailers_for(exc)
    if trailing:
        context.set_trailing_metadata(trailing)
    if code is grpc.StatusCode.INTERNAL:
        logger.error("internal error: %r", exc, exc_info=exc)
    await context.abort(code, message_for(exc))
