"""Prometheus metrics shared by every service (prefix ``esp_``, base units, never tenant or message ids)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

__all__ = [
    "GRPC_DURATION",
    "GRPC_REQUESTS",
    "JETSTREAM_HANDLED",
    "JETSTREAM_PUBLISHED",
    "start_metrics_server",
]

GRPC_REQUESTS = Counter("esp_grpc_requests_total", "gRPC requests served", ["service", "method", "code"])
GRPC_DURATION = Histogram(
    "esp_grpc_request_duration_seconds",
    "gRPC request latency",
    ["service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
JETSTREAM_PUBLISHED = Counter("esp_jetstream_published_total", "Messages published to JetStream", ["subject"])
JETSTREAM_HANDLED = Counter(
    "esp_jetstream_handled_total", "JetStream messages handled by a consumer", ["consumer", "result"]
)


def start_metrics_server(port: int) -> None:
    """Serve /metrics on ``port`` (0 disables it)."""
    if port:
        start_http_server(port, addr="0.0.0.0")
