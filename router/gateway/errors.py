"""Errors as OpenAI sends them: ``{"error": {"message", "type", "param", "code"}}`` with the matching HTTP
status. A router status maps through one table; the router's messages start with the field they are about
(``max_tokens: ...``), which becomes ``param``."""

from __future__ import annotations

import json
import math
import re

import grpc

# gRPC status -> (HTTP status, OpenAI error type)
HTTP_FOR_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "server_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}
_TYPE_FOR_HTTP = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                  404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
                  415: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable",
                  504: "timeout"}
_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")
# router field names that OpenAI calls something else
_PARAM = {"token_ids": "prompt", "sampling.max_tokens": "max_tokens"}


class GatewayError(Exception):
    """An HTTP error to answer with OpenAI's error JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after_s: float = 0.0):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    @property
    def type(self) -> str:
        return _TYPE_FOR_HTTP.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def json(self) -> str:
        return json.dumps(self.body())

    def headers(self) -> dict[str, str]:
        if self.retry_after_s > 0:
            return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}
        return {}


def bad_field(param: str, message: str) -> GatewayError:
    """A 400 about one request field; the message starts with the field, as the router's do."""
    return GatewayError(400, f"{param}: {message}", param=param, code="invalid_argument")


def from_rpc_error(e: grpc.aio.AioRpcError) -> GatewayError:
    """The router's status -> HTTP: 400, 401, 403, 404 (unknown model), 429 (+Retry-After), 503, 504."""
    code = e.code()
    status, _ = HTTP_FOR_STATUS.get(code, (500, "server_error"))
    message = e.details() or code.name
    m = _FIELD.match(message)
    param = _PARAM.get(m.group(1), m.group(1)) if m and status < 500 else None
    retry_after_s = 0.0
    for key, value in e.trailing_metadata() or ():
        if key == "retry-after-ms":
            try:
                retry_after_s = float(value) / 1000
            except (TypeError, ValueError):
                pass
    name = "model_not_found" if code is grpc.StatusCode.NOT_FOUND and param == "model" else code.name.lower()
    if code is grpc.StatusCode.UNAUTHENTICATED:
        name = "invalid_api_key"
    if retry_after_s <= 0 and code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry_after_s = 1.0
    return GatewayError(status, message, param=param, code=name, retry_after_s=retry_after_s)
