"""Router settings, read once from ESP_* variables."""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.settings import CommonSettings, check_positive
from libs.routing.health import BreakerSettings
from libs.routing.pacing import PacingSettings


@dataclass(frozen=True)
class RouterSettings(CommonSettings, BreakerSettings, PacingSettings):
    """The router's settings (``ESP_*`` variables), with the breaker and pacing settings every sender shares."""

    health_refresh_s: float = 0.2
    """How often provider health is re-read from Redis."""
    registry_resync_s: float = 1.0
    """How often the KV broadcast is checked against Postgres (repairs a lost broadcast)."""
    dns_resolver: str = ""
    """Where sending-domain checks look records up: ``host`` or ``host:port`` of a recursive resolver (tests: an
    authoritative server on loopback); empty: the system's resolvers (``/etc/resolv.conf``)."""
    spf_include: str = "spf.esp.example"
    """The platform's SPF domain, which a tenant's SPF record is asked to include (``include:<this>``): the
    domain whose SPF record lists the providers' sending hosts."""
    domain_check_interval_s: float = 3600.0
    """How often a verified (or failed) sending domain's records are looked up again."""
    pending_domain_check_interval_s: float = 300.0
    """How often a pending domain's records are looked up, so it verifies on its own once published."""
    domain_check_poll_s: float = 5.0
    """How often a router replica looks for domains whose check is due."""
    domain_readiness_poll_s: float = 30.0
    """How often a domain pending at a provider is asked about again (``services.router.domain_readiness``)."""
    domain_readiness_recheck_s: float = 3600.0
    """How often a provider that said a domain is ready is asked again (it may stop sending for it)."""

    def __post_init__(self) -> None:
        check_positive(self, "health_refresh_s", "registry_resync_s", "domain_check_interval_s",
                       "pending_domain_check_interval_s", "domain_check_poll_s", "domain_readiness_poll_s",
                       "domain_readiness_recheck_s")
        self.breaker_policy()
        self.demand()
