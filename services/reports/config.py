"""The reports service's settings (``ESP_*`` environment variables, read once at start)."""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.settings import CommonSettings, check_positive

DEFAULT_GRPC_PORT = 50054


@dataclass(frozen=True)
class ReportsSettings(CommonSettings):
    """Settings of the reports service (on top of those every service reads)."""

    webhook_host: str = "127.0.0.1"
    """Interface of the providers' webhook HTTP server (``0.0.0.0`` in a container)."""
    webhook_port: int = 8081
    """Port of the providers' webhook HTTP server (``POST /webhooks/{provider_name}``); 0 picks a free one."""
    consumer_batch_size: int = 2000
    """Most EVENTS messages recorded per transaction. A batch takes what is pending, so this caps a backlog's
    batches (larger ones cost less CPU per event, here and in Postgres) without delaying a lone event."""
    consumer_linger_s: float = 0.0
    """After a small batch from a busy stream, how long the consumer lets the next one gather (0: never waits).
    Off by default: no benefit has been measured yet, and it would delay status updates."""
    consumer_max_ack_pending: int = 5000
    """Unacked EVENTS messages the reports consumer may hold (must exceed the batch size)."""
    consumer_ack_wait_s: float = 30.0
    """Redelivery delay of a batch that was fetched but not acked."""
    parked_sweep_interval_s: float = 30.0
    """How often webhook events that arrived before their message was known are matched again."""
    webhook_secrets_cache_s: float = 30.0
    """How long provider webhook secrets are cached (a rotated secret takes effect within this delay)."""
    niceness: int = 10
    """Reports is background work (timelines, analytics): on a machine shared with the send path it yields the
    CPU, so an OTP is not kept waiting while a campaign's events are recorded. 0 to run at normal priority."""
    migrate_on_start: bool = True
    """Apply the reports schema migrations at start (serialised by an advisory lock across replicas)."""
    resync_suppressions_on_start: bool = True
    """Rebuild the Redis suppression sets from Postgres at start."""

    def __post_init__(self) -> None:
        check_positive(self, "consumer_batch_size", "consumer_max_ack_pending", "consumer_ack_wait_s",
                       "parked_sweep_interval_s", "webhook_secrets_cache_s")
        if self.consumer_max_ack_pending < self.consumer_batch_size:
            raise ValueError("ESP_CONSUMER_MAX_ACK_PENDING must be >= ESP_CONSUMER_BATCH_SIZE")
