"""``pdserve gateway``: OpenAI-compatible HTTP in front of a running router. Never imports torch."""

from __future__ import annotations

import argparse

from pdserve.deploy import cli_checks as checks
from pdserve.deploy.cli_client import DEFAULT_ROUTER

DEFAULT_HTTP_PORT = 8000


def add_gateway_parser(sub, tls_args) -> argparse.ArgumentParser:
    g = sub.add_parser("gateway", help="serve OpenAI-compatible HTTP (/v1/completions, /v1/chat/completions) "
                       "in front of a router",
                       description="Serve OpenAI-compatible HTTP (completions, chat completions, models, health, "
                       "metrics) in front of a running router, forwarding Authorization: Bearer KEY to its API keys.")
    g.add_argument("--router", default=DEFAULT_ROUTER, help="the router's gRPC host:port")
    g.add_argument("--host", default="127.0.0.1", help="address to bind")
    g.add_argument("--port", type=checks.port, default=DEFAULT_HTTP_PORT, help="HTTP port (0: any free port)")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take (then 504)")
    g.add_argument("--default-max-tokens", type=checks.positive_int, default=1024,
                   help="max_tokens of a chat request that sets none (completions default to 16, as OpenAI's)")
    g.add_argument("--log-format", default="text", choices=["text", "json"], help="log line format")
    g.add_argument("--otlp-endpoint", default="", help="export OpenTelemetry traces to this OTLP/gRPC collector "
                   "(host:port; needs pip install pdserve[otel]; empty: tracing off); the client's traceparent "
                   "header is honoured and passed on to the router")
    g.add_argument("--https-cert", default="", help="PEM certificate: serve HTTPS (with --https-key)")
    g.add_argument("--https-key", default="", help="PEM private key for --https-cert")
    t = g.add_argument_group("TLS to the router")
    tls_args(t)
    return g


def config_from(a: argparse.Namespace, tls):
    from pdserve.router.gateway.server import GatewayConfig

    checks.check_port_free("--port", a.host, a.port)
    if a.timeout <= 0:
        raise checks.UsageError(f"--timeout: must be > 0, got {a.timeout}")
    try:
        cfg = GatewayConfig(router=a.router, host=a.host, port=a.port, tls=tls, timeout_s=a.timeout,
                            default_chat_max_tokens=a.default_max_tokens, https_cert=a.https_cert,
                            https_key=a.https_key)
        cfg.ssl_context()  # a certificate that does not load is a usage error, before anything starts
    except ValueError as e:  # "field: why" -> "--flag: why" (every error was blamed on --https-cert/--https-key)
        field, _, why = str(e).partition(": ")
        flag = "/".join(_FLAGS.get(f, "--" + f.replace("_", "-")) for f in field.split("/"))
        raise checks.UsageError(f"{flag}: {why}") from None
    return cfg


_FLAGS = {"timeout_s": "--timeout"}  # GatewayConfig fields whose flag is not "--" + the field's name
