"""OpenTelemetry set-up and W3C trace-context propagation through gRPC metadata and NATS headers."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, MutableMapping

from opentelemetry import context, propagate, trace
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

__all__ = [
    "carries_trace_context",
    "configure_tracing",
    "extract_context",
    "inject_headers",
    "tracing_enabled",
]

log = logging.getLogger(__name__)


def configure_tracing(service: str, otlp_endpoint: str = "") -> None:
    """Install a recording tracer provider when spans are exported over OTLP. Without an endpoint the API's
    no-op provider stays: spans cost next to nothing, and the incoming trace context still propagates (logs and
    outgoing calls keep the caller's trace id)."""
    if not otlp_endpoint:
        return
    provider = TracerProvider(resource=Resource.create({"service.name": f"esp-{service}"}))
    if otlp_endpoint:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter,
            )
        except ImportError:
            log.warning("ESP_OTEL_EXPORTER_OTLP_ENDPOINT is set but opentelemetry-exporter-otlp is not installed")
        else:
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    trace.set_tracer_provider(provider)


def tracing_enabled() -> bool:
    """True once a real tracer provider is installed (by :func:`configure_tracing`, or by a test): only then do
    spans record anything."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def carries_trace_context(carrier: Mapping[str, str]) -> bool:
    """True when ``carrier`` holds a header the global propagator reads (``traceparent``, ``baggage`` ...)."""
    return any(name in carrier for name in _fields_read_by(propagate.get_global_textmap()))


@functools.lru_cache(maxsize=4)
def _fields_read_by(textmap: TextMapPropagator) -> frozenset[str]:
    # A composite propagator builds a new set on every ``fields`` access: once per propagator is enough.
    return frozenset(textmap.fields)


def inject_headers(carrier: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """Add ``traceparent``/``tracestate`` of the current span to ``carrier`` (NATS headers, gRPC metadata)."""
    propagate.inject(carrier)
    return carrier


def extract_context(carrier: Mapping[str, str]) -> context.Context:
    """The trace context carried by incoming headers."""
    return propagate.extract(dict(carrier))
