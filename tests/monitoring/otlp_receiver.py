"""A local OTLP/gRPC trace receiver for tests: what a collector would get from every process of a mesh.

It serves the OpenTelemetry collector's ``TraceService`` (from the ``opentelemetry-proto`` package, the protocol's
own generated code) on a free loopback port and keeps every span it is sent, with the ``service.name`` of the
process that sent it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

__all__ = ["ReceivedSpan", "TraceReceiver", "running_receiver"]


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span, as the receiver got it."""

    service: str
    name: str
    kind: int
    """``opentelemetry.proto.trace.v1.Span.SpanKind``."""
    trace_id: str
    span_id: str
    parent_span_id: str
    """"" for a root span."""
    attributes: dict[str, str]


class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps what every exporter sends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []
        self.port = 0

    @property
    def endpoint(self) -> str:
        """What ``ESP_OTEL_EXPORTER_OTLP_ENDPOINT`` is set to."""
        return f"http://127.0.0.1:{self.port}"

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        received = []
        for resource_spans in request.resource_spans:
            service = next((a.value.string_value for a in resource_spans.resource.attributes
                            if a.key == "service.name"), "")
            for scope_spans in resource_spans.scope_spans:
                received += [_received(service, span) for span in scope_spans.spans]
        with self._lock:
            self._spans.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far."""
        with self._lock:
            return list(self._spans)


def _received(service: str, span: trace_pb2.Span) -> ReceivedSpan:
    attributes = {a.key: (a.value.string_value or str(a.value.int_value)) for a in span.attributes}
    return ReceivedSpan(service=service, name=span.name, kind=span.kind, trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(), parent_span_id=span.parent_span_id.hex(),
                        attributes=attributes)


@contextmanager
def running_receiver() -> Iterator[TraceReceiver]:
    """A receiver serving on a free loopback port until the block ends."""
    receiver = TraceReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    receiver.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield receiver
    finally:
        server.stop(grace=None)
