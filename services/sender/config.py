"""Sender settings, read once from ESP_* variables."""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.message_classes import MessageClass
from libs.common.settings import CommonSettings, check_positive
from libs.routing.health import BreakerSettings
from libs.routing.pacing import PacingSettings
from services.sender.links import DEFAULT_LINK_TTL_S, MAX_LINK_TTL_S

_CLASSES = frozenset(MessageClass)


@dataclass(frozen=True)
class SenderSettings(CommonSettings, BreakerSettings, PacingSettings):
    """The sender's settings (``ESP_*`` variables), with the breaker and pacing settings every router shares."""

    sender_classes: tuple[str, ...] = tuple(c.value for c in MessageClass)
    """Classes this replica serves (one Deployment per class in production)."""
    otp_concurrency: int = 64
    transactional_concurrency: int = 128
    bulk_concurrency: int = 1000
    """Emails in flight at once per class: separate pools, so a bulk backlog never takes OTP's slots."""
    process_per_class: bool = True
    """Serving several classes, run each in a worker process of its own so no class can take another's CPU."""
    bulk_concurrency_while_urgent: int = 100
    """Bulk emails in flight at once while urgent mail flows (``services.sender.yielding``): a draining campaign
    leaves the CPU and the shared servers room for OTPs. Equal to ``bulk_concurrency``: bulk never yields."""
    bulk_yields_to: tuple[str, ...] = ("otp",)
    """Classes whose deliveries make the bulk pool yield (empty: it never does). Transactional mail flows nearly
    all the time, so counting it would hold bulk at its lower concurrency for good."""
    urgent_window_s: float = 1.0
    """Urgent mail delivered by any replica within this long counts as flowing."""
    bulk_worker_niceness: int = 10
    """The bulk worker process runs this much nicer (lower CPU priority) than the others: on a busy machine a
    draining campaign yields the CPU to OTPs and transactional mail (a Deployment per class gets the same from
    its CPU requests)."""
    bulk_batch_max: int = 500
    """Bulk emails one delivery carries: those going to the same provider share its batch API calls."""
    ack_wait_s: float = 60.0
    """JetStream redelivers an email whose sender went silent for this long (in-progress acks extend it)."""
    health_refresh_s: float = 0.2
    redis_max_connections: int = 64
    """Redis connections shared by every pool; a delivery waits for a free one rather than fail."""
    attachment_link_ttl_s: int = DEFAULT_LINK_TTL_S
    """How long the download links of attachments sent as links stay valid (at most 7 days)."""
    sent_marker_ttl_s: int = 7 * 86400
    """How long an email's memory (sent marker, failed providers, failure count) is kept."""

    def __post_init__(self) -> None:
        check_positive(self, "otp_concurrency", "transactional_concurrency", "bulk_concurrency", "bulk_batch_max",
                       "ack_wait_s", "health_refresh_s", "sent_marker_ttl_s", "redis_max_connections",
                       "bulk_concurrency_while_urgent", "urgent_window_s")
        bad = [c for c in self.sender_classes if c not in _CLASSES]
        if bad:
            raise ValueError(f"ESP_SENDER_CLASSES: unknown classes {bad}")
        bad = [c for c in self.bulk_yields_to if c not in _CLASSES - {MessageClass.BULK}]
        if bad:
            raise ValueError(f"ESP_BULK_YIELDS_TO: only otp and transactional mail can make bulk yield, not {bad}")
        if self.bulk_concurrency_while_urgent > self.bulk_concurrency:
            raise ValueError("ESP_BULK_CONCURRENCY_WHILE_URGENT: at most ESP_BULK_CONCURRENCY")
        self.breaker_policy()
        self.demand()
        if not 1 <= self.attachment_link_ttl_s <= MAX_LINK_TTL_S:
            raise ValueError(f"ESP_ATTACHMENT_LINK_TTL_S: must be 1..{MAX_LINK_TTL_S}")

    def concurrency(self, message_class: str) -> int:
        """Emails of ``message_class`` in flight at once."""
        return int(getattr(self, f"{message_class}_concurrency"))

    def batch_max(self, message_class: str) -> int:
        """Emails of ``message_class`` one delivery may carry."""
        return self.bulk_batch_max if message_class == MessageClass.BULK else 1
