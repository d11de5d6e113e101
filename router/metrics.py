"""The router's Prometheus metrics.

Every labelled counter exists at 0 for each label value known up front (status codes, shed reasons, request
classes, routing outcomes), so a dashboard shows 0 rather than "No data"; no family is exported empty.
"""

from __future__ import annotations

import grpc
from prometheus_client import Counter, Histogram

from pdserve.router.classes import CLASSES, class_of
from pdserve.serving.observability import LATENCY_BUCKETS

REQUESTS = Counter("pdserve_router_requests_total", "Requests by final gRPC status", ["status"])
TTFT = Histogram("pdserve_router_ttft_seconds", "Time to first token", buckets=LATENCY_BUCKETS)
TPOT = Histogram("pdserve_router_tpot_seconds", "Time per output token after the first", buckets=LATENCY_BUCKETS)
E2E = Histogram("pdserve_router_e2e_seconds", "End-to-end request latency", buckets=LATENCY_BUCKETS)
ROUTING = Counter("pdserve_router_routing_decisions_total", "Routing decisions", ["policy", "outcome"])
PROMPT_TOKENS = Counter("pdserve_router_prompt_tokens_total", "Prompt tokens of finished requests")
CACHED_PROMPT_TOKENS = Counter("pdserve_router_cached_prompt_tokens_total", "Prompt tokens served from a prefix cache")
RETRIES = Counter("pdserve_router_retries_total", "Attempts retried on another worker before any token was sent")
MIGRATIONS = Counter("pdserve_router_migrations_total", "Requests migrated to another decode worker mid-stream")
SHED = Counter("pdserve_router_shed_total", "Requests refused by admission control", ["reason"])
SHED_BY_CLASS = Counter("pdserve_router_shed_by_class_total", "Requests refused by admission control, by request "
                        "class (router.classes)", ["request_class"])
CANCELLED = Counter("pdserve_router_cancelled_total", "Requests cancelled by the client or its deadline")
GENERATED_TOKENS = Counter("pdserve_router_generated_tokens_total", "Output tokens relayed to clients (output "
                           "tokens/s: rate of this)")

SHED_REASONS = ("rate_limit", "slo", "capacity")
ROUTING_OUTCOMES = ("disaggregated", "local: no prefill worker", "local: short uncached prompt",
                    "local: prefill pool saturated")


def observe_finished(ttft_s: float, total_s: float, num_out: int, num_prompt: int, num_cached: int) -> None:
    TTFT.observe(ttft_s)
    E2E.observe(total_s)
    if num_out > 1:
        TPOT.observe((total_s - ttft_s) / (num_out - 1))
    PROMPT_TOKENS.inc(num_prompt)
    CACHED_PROMPT_TOKENS.inc(num_cached)


def _child(metric, cache: dict, *labels: str):
    """``metric.labels(*labels)``, looked up once: labels() validates and locks on every call."""
    child = cache.get(labels)
    if child is None:
        child = cache[labels] = metric.labels(*labels)
    return child


_requests: dict = {}
_routing: dict = {}
_shed: dict = {}
_shed_class: dict = {}


def count_request(status: str) -> None:
    _child(REQUESTS, _requests, status).inc()


def count_routing(policy: str, outcome: str) -> None:
    _child(ROUTING, _routing, policy, outcome).inc()


def count_shed(reason: str, priority: int = 0) -> None:
    _child(SHED, _shed, reason).inc()
    _child(SHED_BY_CLASS, _shed_class, class_of(priority)).inc()


def init_routing(policy: str) -> None:
    """Routing outcomes of ``policy`` at 0 (called once the router knows its policy)."""
    for outcome in (*ROUTING_OUTCOMES, f"local: {policy}"):
        _child(ROUTING, _routing, policy, outcome)


def _init() -> None:
    for code in grpc.StatusCode:
        _child(REQUESTS, _requests, code.name)
    for reason in SHED_REASONS:
        _child(SHED, _shed, reason)
    for name in CLASSES:
        _child(SHED_BY_CLASS, _shed_class, name)


_init()
