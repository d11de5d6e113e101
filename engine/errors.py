"""Domain error kinds shared by every package (a torch-free leaf).

Inner packages raise these (or subclasses) and never mention gRPC; ``pdserve.serving.errors`` holds the one
table that maps each kind to a gRPC status. A subclass picks its kind by its first base in this list.
"""


class EngineError(Exception):
    """Base class for engine errors."""


class InvalidRequestError(EngineError, ValueError):
    """The request itself is malformed (bad prompt, bad sampling params)."""


class CapacityError(EngineError):
    """No room now (no KV blocks, queue full, rate limit); ``retry_after_s`` hints when to retry."""

    retry_after_s: float = 0.0


class RequestNotFoundError(EngineError, KeyError):
    """An operation named a request id (or other name) that is not known."""


class AdapterNotFoundError(RequestNotFoundError):
    """A request or an admin call named a LoRA adapter that is not loaded (a not-found kind)."""


class UnavailableError(Exception):
    """A peer or worker cannot be reached or failed mid-call; another one may succeed."""


class PreconditionError(Exception):
    """The system is not in a state that allows the operation (e.g. KV layouts differ)."""


class PermissionDeniedError(Exception):
    """The caller is known but not allowed to do this."""


class UnauthenticatedError(Exception):
    """The caller did not prove who it is."""


class DeadlineError(TimeoutError):
    """The request's deadline passed."""


class CancelledError(Exception):
    """The caller went away or cancelled the request."""
