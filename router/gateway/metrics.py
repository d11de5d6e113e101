"""The gateway's Prometheus metrics (served on its own HTTP port at ``/metrics``)."""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from pdserve.serving.observability import LATENCY_BUCKETS, NonEmptyFamilies

REQUESTS = Counter("pdserve_gateway_requests_total", "HTTP requests answered, by endpoint and HTTP status",
                   ["endpoint", "status"], registry=None)
LATENCY = Histogram("pdserve_gateway_request_duration_seconds", "HTTP request received -> response finished",
                    ["endpoint"], buckets=LATENCY_BUCKETS, registry=None)
FIRST_CHUNK = Histogram("pdserve_gateway_first_chunk_seconds", "Streamed request received -> first event sent",
                        ["endpoint"], buckets=LATENCY_BUCKETS, registry=None)
REGISTRY.register(NonEmptyFamilies((REQUESTS, LATENCY, FIRST_CHUNK)))  # each appears with its first request
IN_FLIGHT = Gauge("pdserve_gateway_in_flight", "HTTP requests being served")
DISCONNECTS = Counter("pdserve_gateway_client_disconnects_total",
                      "Clients that went away before their answer ended (their gRPC calls were cancelled)")
