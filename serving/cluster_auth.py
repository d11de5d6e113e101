"""The cluster credential: every internal RPC carries a signed per-call token, checked by a server interceptor.

Who holds it. Every process of one cluster (router, prefill and decode workers) gets the same
``PDSERVE_CLUSTER_SECRET`` (read only in ``engine/env.py``): ``pdserve up`` makes a random one per cluster and
hands it to its children through their environment; Kubernetes takes it from the Secret ``pdserve-cluster``.

The token. ``K = HMAC-SHA256(secret, "pdserve/rpc/token/v1")``, a key for this use only (the KV handshake derives
its own key from the same secret, so a MAC of one protocol is never valid in the other). Every call sends the
metadata ``pdserve-cluster-token: v1.<principal>.<expiry_ms>.<mac>`` with
``mac = base64url(HMAC-SHA256(K, "v1|<method>|<binding>|<principal>|<expiry_ms>"))``, where

- ``method`` is the full gRPC method (``/pdserve.v1.Decode/Release``): a token made for one method is
  worthless on any other;
- ``binding`` is the request's ``request_id`` (Prefill, Reserve, Decode, Release), the registered ``address``
  (Admin.Register), or empty (GetLoad, KVEvents): a token made for one request is worthless for another;
- ``principal`` names the caller (``router-3fa2c1``, ``decode-9b1e07``). A decode worker binds every
  reservation and stream to the principal that made it; only that principal may Release it, and no other
  call with the same id can touch it (pdserve.decode.service);
- ``expiry_ms`` is Unix time in milliseconds, ``TOKEN_TTL_S`` (30 s) after minting. An expired token is
  refused, and so is one expiring more than ``TOKEN_TTL_S + MAX_CLOCK_SKEW_S`` ahead.

Refusals. No token, a malformed one, a wrong MAC (wrong secret, another method, another request, an edited
principal or expiry) and an expired token are all UNAUTHENTICATED, with one fixed message. The server recomputes
the MAC for the method and request it is serving, so it cannot tell a token made for another method from a
forgery, and says nothing more (PERMISSION_DENIED is never used here). The reason goes to the server's log at
WARNING (at most one line a second; ``num_refused`` counts them all).

What it does not do. A token is a bearer token until it expires: whoever can read the traffic can replay it for
the same method and request within 30 s. Confidentiality and replay protection on the wire are mTLS's job
(``--tls-cert/--tls-key/--tls-ca``, still available and composing with the token). Every holder of the secret
can mint any principal: principals keep the cluster's own components from touching each other's requests (a
bug, a confused deputy), they do not separate mutually distrusting parties.

Without a secret (development) nothing is sent or checked; the CLI refuses to start a worker or router on a
non-loopback address without one, and warns loudly on loopback (``pdserve.deploy.cli_checks``). Health checks
and reflection stay open, for probes.

Clients attach tokens explicitly on the hot paths (``ClusterCredential.metadata``); ``token_interceptors`` do it
for every call of a channel (tools, tests, ``serving.rpc.channel(..., credential=...)``).
"""

from __future__ import annotations

import base64
import contextvars
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Callable

import grpc

from pdserve.engine.errors import UnauthenticatedError
from pdserve.protos import pdserve_pb2 as pb
from pdserve.serving.errors import abort_with

logger = logging.getLogger(__name__)

TOKEN_METADATA = "pdserve-cluster-token"
TOKEN_TTL_S = 30.0
MAX_CLOCK_SKEW_S = 30.0
REFUSAL = "missing or invalid cluster credential"
_VERSION = "v1"
_KEY_LABEL = b"pdserve/rpc/token/v1"
_PRINCIPAL = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MAX_TOKEN_LEN = 256


def method_name(service: str, name: str) -> str:
    """The full gRPC method name, e.g. ``method_name("Decode", "Release") == "/pdserve.v1.Decode/Release"``."""
    return f"/{pb.DESCRIPTOR.package}.{service}/{name}"


WORKER_SERVICES = ("Prefill", "Decode")
WORKER_PREFIXES = tuple(f"/{pb.DESCRIPTOR.package}.{s}/" for s in WORKER_SERVICES)
REGISTER = method_name("Admin", "Register")


def derive_key(secret: str) -> bytes:
    return hmac.new(secret.encode(), _KEY_LABEL, hashlib.sha256).digest()


def binding_of(request) -> str:
    """What a token for ``request`` is bound to besides its method: the request id, a registration's address, or ""."""
    rid = getattr(request, "request_id", None)
    if isinstance(rid, str):
        return rid
    address = getattr(request, "address", None)
    return address if isinstance(address, str) and isinstance(request, pb.RegisterRequest) else ""


def _mac(key: bytes, method: str, binding: str, principal: str, expiry_ms: int) -> str:
    msg = f"{_VERSION}|{method}|{binding}|{principal}|{expiry_ms}".encode()
    return base64.urlsafe_b64encode(hmac.digest(key, msg, "sha256")).rstrip(b"=").decode()


class ClusterCredential:
    """This process's cluster credential: mints tokens as ``principal`` and verifies other holders' tokens."""

    __slots__ = ("principal", "ttl_s", "_key", "_clock")

    def __init__(self, secret: str, principal: str, ttl_s: float = TOKEN_TTL_S,
                 clock: Callable[[], float] = time.time):
        if not secret:
            raise ValueError("cluster secret: must not be empty")
        if not _PRINCIPAL.match(principal):
            raise ValueError(f"principal: 1-64 of [A-Za-z0-9_-], got {principal!r}")
        self.principal = principal
        self.ttl_s = ttl_s
        self._key = derive_key(secret)
        self._clock = clock

    def token(self, method: str, binding: str = "") -> str:
        expiry_ms = int((self._clock() + self.ttl_s) * 1000)
        return f"{_VERSION}.{self.principal}.{expiry_ms}.{_mac(self._key, method, binding, self.principal, expiry_ms)}"

    def metadata(self, method: str, binding: str = "") -> tuple[tuple[str, str], ...]:
        return ((TOKEN_METADATA, self.token(method, binding)),)

    def verify(self, token: str | None, method: str, binding: str) -> str:
        """The principal ``token`` authenticates for this method and binding; raises UnauthenticatedError (with the
        reason, for the server's log) otherwise."""
        if not token:
            raise UnauthenticatedError("no token")
        if len(token) > _MAX_TOKEN_LEN:
            raise UnauthenticatedError("token too long")
        parts = token.split(".")
        if len(parts) != 4 or parts[0] != _VERSION or not _PRINCIPAL.match(parts[1]) or not parts[2].isdigit():
            raise UnauthenticatedError("malformed token")
        _, principal, expiry_s, mac = parts
        expiry_ms = int(expiry_s)
        if not hmac.compare_digest(mac, _mac(self._key, method, binding, principal, expiry_ms)):
            raise UnauthenticatedError("bad MAC (wrong secret, or a token for another method or request)")
        now_ms = self._clock() * 1000
        if expiry_ms <= now_ms:
            raise UnauthenticatedError(f"token expired {(now_ms - expiry_ms) / 1000:.1f}s ago")
        if expiry_ms > now_ms + (self.ttl_s + MAX_CLOCK_SKEW_S) * 1000:
            raise UnauthenticatedError("token expires too far ahead (clock skew?)")
        return principal


_CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("pdserve_caller", default="")


def caller() -> str:
    """The principal the RPC being served was authenticated as ("" when the server checks no credential)."""
    return _CALLER.get()


def token_from(metadata) -> str:
    for key, value in metadata or ():
        if key == TOKEN_METADATA:
            return value if isinstance(value, str) else ""
    return ""


class ClusterAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuse every call to a method under ``prefixes`` (or equal to one of ``methods``) without a valid token
    for that method and request; the others pass untouched. The servicer reads the caller with ``caller()``."""

    def __init__(self, credential: ClusterCredential, prefixes: tuple[str, ...] = WORKER_PREFIXES,
                 methods: tuple[str, ...] = ()):
        self.credential = credential
        self.prefixes = prefixes
        self.methods = frozenset(methods)
        self.num_refused = 0
        self._last_log = 0.0
        self._unlogged = 0

    def protects(self, method: str) -> bool:
        return method in self.methods or method.startswith(self.prefixes)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        method = details.method or ""
        if handler is None or not self.protects(method):
            return handler
        return self._checked(handler, method, token_from(details.invocation_metadata))

    def _check(self, request, method: str, token: str, context) -> bool:
        try:
            _CALLER.set(self.credential.verify(token, method, binding_of(request)))
            return True
        except UnauthenticatedError as e:
            self._refused(method, context.peer(), str(e))
            return False

    def _refused(self, method: str, peer: str, reason: str) -> None:
        self.num_refused += 1
        now = time.monotonic()
        if now - self._last_log < 1.0:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more refused since the last line)" if self._unlogged else ""
        logger.warning("refused %s from %s: %s%s", method, peer, reason, more)
        self._last_log, self._unlogged = now, 0

    def _checked(self, handler, method: str, token: str):
        check = self._check
        deserialize, serialize = handler.request_deserializer, handler.response_serializer
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def stream(request, context):
                if not check(request, method, token, context):
                    await abort_with(context, UnauthenticatedError(REFUSAL))
                async for resp in inner_stream(request, context):
                    yield resp

            return grpc.unary_stream_rpc_method_handler(stream, deserialize, serialize)
        if handler.unary_unary:
            inner_unary = handler.unary_unary

            async def unary(request, context):
                if not check(request, method, token, context):
                    await abort_with(context, UnauthenticatedError(REFUSAL))
                return await inner_unary(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, deserialize, serialize)

        async def refuse(request_iterator, context):  # no pdserve method streams requests
            await abort_with(context, UnauthenticatedError(REFUSAL))

        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(refuse, deserialize, serialize)
        return grpc.stream_unary_rpc_method_handler(refuse, deserialize, serialize)


def token_interceptors(credential: ClusterCredential) -> list:
    """Client side: interceptors that attach a fresh token to every call of the channel they are installed on
    (one per call shape: grpc.aio files each interceptor under the first shape it implements)."""
    return [_UnaryUnaryTokens(credential), _UnaryStreamTokens(credential)]


class _Tokens:
    def __init__(self, credential: ClusterCredential):
        self.credential = credential

    def _details(self, details, request):
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(TOKEN_METADATA, self.credential.token(method, binding_of(request)))
        return details._replace(metadata=metadata)


class _UnaryUnaryTokens(_Tokens, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details, request), request)


class _UnaryStreamTokens(_Tokens, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details, request), request)
