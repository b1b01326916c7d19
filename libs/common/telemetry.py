"""OpenTelemetry set-up and W3C trace-context propagation through gRPC metadata, NATS headers and outbox rows.

One email makes one trace: the gateway's (or the first gRPC server's) span is its root; ingest's reserve call to the
ledger and the outbox row of its SEND task carry the context on (:func:`current_traceparent`, stored with the row);
the senders, and every JetStream consumer after them, start a span per message under the context its headers carry
(:func:`message_spans`); the provider HTTP call is a client span of the httpx instrumentation.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator, Mapping, MutableMapping, Sequence

from opentelemetry import context, propagate, trace
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

__all__ = [
    "TRACE_HEADERS",
    "carries_trace_context",
    "configure_tracing",
    "current_traceparent",
    "extract_context",
    "inject_headers",
    "message_spans",
    "span_headers",
    "tracing_enabled",
]

log = logging.getLogger(__name__)

TRACE_HEADERS = ("traceparent", "tracestate")
"""The W3C trace-context headers: what a message or a call carries of its trace."""


def configure_tracing(service: str, otlp_endpoint: str = "") -> None:
    """Install a recording tracer provider exporting over OTLP/gRPC to ``otlp_endpoint`` (``http://host:4317``;
    ``https://`` for TLS), and client spans for httpx calls. Without an endpoint the API's no-op provider stays:
    spans cost next to nothing, and the incoming trace context still propagates (logs and outgoing calls keep the
    caller's trace id). The provider flushes its last spans when the process exits."""
    if not otlp_endpoint:
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    provider = TracerProvider(resource=Resource.create({"service.name": f"esp-{service}"}))
    exporter = OTLPSpanExporter(endpoint=otlp_endpoint, insecure=not otlp_endpoint.startswith("https://"))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    HTTPXClientInstrumentor().instrument(tracer_provider=provider)


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


def current_traceparent() -> str:
    """The W3C ``traceparent`` of the current span, or "" when there is none (no incoming trace, no span).

    What an outbox row stores, so the message it becomes carries the trace of the request that wrote it. Written
    directly rather than through the propagator: it runs once per accepted email, and ``tracestate`` (vendor data
    the mesh never sets) is not kept."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return ""
    return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{span_context.trace_flags:02x}"


def span_headers(span: trace.Span) -> dict[str, str]:
    """The trace-context headers naming ``span`` as the parent (for a message published on its behalf)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


@contextlib.contextmanager
def message_spans(tracer: trace.Tracer, name: str, carriers: Sequence[Mapping[str, str] | None], *,
                  kind: trace.SpanKind = trace.SpanKind.CONSUMER,
                  attributes: Mapping[str, str | int] | None = None) -> Iterator[list[trace.Span]]:
    """One span per message handled together (a batch of a JetStream consumer), each the child of the context
    its own headers carry, open for as long as the block runs; the first is made current, so what the block does
    for the batch as a whole (a database write, a publish) joins the first message's trace. Yields the spans
    ([] and nothing current when tracing is off: a consumer's batch then costs no span at all)."""
    if not tracing_enabled():
        yield []
        return
    spans = [tracer.start_span(name, context=extract_context(carrier) if carrier else None, kind=kind,
                               attributes=attributes)
             for carrier in carriers]
    try:
        current = (trace.use_span(spans[0], end_on_exit=False, record_exception=False,
                                  set_status_on_exception=False) if spans else contextlib.nullcontext())
        with current:
            yield spans
    except BaseException as exc:
        for span in spans:
            span.record_exception(exc)
            span.set_status(trace.StatusCode.ERROR, type(exc).__name__)
        raise
    finally:
        for span in spans:
            span.end()
