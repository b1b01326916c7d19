"""Webhooks settings, read once from ESP_* variables."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from libs.common.settings import CommonSettings, check_positive

__all__ = ["DEFAULT_GRPC_PORT", "WebhooksSettings"]

DEFAULT_GRPC_PORT = 50057


@dataclass(frozen=True)
class WebhooksSettings(CommonSettings):
    """The webhooks service's settings (``ESP_*`` variables, on top of :class:`CommonSettings`)."""

    webhook_allow_internal: bool = False
    """Let endpoints use plain http and private, loopback or link-local destinations. Off in production (SSRF:
    a customer URL must not reach the mesh's own network); the dev mesh turns it on for local receivers."""
    webhook_timeout_s: float = 15.0
    """Whole-attempt limit (connect, send, response head and the read of its first KiB): a receiver that never
    answers or never closes costs one slot this long."""
    webhook_retry_schedule_s: tuple[float, ...] = (0, 5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)
    """When each try is due, in seconds after the first (at once, when queued): 5 s, 5 min, 30 min, 2 h, 5 h, 10 h,
    14 h, 20 h and 24 h later, as Standard Webhooks suggests; each gap is jittered. After the last, the delivery
    fails."""
    webhook_retry_jitter: float = 0.1
    """Each delay varies by up to this fraction either way, so endpoints recovering together are not hit at once."""
    webhook_endpoint_concurrency: int = 4
    """HTTP calls in flight per endpoint: a slow endpoint holds only its own slots."""
    webhook_concurrency: int = 512
    """HTTP calls in flight in all."""
    webhook_disable_after_s: float = 5 * 86400.0
    """An endpoint failing this long with no success is disabled and the tenant notified."""
    webhook_poll_interval_s: float = 0.05
    """How often the dispatcher looks for due deliveries when it found none."""
    webhook_max_retry_after_s: float = 86400.0
    """The longest Retry-After honoured (429 / 503)."""
    webhook_consumer_batch: int = 500
    """Stream messages taken per consumer transaction."""
    webhook_log_retention_days: int = 30
    """How long attempts and finished deliveries are kept (the delivery log a tenant can read)."""

    def __post_init__(self) -> None:
        check_positive(self, "webhook_timeout_s", "webhook_endpoint_concurrency", "webhook_concurrency",
                       "webhook_disable_after_s", "webhook_poll_interval_s", "webhook_max_retry_after_s",
                       "webhook_consumer_batch", "webhook_log_retention_days")
        schedule = self.webhook_retry_schedule_s
        if not schedule or schedule[0] != 0 or any(b < a for a, b in itertools.pairwise(schedule)):
            raise ValueError("ESP_WEBHOOK_RETRY_SCHEDULE_S: offsets from the first try, from 0, never decreasing")
        if not 0 <= self.webhook_retry_jitter < 1:
            raise ValueError("ESP_WEBHOOK_RETRY_JITTER must be in [0, 1)")
