"""Every upstream provider side by side, for the platform team: its figures over a range (from the rollups, all
tenants) next to its health now (breaker, quota used, from the shared health board every sender and router writes)
and its catalog entry (type, enabled, price)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from libs.routing.catalog import ProviderCatalog
from libs.routing.health import HealthBoard
from services.reports.stats import StatsFigures, StatsQuery, StatsReader

__all__ = ["ProviderComparer", "ProviderStanding"]


@dataclass(frozen=True)
class ProviderStanding:
    """One provider's figures and health."""

    provider: str
    provider_type: str
    """Empty for a provider no longer in the catalog (its figures remain)."""
    enabled: bool
    figures: StatsFigures
    breaker_state: str
    """closed, open or half_open; empty for a provider without recorded calls."""
    daily_quota_used: int
    daily_quota_limit: int
    monthly_quota_used: int
    monthly_quota_limit: int
    price_per_email_micros: int


class ProviderComparer:
    """Compares providers over a time range."""

    def __init__(self, reader: StatsReader, catalog: ProviderCatalog, health: HealthBoard,
                 *, catalog_timeout_s: float = 5.0) -> None:
        self._reader = reader
        self._catalog = catalog
        self._health = health
        self._catalog_timeout_s = catalog_timeout_s

    async def compare(self, start: datetime, end: datetime, message_class: str = "") -> list[ProviderStanding]:
        """Every provider in the catalog or with figures in [start, end), by name."""
        report = await self._reader.get(StatsQuery(tenant_id="", start=start, end=end, dimensions=("provider",),
                                                   platform_admin=True, message_class=message_class))
        figures = {row.dimensions["provider"]: row for row in report.rows if row.dimensions["provider"]}
        await self._catalog.wait_loaded(self._catalog_timeout_s)
        specs = self._catalog.providers
        names = sorted(set(figures) | set(specs))
        health = await self._health.refresh(names)
        standings: list[ProviderStanding] = []
        for name in names:
            spec = specs.get(name)
            state = health.get(name)
            standings.append(ProviderStanding(
                provider=name,
                provider_type=spec.type if spec else "",
                enabled=bool(spec and not spec.disabled),
                figures=figures.get(name) or StatsFigures({"provider": name}, {}),
                breaker_state=state.breaker if state is not None and state.samples else "",
                daily_quota_used=state.daily_used if state else 0,
                daily_quota_limit=spec.daily_quota if spec else 0,
                monthly_quota_used=state.monthly_used if state else 0,
                monthly_quota_limit=spec.monthly_quota if spec else 0,
                price_per_email_micros=spec.price_per_email_micros if spec else 0,
            ))
        return standings
