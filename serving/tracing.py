"""OpenTelemetry traces, optional: ``pip install pdserve[otel]`` and ``--otlp-endpoint`` on any process.

Without the flag (or the packages) every function here is a no-op and nothing imports opentelemetry. W3C
``traceparent`` travels router -> decode -> prefill in gRPC metadata, and prefill -> decode in the KV
transfer's BEGIN frame (an optional JSON field: older receivers ignore it, so the wire version stays 3). Spans:

- router: ``generate`` (the request), ``route_decision``, ``attempt`` (one per decode leg), ``first_token``
  (request start -> first token relayed), ``retry`` / ``migration`` (the backoff before the next attempt);
- decode: ``decode``, ``kv_transfer_wait`` (reservation -> all layers landed), ``decode_queue`` (added to the
  engine -> first token), event ``first_token``; ``kv_receive`` (the receiving end of the KV transfer, with
  bytes, path and resends) under the prefill span: its traceparent travels in the KV BEGIN frame;
- prefill: ``prefill``, ``prefill_queue``, ``prefill_compute``, ``kv_transfer`` (attributes bytes, path, peer).

No OpenTelemetry context is ever attached (async generators would detach it on another task): parents are
explicit, and the span a handler works under sits in ``CURRENT``, a ContextVar private to the RPC's task.
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from typing import Any

logger = logging.getLogger(__name__)
TRACEPARENT = "traceparent"


class _NoSpan:
    """What every call returns when tracing is off."""

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def add_event(self, name: str, attributes: dict | None = None) -> None:
        pass

    def end(self, end_time: int | None = None) -> None:
        pass


NO_SPAN = _NoSpan()
CURRENT: ContextVar[Any] = ContextVar("pdserve_span", default=NO_SPAN)


class _Tracing:
    tracer: Any = None  # an opentelemetry Tracer once set up
    provider: Any = None


_STATE = _Tracing()


def setup(service_name: str, endpoint: str = "", exporter: Any = None) -> bool:
    """Trace this process to ``endpoint`` (OTLP/gRPC) or into ``exporter`` (tests); False: tracing stays off."""
    if not endpoint and exporter is None:
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError:
        logger.warning("--otlp-endpoint given but opentelemetry is not installed (pip install pdserve[otel])")
        return False
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    _STATE.provider, _STATE.tracer = provider, provider.get_tracer("pdserve")
    return True


def shutdown() -> None:
    if _STATE.provider is not None:
        _STATE.provider.shutdown()
    _STATE.provider = _STATE.tracer = None


def enabled() -> bool:
    return _STATE.tracer is not None


def _context(parent: Any):
    """An OpenTelemetry Context for ``parent``: a span, a traceparent string, or None (a root)."""
    if parent is None or parent is NO_SPAN or parent == "":
        return None
    if isinstance(parent, str):
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        return TraceContextTextMapPropagator().extract({TRACEPARENT: parent})
    from opentelemetry import trace

    return trace.set_span_in_context(parent)


def wall_ns(t_monotonic: float) -> int:
    """A ``time.monotonic()`` instant as epoch nanoseconds (span timestamps)."""
    return time.time_ns() - int((time.monotonic() - t_monotonic) * 1e9)


def start(name: str, parent: Any = None, attributes: dict | None = None, start_mono: float | None = None):
    """A span under ``parent`` (a span, a traceparent, or None); call ``.end()`` on it."""
    if _STATE.tracer is None:
        return NO_SPAN
    return _STATE.tracer.start_span(name, context=_context(parent), attributes=attributes,
                                    start_time=wall_ns(start_mono) if start_mono is not None else None)


def record(name: str, parent: Any, start_mono: float, end_mono: float, attributes: dict | None = None) -> None:
    """A finished span from two ``time.monotonic()`` instants."""
    if _STATE.tracer is None:
        return
    span = start(name, parent, attributes, start_mono)
    span.end(end_time=wall_ns(end_mono))


def traceparent(span: Any) -> str:
    if _STATE.tracer is None or span is NO_SPAN:
        return ""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=_context(span))
    return carrier.get(TRACEPARENT, "")


def with_traceparent(metadata, span: Any = None):
    """``metadata`` (a list of pairs or None) plus the traceparent of ``span`` (default: ``CURRENT``)."""
    tp = traceparent(CURRENT.get() if span is None else span)
    if not tp:
        return metadata
    return [*(metadata or ()), (TRACEPARENT, tp)]


def from_context(context) -> str:
    """The caller's traceparent from a servicer context ("" when none or tracing is off)."""
    if _STATE.tracer is None:
        return ""
    for key, value in context.invocation_metadata() or ():
        if key == TRACEPARENT:
            return value
    return ""
