"""The reports service's settings (``ESP_*`` environment variables, read once at start)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from libs.common.settings import CommonSettings, check_positive
from libs.common.unsubscribe import UnsubscribeTokens
from services.reports.retention import RetentionPolicy

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
    consumer_batches_in_flight: int = 2
    """Batches the consumer records at once (each its own transaction), so Python and Postgres work side by side."""
    consumer_max_ack_pending: int = 5000
    """Unacked EVENTS messages the reports consumer may hold (must exceed the batch size)."""
    consumer_ack_wait_s: float = 30.0
    """Redelivery delay of a batch that was fetched but not acked."""
    parked_sweep_interval_s: float = 5.0
    """How often webhook events that arrived before their message was known are matched again (those parked while
    their SENT event was being recorded wait for this sweep: a delivery report late by up to twice this)."""
    niceness: int = 10
    """Reports is background work (timelines, analytics): on a machine shared with the send path it yields the
    CPU, so an OTP is not kept waiting while a campaign's events are recorded. 0 to run at normal priority."""
    migrate_on_start: bool = True
    """Apply the reports schema migrations at start (serialised by an advisory lock across replicas)."""
    resync_suppressions_on_start: bool = True
    """Rebuild the Redis suppression sets from Postgres at start."""
    event_retention_days: int = 30
    """How long the event timeline is kept (whole days are dropped: ``reports.events`` is partitioned by day). The
    events API, exports and replays reach this far back."""
    minute_rollup_retention_days: int = 3
    """How long per-minute figures are kept (minute buckets are refused for older ranges)."""
    hour_rollup_retention_days: int = 400
    day_rollup_retention_days: int = 1100
    """Hourly and daily figures: stats over longer ranges read the daily rows."""
    partition_interval_s: float = 3600.0
    """How often day partitions are made ahead and expired ones dropped."""
    unsubscribe_keys: tuple[str, ...] = field(default=(), repr=False)
    """Keys of one-click unsubscribe tokens, ``<id>:<base64url 64-byte key>`` separated by commas
    (``libs.common.unsubscribe.new_key_entry`` makes one): every one verifies, the first signs. Rotate by putting
    the new key first and keeping the old ones while mail signed with them may still be clicked. A secret: never
    in a ConfigMap or a log. Empty: ``/u/{token}`` answers 404 to everything (a warning at start says so)."""

    def __post_init__(self) -> None:
        check_positive(self, "consumer_batch_size", "consumer_batches_in_flight", "consumer_max_ack_pending",
                       "consumer_ack_wait_s", "parked_sweep_interval_s", "event_retention_days",
                       "minute_rollup_retention_days", "hour_rollup_retention_days", "day_rollup_retention_days",
                       "partition_interval_s")
        if self.consumer_max_ack_pending < self.consumer_batch_size * self.consumer_batches_in_flight:
            raise ValueError("ESP_CONSUMER_MAX_ACK_PENDING must be >= ESP_CONSUMER_BATCH_SIZE x "
                             "ESP_CONSUMER_BATCHES_IN_FLIGHT")
        self.unsubscribe_tokens()  # fail at start on a malformed key, not at the first click

    def retention(self) -> RetentionPolicy:
        """How long each kind of row is kept."""
        return RetentionPolicy(events=timedelta(days=self.event_retention_days),
                               minute_rollups=timedelta(days=self.minute_rollup_retention_days),
                               hour_rollups=timedelta(days=self.hour_rollup_retention_days),
                               day_rollups=timedelta(days=self.day_rollup_retention_days))

    def unsubscribe_tokens(self) -> UnsubscribeTokens | None:
        """The signer/verifier of unsubscribe tokens, or None when no key is configured."""
        if not self.unsubscribe_keys:
            return None
        try:
            return UnsubscribeTokens.from_entries(self.unsubscribe_keys)
        except ValueError as exc:
            raise ValueError(f"ESP_UNSUBSCRIBE_KEYS: {exc}") from None
