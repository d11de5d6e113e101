"""Prometheus metrics and structured logs shared by every pdserve process.

Metric names follow Prometheus conventions: ``pdserve_`` prefix, base units (seconds, bytes), ``_total``
for counters. Workers export their load through a collector that reads the servicer's WorkerLoad at
scrape time; the router and KV transfer record events as they happen.
"""

from __future__ import annotations

import json
import logging
import re
import sys

from prometheus_client import Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
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


class WorkerCollector:
    """Exports a worker's WorkerLoad (read at scrape time) as pdserve_worker_* metrics."""

    def __init__(self, role: str, load_fn, in_flight_fn):
        self.role = role
        self.load_fn = load_fn
        self.in_flight_fn = in_flight_fn
        self.registered = False

    def register(self) -> None:
        REGISTRY.register(self)
        self.registered = True

    def unregister(self) -> None:
        if self.registered:
            REGISTRY.unregister(self)
            self.registered = False

    def collect(self):
        load = self.load_fn()
        labels = ["role", "worker"]
        values = [self.role, load.worker_id]

        def gauge(name, doc, v):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, v)
            return g

        def counter(name, doc, v):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, v)
            return c

        yield gauge("pdserve_worker_running_requests", "Sequences in the running batch", load.num_running)
        yield gauge("pdserve_worker_waiting_requests", "Sequences waiting to be scheduled (queue depth)", load.num_waiting)
        yield gauge("pdserve_worker_queued_tokens", "Prompt tokens not yet computed", load.num_queued_tokens)
        blocks = GaugeMetricFamily("pdserve_worker_kv_blocks", "KV cache blocks by state", labels=[*labels, "state"])
        blocks.add_metric([*values, "free"], load.num_free_blocks)
        blocks.add_metric([*values, "used"], load.num_total_blocks - load.num_free_blocks)
        yield blocks
        usage = 1 - load.num_free_blocks / load.num_total_blocks if load.num_total_blocks else 0.0
        yield gauge("pdserve_worker_kv_usage_ratio", "Share of KV blocks in use", usage)
        yield gauge("pdserve_worker_reserved_requests", "Reservations waiting for their KV", load.num_reserved)
        yield counter("pdserve_worker_prefix_hit_tokens", "Prompt tokens served from the prefix cache",
                      load.prefix_hit_tokens)
        yield counter("pdserve_worker_prompt_tokens", "Prompt tokens of finished requests", load.prompt_tokens)
        yield counter("pdserve_worker_steps", "Engine steps run", load.num_steps)
        yield counter("pdserve_worker_aborted_requests", "Requests aborted (cancel, deadline, failure)",
                      load.num_aborted)
        yield gauge("pdserve_worker_last_step_seconds", "Duration of the last engine step", load.step_s)
        yield gauge("pdserve_worker_draining", "1 while draining (no new requests)", 1.0 if load.draining else 0.0)
        in_flight = self.in_flight_fn()
        yield gauge("pdserve_worker_in_flight_requests", "Requests in flight on this worker", in_flight)
        yield gauge("pdserve_worker_drain_ready", "1 when draining and nothing is in flight (safe to stop)",
                    1.0 if load.draining and in_flight == 0 else 0.0)


STEP_SECONDS = Histogram("pdserve_worker_step_seconds", "Engine step duration", ["role"], buckets=LATENCY_BUCKETS)

TRANSFER_BYTES = Counter("pdserve_kv_transfer_bytes_total", "KV bytes moved", ["peer", "path"])
TRANSFER_SECONDS = Histogram("pdserve_kv_transfer_seconds", "KV transfer wall time (first push to ack)", ["peer"],
                             buckets=LATENCY_BUCKETS)
TRANSFER_FAILURES = Counter("pdserve_kv_transfer_failures_total", "KV transfers that failed", ["peer"])
TRANSFER_BANDWIDTH = Gauge("pdserve_kv_transfer_bandwidth_bytes_per_second", "Bandwidth of the last transfer",
                           ["peer"])


def record_transfer(peer: str, path: str, num_bytes: int, seconds: float) -> None:
    TRANSFER_BYTES.labels(peer, path or "unknown").inc(num_bytes)
    TRANSFER_SECONDS.labels(peer).observe(seconds)
    if seconds > 0:
        TRANSFER_BANDWIDTH.labels(peer).set(num_bytes / seconds)


def record_transfer_failure(peer: str) -> None:
    TRANSFER_FAILURES.labels(peer).inc()
