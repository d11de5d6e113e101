"""The gateway's Prometheus metrics (served on its own HTTP port at ``/metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from pdserve.serving.observability import LATENCY_BUCKETS

REQUESTS = Counter("pdserve_gateway_requests_total", "HTTP requests answered, by endpoint and HTTP status",
                   ["endpoint", "status"])
LATENCY = Histogram("pdserve_gateway_request_duration_seconds", "HTTP request received -> response finished",
                    ["endpoint"], buckets=LATENCY_BUCKETS)
FIRST_CHUNK = Histogram("pdserve_gateway_first_chunk_seconds", "Streamed request received -> first event sent",
                        ["endpoint"], buckets=LATENCY_BUCKETS)
IN_FLIGHT = Gauge("pdserve_gateway_in_flight", "HTTP requests being served")
DISCONNECTS = Counter("pdserve_gateway_client_disconnects_total",
                      "Clients that went away before their answer ended (their gRPC calls were cancelled)")
