"""Router settings, read once from ESP_* variables."""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.settings import CommonSettings, check_positive
from libs.routing.health import BreakerSettings


@dataclass(frozen=True)
class RouterSettings(CommonSettings, BreakerSettings):
    """The router's settings (``ESP_*`` variables), with the breaker settings every sender shares."""

    health_refresh_s: float = 0.2
    """How often provider health is re-read from Redis."""
    registry_resync_s: float = 1.0
    """How often the KV broadcast is checked against Postgres (repairs a lost broadcast)."""

    def __post_init__(self) -> None:
        check_positive(self, "health_refresh_s", "registry_resync_s")
        self.breaker_policy()
