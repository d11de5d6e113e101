"""A worker's Prometheus metrics: its load (read at scrape time), engine steps and KV transfers.

Imported only by worker processes, so the router's /metrics carries no empty worker families. Every series has
a ``worker`` label, the worker's stable id (e.g. ``prefill-1a2b3c``); a KV transfer's ``peer`` is the receiving
worker's id, never its ephemeral ``tcp://IP:port``. The role is on ``pdserve_worker_info`` as ``pdserve_role``
(a plain ``role`` label clashes with common scrape-time labels). Bandwidth is a ratio of counters:
``rate(pdserve_kv_transfer_bytes_total) / rate(pdserve_kv_transfer_seconds_total)``.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Histogram
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily

from pdserve.serving.observability import LATENCY_BUCKETS, NonEmptyFamilies

STEP_SECONDS = Histogram("pdserve_worker_step_seconds", "Engine step duration", ["worker"], buckets=LATENCY_BUCKETS)

TRANSFER_LABELS = ["worker", "peer", "path"]
TRANSFER_BYTES = Counter("pdserve_kv_transfer_bytes_total", "KV bytes moved", TRANSFER_LABELS, registry=None)
TRANSFER_SECONDS = Counter("pdserve_kv_transfer_seconds_total", "KV transfer wall time, first push to ack",
                           TRANSFER_LABELS, registry=None)
TRANSFERS = Counter("pdserve_kv_transfers_total", "KV transfers completed", TRANSFER_LABELS, registry=None)
TRANSFER_DURATION = Histogram("pdserve_kv_transfer_duration_seconds", "KV transfer wall time (first push to ack)",
                              ["worker", "peer"], buckets=LATENCY_BUCKETS, registry=None)
TRANSFER_FAILURES = Counter("pdserve_kv_transfer_failures_total", "KV transfers that failed", ["worker", "peer"],
                            registry=None)
TRANSFER_RESENDS = Counter("pdserve_kv_transfer_resends_total",
                           "KV transfers re-sent on a new connection after a link cut", ["worker", "peer"],
                           registry=None)
_TRANSFER_METRICS = (TRANSFER_BYTES, TRANSFER_SECONDS, TRANSFERS, TRANSFER_DURATION, TRANSFER_FAILURES, TRANSFER_RESENDS)
_registered: list[bool] = []


def register_transfer_metrics() -> None:
    """Export the KV transfer metrics (the sending role calls it once; other processes never show them)."""
    if not _registered:
        REGISTRY.register(NonEmptyFamilies(_TRANSFER_METRICS))
        _registered.append(True)


def peer_label(worker_id: str, endpoint: str) -> str:
    """The stable id of a transfer's peer; the endpoint only when the peer did not say who it is."""
    return worker_id or endpoint or "unknown"


def record_transfer(worker: str, peer: str, path: str, num_bytes: int, seconds: float) -> None:
    labels = (worker, peer, path or "unknown")
    TRANSFER_BYTES.labels(*labels).inc(num_bytes)
    TRANSFER_SECONDS.labels(*labels).inc(max(seconds, 0.0))
    TRANSFERS.labels(*labels).inc()
    TRANSFER_DURATION.labels(worker, peer).observe(seconds)
    TRANSFER_FAILURES.labels(worker, peer)  # exists at 0 for every peer seen
    TRANSFER_RESENDS.labels(worker, peer)


def record_transfer_failure(worker: str, peer: str) -> None:
    TRANSFER_FAILURES.labels(worker, peer).inc()


def record_transfer_resend(worker: str, peer: str, count: int = 1) -> None:
    """``count`` resends of one transfer (a cut link's transfer re-sent on a new connection)."""
    if count > 0:
        TRANSFER_RESENDS.labels(worker, peer).inc(count)


class WorkerCollector:
    """Exports a worker's WorkerLoad (read at scrape time) as pdserve_worker_* metrics."""

    def __init__(self, role: str, load_fn, in_flight_fn, generated_fn: Callable[[], int] | None = None):
        self.role = role
        self.load_fn = load_fn
        self.in_flight_fn = in_flight_fn
        self.generated_fn = generated_fn or (lambda: 0)
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
        labels, values = ["worker"], [load.worker_id]

        def gauge(name, doc, v):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, v)
            return g

        def counter(name, doc, v):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, v)
            return c

        info = GaugeMetricFamily("pdserve_worker_info", "Always 1: the worker's role", labels=["worker", "pdserve_role"])
        info.add_metric([load.worker_id, self.role], 1.0)
        yield info
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
        yield counter("pdserve_worker_generated_tokens", "Tokens sampled by this worker's engine",
                      self.generated_fn())
        yield counter("pdserve_worker_steps", "Engine steps run", load.num_steps)
        yield counter("pdserve_worker_aborted_requests", "Requests aborted (cancel, deadline, failure)",
                      load.num_aborted)
        yield gauge("pdserve_worker_last_step_seconds", "Duration of the last engine step", load.step_s)
        yield gauge("pdserve_worker_draining", "1 while draining (no new requests)", 1.0 if load.draining else 0.0)
        in_flight = self.in_flight_fn()
        yield gauge("pdserve_worker_in_flight_requests", "Requests in flight on this worker", in_flight)
        yield gauge("pdserve_worker_drain_ready", "1 when draining and nothing is in flight (safe to stop)",
                    1.0 if load.draining and in_flight == 0 else 0.0)
