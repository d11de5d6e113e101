"""gRPC helpers shared by every pdserve server: creation, health, reflection, TLS, channels, shutdown.

Errors map to status in ``pdserve.serving.errors`` (the one table).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pdserve.protos import pdserve_pb2, pdserve_pb2_grpc
from pdserve.serving.cluster_auth import REGISTER, ClusterCredential, token_interceptors
from pdserve.serving.reflection import enable_reflection

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]
MAX_RECONNECT_BACKOFF_MS = 2_000  # a peer back on its address is dialled again within about this long
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # gRPC's default reconnect backoff grows to 120 s: a worker restarted on the same address after a few
    # minutes down (a static list, or a registration within its TTL) sat unused for up to two minutes
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
]


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS for a process: its own certificate and key, and the CA that signs its peers.

    Servers present cert/key; with ``ca`` set they require client certificates signed by it (mTLS).
    Clients verify servers against ``ca`` and present cert/key (mTLS) when given.
    """

    cert: str = ""
    key: str = ""
    ca: str = ""
    server_name: str = ""  # override the name checked in the server's certificate

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("tls: --tls-cert and --tls-key go together")
        for name in ("cert", "key", "ca"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ValueError(f"tls: {name} file {path!r} does not exist")

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.ca)

    def _read(self, name: str) -> bytes | None:
        path = getattr(self, name)
        if not path:
            return None
        with open(path, "rb") as f:
            return f.read()

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if not self.cert:
            return None
        ca = self._read("ca")
        return grpc.ssl_server_credentials(
            [(self._read("key"), self._read("cert"))], root_certificates=ca, require_client_auth=ca is not None
        )

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.enabled:
            return None
        return grpc.ssl_channel_credentials(self._read("ca"), self._read("key"), self._read("cert"))


def create_server(
    addr: str,
    service_names: list[str],
    tls: TlsConfig | None = None,
    interceptors: list | None = None,
    max_receive_bytes: int = MAX_MESSAGE_BYTES,
) -> tuple[grpc.aio.Server, int, health.HealthServicer]:
    """A grpc.aio server with health and reflection (v1 and v1alpha); returns (server, bound port, health servicer).

    Call ``server.start()`` after adding servicers. ``addr`` may use port 0 for an ephemeral port. A request
    larger than ``max_receive_bytes`` is refused by gRPC itself (RESOURCE_EXHAUSTED) before it is parsed.
    """
    options = [(k, max_receive_bytes if k == "grpc.max_receive_message_length" else v) for k, v in SERVER_OPTIONS]
    server = grpc.aio.server(options=options, interceptors=interceptors or None)
    credentials = tls.server_credentials() if tls else None
    health_servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [pdserve_pb2.DESCRIPTOR.services_by_name[n].full_name for n in service_names]
    enable_reflection([*names, health.SERVICE_NAME], server)
    port = server.add_secure_port(addr, credentials) if credentials else server.add_insecure_port(addr)
    if port == 0:
        raise OSError(f"could not bind {addr}")
    return server, port, health_servicer


LIVENESS = "liveness"  # a health name that a drain never flips: the liveness probe's (readiness: a role service)


async def set_serving(health_servicer, service_names: list[str], serving: bool) -> None:
    """Readiness: "" and every service in ``service_names``. Serving also makes ``LIVENESS`` SERVING; a drain
    (``serving=False``) leaves it SERVING, so a draining process stays live while readiness flips."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    live = [LIVENESS] if serving else []
    for name in ["", *live, *(pdserve_pb2.DESCRIPTOR.services_by_name[n].full_name for n in service_names)]:
        result = health_servicer.set(name, status)
        if asyncio.iscoroutine(result):
            await result


def install_sigterm(stop_event: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop_event.set)
        except (NotImplementedError, RuntimeError):
            pass


def bearer(api_key: str) -> tuple[tuple[str, str], ...] | None:
    """Call metadata carrying a router API key (``authorization: Bearer KEY``); None without a key."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


def channel(address: str, tls: TlsConfig | None = None, credential: ClusterCredential | None = None
            ) -> grpc.aio.Channel:
    """A channel to ``address``; with ``credential`` every call on it carries a cluster token (tools and tests:
    the serving hot paths attach theirs explicitly)."""
    creds = tls.channel_credentials() if tls else None
    interceptors = token_interceptors(credential) if credential is not None else None
    if creds is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=interceptors)
    options = list(CHANNEL_OPTIONS)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.aio.secure_channel(address, creds, options=options, interceptors=interceptors)


def worker_channel(address: str, secret: str | None, principal: str = "tool", tls: TlsConfig | None = None
                   ) -> grpc.aio.Channel:
    """A channel to a worker whose every call carries a cluster token of ``secret`` as ``principal`` (tools,
    benchmarks and tests that read workers directly; no secret: a plain channel, for a cluster without one)."""
    return channel(address, tls, ClusterCredential(secret, principal) if secret else None)


UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


async def heartbeat(
    routers: list[str], address: str, role: str, stop: asyncio.Event, interval_s: float = 1.0,
    tls: TlsConfig | None = None, credential: ClusterCredential | None = None,
) -> None:
    """Register with every router and keep re-registering until ``stop``; then say goodbye.

    Each heartbeat carries a cluster token bound to Admin.Register and this worker's address. A router that
    refuses one (wrong or missing cluster secret, ...) is logged at WARNING, again whenever its answer changes
    and every ``REPEAT_WARNING_S`` while it keeps refusing; an unreachable router at INFO once."""
    channels = {r: channel(r, tls) for r in routers}
    stubs = {r: pdserve_pb2_grpc.AdminStub(ch) for r, ch in channels.items()}
    req = pdserve_pb2.RegisterRequest(address=address, role=role, ttl_s=interval_s * 3)
    last: dict[str, tuple[grpc.StatusCode | None, float]] = {}

    def md():
        return credential.metadata(REGISTER, address) if credential is not None else None

    try:
        while not stop.is_set():
            for r, stub in stubs.items():
                try:
                    await stub.Register(req, timeout=interval_s, metadata=md())
                    if last.get(r, (None, 0.0))[0] is not None:
                        logger.info("registered with router %s", r)
                    last[r] = (None, 0.0)
                except grpc.aio.AioRpcError as e:
                    _log_refused_heartbeat(r, e, last)
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval_s)
            except TimeoutError:
                pass
        bye = pdserve_pb2.RegisterRequest(address=address, role=role, leaving=True)
        for stub in stubs.values():
            try:
                await stub.Register(bye, timeout=1.0, metadata=md())
            except grpc.aio.AioRpcError:
                pass
    finally:
        for ch in channels.values():
            await ch.close()


REPEAT_WARNING_S = 30.0


def _log_refused_heartbeat(router: str, e: grpc.aio.AioRpcError, last: dict) -> None:
    code, now = e.code(), time.monotonic()
    prev_code, prev_t = last.get(router, (None, 0.0))
    if code == prev_code and now - prev_t < REPEAT_WARNING_S:
        logger.debug("register with router %s failed: %s", router, code.name)
        return
    last[router] = (code, now)
    if code in UNREACHABLE:
        logger.info("router %s is not reachable (%s); will keep trying", router, code.name)
    else:
        logger.warning("router %s refused this worker's registration: %s: %s (check PDSERVE_CLUSTER_SECRET)",
                       router, code.name, e.details())


class Undecodable:
    """Stands in for a request whose bytes did not parse (e.g. invalid UTF-8 in a string field)."""

    def __init__(self, error: str):
        self.error = error


def add_public_servicer(server: grpc.aio.Server, servicer, service: str) -> None:
    """Register ``servicer`` for ``service`` with deserializers that never fail: a malformed request
    becomes INVALID_ARGUMENT with a message, instead of grpc's bare UNKNOWN."""
    from google.protobuf.message import DecodeError

    desc = pdserve_pb2.DESCRIPTOR.services_by_name[service]
    handlers = {}
    for m in desc.methods:
        req_cls = getattr(pdserve_pb2, m.input_type.name)
        resp_ser = getattr(pdserve_pb2, m.output_type.name).SerializeToString
        bad = f"request: not a valid {m.input_type.full_name}"

        def deserialize(data: bytes, req_cls=req_cls):
            try:
                return req_cls.FromString(data)
            except (DecodeError, ValueError) as e:
                return Undecodable(str(e))

        behavior = getattr(servicer, m.name)
        if m.server_streaming:

            async def stream(request, context, behavior=behavior, bad=bad):
                if isinstance(request, Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{bad}: {request.error}")
                async for resp in behavior(request, context):
                    yield resp

            handlers[m.name] = grpc.unary_stream_rpc_method_handler(stream, deserialize, resp_ser)
        else:

            async def unary(request, context, behavior=behavior, bad=bad):
                if isinstance(request, Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{bad}: {request.error}")
                return await behavior(request, context)

            handlers[m.name] = grpc.unary_unary_rpc_method_handler(unary, deserialize, resp_ser)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(desc.full_name, handlers),))
