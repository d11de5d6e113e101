"""Typed domain errors raised by the engine. Services map them to gRPC codes in one place."""


class EngineError(Exception):
    """Base class for engine errors."""


class InvalidRequestError(EngineError, ValueError):
    """The request itself is malformed (bad prompt, bad sampling params)."""

    grpc_code = "INVALID_ARGUMENT"


class CapacityError(EngineError):
    """The engine cannot hold the request now (no KV blocks, queue full)."""

    grpc_code = "RESOURCE_EXHAUSTED"


class RequestNotFoundError(EngineError, KeyError):
    """An operation named a request id the engine does not know."""

    grpc_code = "NOT_FOUND"
