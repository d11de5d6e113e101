"""Prometheus metrics and structured logs shared by every pdserve process.

Metric names follow Prometheus conventions: ``pdserve_`` prefix, base units (seconds, bytes), ``_total``
for counters. This module defines no metric: each process imports only its own (``router.metrics``,
``serving.worker_metrics``, ``router.gateway.metrics``), so no /metrics shows another process's empty families.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import TYPE_CHECKING

from prometheus_client import start_http_server

if TYPE_CHECKING:
    from pdserve.serving.worker_metrics import WorkerCollector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class NonEmptyFamilies:
    """Exports ``metrics`` (made with ``registry=None``) but leaves out a family with no series yet (a labelled
    metric before its first ``labels()``), so /metrics never shows HELP/TYPE lines alone (a prefill worker before
    its first transfer, a gateway before its first request). Register it once: ``REGISTRY.register(...)``."""

    def __init__(self, metrics) -> None:
        self.metrics = tuple(metrics)

    def describe(self):
        return [fam for m in self.metrics for fam in m.describe()]

    def collect(self):
        for m in self.metrics:
            for fam in m.collect():
                if fam.samples:
                    yield fam

_RID = re.compile(r"^\[([^\]]+)\]")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``request_id`` from ``extra=`` or a leading ``[rid]`` in the message."""

    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        out = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "role": self.role,
            "logger": record.name,
            "msg": msg,
        }
        rid = getattr(record, "request_id", None)
        if rid is None:
            m = _RID.match(msg)
            rid = m.group(1) if m else None
        if rid:
            out["request_id"] = rid
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(role: str, level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(role))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("transformers", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def serve_metrics(port: int, host: str = "127.0.0.1", collector: WorkerCollector | None = None) -> int:
    """Expose /metrics on ``host:port``; 0 is off, -1 picks a free port. Returns the bound port (0: off).

    ``collector`` (a worker's load) is registered only when metrics are served.
    """
    if port == 0:
        return 0
    server, _ = start_http_server(max(port, 0), addr=host)
    if collector is not None:
        collector.register()
    return server.server_port
