"""A worker's KV transfer metrics: no family is exported before it has a series (no HELP/TYPE lines alone)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.serving import observability


def families(registry) -> dict[str, int]:
    text = generate_latest(registry).decode()
    return {f.name: len(f.samples) for f in text_string_to_metric_families(text) if not f.name.endswith("_created")}


def test_a_labelled_family_appears_with_its_first_series_and_not_before():
    c = Counter("t_bytes_total", "bytes", ["worker", "peer"], registry=None)
    h = Histogram("t_seconds", "seconds", ["worker", "peer"], registry=None)
    registry = CollectorRegistry()
    registry.register(observability.NonEmptyFamilies((c, h)))
    assert families(registry) == {}, "before any transfer: nothing, not HELP/TYPE alone"
    c.labels("prefill-1", "decode-2").inc(5)
    fams = families(registry)
    assert set(fams) == {"t_bytes"} and fams["t_bytes"] > 0
    h.labels("prefill-1", "decode-2").observe(0.1)
    assert set(families(registry)) == {"t_bytes", "t_seconds"}
    other = CollectorRegistry()
    other.register(observability.NonEmptyFamilies((c,)))
    try:
        other.register(Counter("t_bytes_total", "again", registry=None))
    except ValueError as e:
        assert "t_bytes" in str(e), "names stay reserved, as when the metrics were registered themselves"
    else:
        raise AssertionError("a duplicate name was accepted")


def test_a_prefill_worker_before_its_first_transfer_exports_no_empty_kv_family():
    from prometheus_client import REGISTRY

    from pdserve.serving.worker_metrics import register_transfer_metrics

    register_transfer_metrics()
    text = generate_latest(REGISTRY).decode()
    for fam in text_string_to_metric_families(text):
        if fam.name.startswith("pdserve_kv_transfer"):
            assert fam.samples, f"empty family {fam.name} (HELP/TYPE only)"


def test_a_gateway_before_its_first_request_exports_no_empty_family():
    from prometheus_client import REGISTRY

    from pdserve.router.gateway import metrics

    text = generate_latest(REGISTRY).decode()
    for fam in text_string_to_metric_families(text):
        if fam.name.startswith("pdserve_gateway"):
            assert fam.samples, f"empty family {fam.name} (HELP/TYPE only)"
    metrics.REQUESTS.labels("/v1/models", "200").inc()
    assert "pdserve_gateway_requests_total{" in generate_latest(REGISTRY).decode()
