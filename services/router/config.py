"""Router settings, read once from ESP_* variables."""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.settings import CommonSettings


@dataclass(frozen=True)
class RouterSettings(CommonSettings):
    health_refresh_s: float = 0.2
    """How often provider health is re-read from Redis."""
