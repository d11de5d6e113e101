"""Run the gateway process: bind, print the ready line, serve until SIGTERM / SIGINT, then drain."""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass

from aiohttp import web

from pdserve.router.gateway.app import Gateway
from pdserve.serving.rpc import TlsConfig, channel, install_sigterm

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    router: str  # the router's gRPC host:port
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port
    tls: TlsConfig | None = None  # to the router
    https_cert: str = ""  # PEM: serve HTTPS with it (and https_key); "": plain HTTP
    https_key: str = ""
    timeout_s: float = 600.0  # gRPC deadline per call; past it the client gets 504
    default_chat_max_tokens: int | None = 1024  # chat requests without max_tokens (completions: 16)
    max_body_bytes: int = 16 << 20
    shutdown_grace_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.router:
            raise ValueError("router: the router's host:port is required")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be 0-65535, got {self.port}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s: must be > 0, got {self.timeout_s}")
        if self.default_chat_max_tokens is not None and self.default_chat_max_tokens <= 0:
            raise ValueError(f"default_chat_max_tokens: must be > 0, got {self.default_chat_max_tokens}")
        if bool(self.https_cert) != bool(self.https_key):
            raise ValueError("https_cert/https_key: give both (PEM certificate and its private key) or neither")

    def ssl_context(self) -> ssl.SSLContext | None:
        """The HTTPS context (TLS 1.2+), or None for plain HTTP; ValueError naming a file that does not load."""
        if not self.https_cert:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.https_cert, self.https_key)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"https_cert/https_key: cannot load {self.https_cert} / {self.https_key}: {e}") from None
        return ctx


def url_for(host: str, port: int, https: bool = False) -> str:
    """The base URL clients use (``http://127.0.0.1:PORT/v1``); a wildcard bind is reached on loopback."""
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"{'https' if https else 'http'}://{host}:{port}/v1"


async def serve(cfg: GatewayConfig, ready: asyncio.Future | None = None, stop: asyncio.Event | None = None) -> None:
    ssl_context = cfg.ssl_context()  # a bad certificate fails here, before anything binds
    ch = channel(cfg.router, cfg.tls)
    gateway = Gateway(cfg.router, ch, cfg.timeout_s, cfg.default_chat_max_tokens, cfg.max_body_bytes)
    runner = web.AppRunner(gateway.app(), handler_cancellation=True, access_log=None,
                           shutdown_timeout=cfg.shutdown_grace_s)
    await runner.setup()
    try:
        site = web.TCPSite(runner, cfg.host, cfg.port, ssl_context=ssl_context)
        await site.start()
        port = runner.addresses[0][1]
        url = url_for(cfg.host, port, https=ssl_context is not None)
        print(f"PDSERVE_READY gateway {cfg.host}:{port} url={url}", flush=True)
        logger.info("OpenAI-compatible gateway on %s -> router %s", url, cfg.router)
        if ready is not None:
            ready.set_result(url)
        stop = stop or asyncio.Event()
        install_sigterm(stop)
        await stop.wait()
    finally:
        await runner.cleanup()  # stops accepting, lets in-flight requests finish (shutdown_grace_s)
        await ch.close()
