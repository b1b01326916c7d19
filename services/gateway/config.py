"""Gateway settings, read once from ``ESP_*`` environment variables (see libs/common/settings.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from libs.common.grpc_client import MAX_MESSAGE_BYTES
from libs.common.settings import check_positive, env_name, load_settings
from services.gateway.transcoder import TranscoderOptions


@dataclass(frozen=True)
class GatewayConfig:
    """How the REST gateway is run. Each field ``foo`` is read from ``ESP_FOO``."""

    gateway_host: str = "127.0.0.1"
    """Interface to listen on; containers set ``0.0.0.0``."""
    gateway_port: int = 8080
    """HTTP port."""
    ingest_addr: str = "127.0.0.1:50051"
    """The single upstream: ingest is the public gRPC edge and serves or forwards every public RPC."""
    descriptor_set: str = "gen/esp.binpb"
    """FileDescriptorSet (``buf build`` output, imports and source info included) describing the API."""
    gateway_timeout_s: float = 30.0
    """Deadline of unary upstream calls when the client sends no ``Grpc-Timeout`` header."""
    gateway_stream_timeout_s: float = 900.0
    """Deadline of client-streaming calls (attachment uploads, campaign recipients)."""
    gateway_emit_unpopulated: bool = False
    """Write fields holding default values in responses and error bodies."""
    gateway_max_body_bytes: int = MAX_MESSAGE_BYTES
    """Largest unary request body accepted; a larger one is refused with 413. At most the largest gRPC message the
    upstream accepts (``MAX_MESSAGE_BYTES``, 8 MiB): a larger body would be refused by the upstream instead, as
    RESOURCE_EXHAUSTED, which a REST client reads as a 429 to retry. Streamed bodies (NDJSON frames, uploads) are
    sent on in frames and are not bound by it."""
    log_level: str = "INFO"
    log_format: str = "json"
    otel_exporter_otlp_endpoint: str = ""
    """When set, spans (one server span per request, the upstream call its child) are exported over OTLP."""

    def __post_init__(self) -> None:
        check_positive(
            self, "gateway_port", "gateway_timeout_s", "gateway_stream_timeout_s", "gateway_max_body_bytes"
        )
        if self.gateway_max_body_bytes > MAX_MESSAGE_BYTES:
            raise ValueError(
                f"{env_name('gateway_max_body_bytes')}: must be at most {MAX_MESSAGE_BYTES} (the largest message "
                f"the upstream accepts), got {self.gateway_max_body_bytes}"
            )

    @property
    def descriptor_set_path(self) -> Path:
        """``descriptor_set`` as a path."""
        return Path(self.descriptor_set)

    def transcoder_options(self) -> TranscoderOptions:
        """The transcoder's share of these settings."""
        return TranscoderOptions(
            default_timeout_s=self.gateway_timeout_s,
            stream_timeout_s=self.gateway_stream_timeout_s,
            emit_unpopulated=self.gateway_emit_unpopulated,
            max_body_bytes=self.gateway_max_body_bytes,
        )


def load_config(env: dict[str, str] | None = None) -> GatewayConfig:
    """Read the settings once; raises SettingsError listing every bad ``ESP_*`` key."""
    return load_settings(GatewayConfig, env)
