"""Ingest settings, read once from ESP_* variables."""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.settings import CommonSettings, check_positive


@dataclass(frozen=True)
class IngestSettings(CommonSettings):
    admin_token: str = ""
    """Bearer token of the platform admin (tenants, providers, top-ups); empty disables admin access."""
    api_key_cache_s: float = 2.0
    """How long a checked key is trusted without asking Postgres: a revoked key stops working within this."""
    default_otp_rate: float = 200.0
    default_transactional_rate: float = 500.0
    default_bulk_rate: float = 2000.0
    """Per-tenant sends per second when the tenant has no rate of its own."""
    upstream_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        check_positive(self, "api_key_cache_s", "default_otp_rate", "default_transactional_rate",
                       "default_bulk_rate", "upstream_timeout_s")
