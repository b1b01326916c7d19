"""Ingest settings, read once from ESP_* variables."""

from __future__ import annotations

from dataclasses import dataclass, field

from libs.common.settings import CommonSettings, check_positive
from services.ingest.accept import HOLD_TTL_AFTER_SEND_S
from services.ingest.validation import MAX_SEND_AHEAD_S


@dataclass(frozen=True)
class IngestSettings(CommonSettings):
    """Ingest's settings (``ESP_*`` variables, on top of :class:`CommonSettings`)."""

    admin_token: str = field(default="", repr=False)
    """Bearer token of the platform admin (tenants, providers, top-ups); empty disables admin access."""
    api_key_cache_s: float = 2.0
    """How long a checked key (and a tenant's policy) is trusted without asking Postgres: a revoked key stops
    working, and a changed rate limit applies, within this delay on every replica."""
    default_otp_rate: float = 200.0
    """Per-tenant otp sends per second when the tenant has no rate of its own."""
    default_transactional_rate: float = 500.0
    """Per-tenant transactional sends per second when the tenant has no rate of its own."""
    default_bulk_rate: float = 2000.0
    """Per-tenant bulk sends per second when the tenant has no rate of its own."""
    rate_burst_s: float = 1.0
    """How many seconds' worth of a tenant's rate may arrive at once (GCRA burst tolerance)."""
    idempotency_cache_s: int = 86_400
    """How long Redis remembers a request_id (the fast path). Postgres remembers it as long as the message row
    exists, so a retry after this still gets the first response, through the slower path."""
    upstream_timeout_s: float = 10.0
    """Deadline of calls to the ledger and of forwarded RPCs."""
    accept_batch_size: int = 500
    """Most accepted emails committed to Postgres in one transaction (group commit)."""
    accept_batch_workers: int = 2
    """Accept transactions in flight at once."""
    batch_interval_s: float = 0.002
    """Under load, each batching step (Redis pipeline, ledger call, Postgres commit) starts at most once per this
    interval per worker, so requests arriving meanwhile share its round trip; an idle step never waits."""
    max_batch_send: int = 500
    """Most emails in one BatchSendEmails call."""
    batch_passes_in_flight: int = 4
    """BatchSendEmails calls whose emails go through the accept steps at once; later calls wait their turn (see
    ``services.ingest.accept.BATCH_PASSES_IN_FLIGHT``). More takes a campaign in faster on an idle machine; fewer
    keeps OTPs accepted meanwhile fast."""
    max_send_ahead_s: float = MAX_SEND_AHEAD_S
    """How far ahead a SendEmailRequest.send_time may be (29 days). A scheduled email's credit hold lives until its
    send time plus ``hold_ttl_after_send_s``, and the ledger grants holds of at most 30 days: raise its
    ``LedgerOptions.max_hold_ttl_s`` before raising this past 29 days."""
    hold_ttl_after_send_s: float = HOLD_TTL_AFTER_SEND_S
    """How long a scheduled email's credit hold outlives its send time (a day: the ledger's default hold life)."""

    def __post_init__(self) -> None:
        check_positive(self, "api_key_cache_s", "default_otp_rate", "default_transactional_rate",
                       "default_bulk_rate", "rate_burst_s", "idempotency_cache_s", "upstream_timeout_s",
                       "accept_batch_size", "accept_batch_workers", "max_batch_send", "batch_passes_in_flight",
                       "max_send_ahead_s", "hold_ttl_after_send_s")
        if not 0 <= self.batch_interval_s <= 1:
            raise ValueError(f"ESP_BATCH_INTERVAL_S: must be 0 to 1 s, got {self.batch_interval_s}")
