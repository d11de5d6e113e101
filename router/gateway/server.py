"""Run the gateway process: bind, print the ready line, serve until SIGTERM / SIGINT, then drain."""

from __future__ import annotations

import asyncio
import logging
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
    tls: TlsConfig | None = None  # to the router (the HTTP side is plain; put TLS in front of it)
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


def url_for(host: str, port: int) -> str:
    """The base URL clients use (``http://127.0.0.1:PORT/v1``); a wildcard bind is reached on loopback."""
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/v1"


async def serve(cfg: GatewayConfig, ready: asyncio.Future | None = None, stop: asyncio.Event | None = None) -> None:
    ch = channel(cfg.router, cfg.tls)
    gateway = Gateway(cfg.router, ch, cfg.timeout_s, cfg.default_chat_max_tokens, cfg.max_body_bytes)
    runner = web.AppRunner(gateway.app(), handler_cancellation=True, access_log=None,
                           shutdown_timeout=cfg.shutdown_grace_s)
    await runner.setup()
    try:
        site = web.TCPSite(runner, cfg.host, cfg.port)
        await site.start()
        port = runner.addresses[0][1]
        url = url_for(cfg.host, port)
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
