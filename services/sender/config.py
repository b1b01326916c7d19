"""Sender settings, read once from ESP_* variables."""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.settings import CommonSettings, check_positive


@dataclass(frozen=True)
class SenderSettings(CommonSettings):
    sender_classes: tuple[str, ...] = ("otp", "transactional", "bulk")
    """Classes this replica serves (one Deployment per class in production)."""
    otp_concurrency: int = 64
    transactional_concurrency: int = 128
    bulk_concurrency: int = 256
    """Emails in flight at once per class: separate pools, so a bulk backlog never takes OTP's slots."""
    ack_wait_s: float = 60.0
    """JetStream redelivers an email whose sender went silent for this long (heartbeats extend it)."""
    health_refresh_s: float = 0.2
    sent_marker_ttl_s: int = 7 * 86400

    def __post_init__(self) -> None:
        check_positive(self, "otp_concurrency", "transactional_concurrency", "bulk_concurrency", "ack_wait_s")
        bad = [c for c in self.sender_classes if c not in ("otp", "transactional", "bulk")]
        if bad:
            raise ValueError(f"ESP_SENDER_CLASSES: unknown classes {bad}")

    def concurrency(self, message_class: str) -> int:
        return int(getattr(self, f"{message_class}_concurrency"))
