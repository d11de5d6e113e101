"""API keys on the router: each key maps to a tenant.

Clients send ``authorization: Bearer <key>`` (or ``x-api-key: <key>``). No key or an unknown key is
UNAUTHENTICATED. A key may only act for its own tenant: a request naming another tenant is
PERMISSION_DENIED, and a request naming none is stamped with the key's tenant (which rate limits then use).
Batch requests are stamped the same way (a job belongs to the key's tenant, router.batch_service).
The Admin service needs a key of the tenant ``admin``. Health checks and reflection stay open.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import grpc

from pdserve.engine.errors import PermissionDeniedError, UnauthenticatedError
from pdserve.serving.errors import abort_with

ADMIN_TENANT = "admin"
_PROTECTED = ("/pdserve.v1.Generation/", "/pdserve.v1.Admin/", "/pdserve.v1.Batch/")


def load_api_keys(path: str) -> dict[str, str]:
    """JSON file {"<key>": "<tenant>", ...}."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"api-keys: cannot read {path!r}: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) and k and v
                                             for k, v in data.items()):
        raise ValueError("api-keys: expected a JSON object of non-empty key -> tenant strings")
    return data


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _key_from(metadata) -> str:
    md = {k.lower(): v for k, v in (metadata or ())}
    auth = md.get("authorization", "")
    if isinstance(auth, str) and auth.lower().startswith("bearer "):
        return auth[7:].strip()
    key = md.get("x-api-key", "")
    return key if isinstance(key, str) else ""


def _refusal(handler, exc: Exception):
    async def deny_unary(request, context):
        await abort_with(context, exc)

    async def deny_stream(request, context):
        await abort_with(context, exc)
        yield  # pragma: no cover - makes this an async generator

    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            deny_stream, handler.request_deserializer, handler.response_serializer
        )
    return grpc.unary_unary_rpc_method_handler(deny_unary, handler.request_deserializer, handler.response_serializer)


def _with_tenant(handler, tenant: str):
    """Wrap a Generation handler: refuse other tenants, stamp the key's tenant on the request."""

    def check(request, context) -> str | None:
        if not hasattr(request, "tenant"):
            return None  # undecodable: refused as INVALID_ARGUMENT further in
        if request.tenant and request.tenant != tenant:
            return f"tenant: this API key may not act for tenant {request.tenant!r}"
        request.tenant = tenant
        return None

    if handler.unary_stream:
        inner = handler.unary_stream

        async def stream(request, context):
            msg = check(request, context)
            if msg:
                await abort_with(context, PermissionDeniedError(msg))
            async for resp in inner(request, context):
                yield resp

        return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)
    inner = handler.unary_unary

    async def unary(request, context):
        msg = check(request, context)
        if msg:
            await abort_with(context, PermissionDeniedError(msg))
        return await inner(request, context)

    return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """``exempt``: methods another credential covers (Admin.Register: the cluster credential, when the router has
    a cluster secret; see pdserve.serving.cluster_auth)."""

    def __init__(self, keys: dict[str, str], exempt: tuple[str, ...] = ()):
        self.tenants = {_digest(k): t for k, t in keys.items()}
        self.exempt = frozenset(exempt)
        self.num_refused = 0

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        method = details.method or ""
        if handler is None or not method.startswith(_PROTECTED) or method in self.exempt:
            return handler
        key = _key_from(details.invocation_metadata)
        tenant = self.tenants.get(_digest(key)) if key else None
        if tenant is None:
            self.num_refused += 1
            return _refusal(handler, UnauthenticatedError("missing or unknown API key"))
        if method.startswith("/pdserve.v1.Admin/"):
            if tenant != ADMIN_TENANT:
                self.num_refused += 1
                return _refusal(handler, PermissionDeniedError(
                    f"the Admin service needs an admin key (an --api-keys entry whose tenant is {ADMIN_TENANT!r})"))
            return handler
        return _with_tenant(handler, tenant)
