"""Provider health as Prometheus gauges: breaker state and today's quota, for the platform team's alerts.

The breakers and quota counters live in Redis (:mod:`libs.routing.health`), shared by every sender; no process
exports them by itself. The router owns the provider registry, runs few replicas and already keeps a
:class:`~libs.routing.health.HealthBoard`, so it reads every provider's state on a timer and publishes it here:
one source per fact rather than one per sender pod. Replicas report the same numbers: aggregate with ``max``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from prometheus_client import Gauge

from libs.common.stopping import pause_unless_stopped
from libs.routing.catalog import ProviderSpec
from libs.routing.health import CLOSED, HealthBoard, ProviderHealth

__all__ = [
    "BREAKER_OPEN",
    "DEFAULT_INTERVAL_S",
    "QUOTA_DAILY_LIMIT",
    "QUOTA_DAILY_USED",
    "ProviderGauges",
]

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 5.0
"""A breaker opens for seconds at a time: a slower poll would miss most openings."""

BREAKER_OPEN = Gauge(
    "esp_provider_breaker_open",
    "1 while the provider's circuit breaker is not closed (open, or half-open waiting for its probe)", ["provider"])
QUOTA_DAILY_USED = Gauge(
    "esp_provider_quota_daily_used", "Emails reserved against the provider's daily quota today (UTC)", ["provider"])
QUOTA_DAILY_LIMIT = Gauge(
    "esp_provider_quota_daily_limit", "The provider's daily quota in emails (0: none set)", ["provider"])

_GAUGES = (BREAKER_OPEN, QUOTA_DAILY_USED, QUOTA_DAILY_LIMIT)


class ProviderGauges:
    """Keeps the provider gauges equal to the catalog and the health board, forgetting removed providers."""

    def __init__(self, health: HealthBoard, providers: Callable[[], Mapping[str, ProviderSpec]]) -> None:
        self.health = health
        self.providers = providers
        self._exported: set[str] = set()

    def publish(self, specs: Mapping[str, ProviderSpec], states: Mapping[str, ProviderHealth]) -> None:
        """Set every provider's gauges from its spec and health; drop the series of providers no longer listed."""
        for provider_id, spec in specs.items():
            state = states.get(provider_id, ProviderHealth())
            BREAKER_OPEN.labels(provider_id).set(0 if state.breaker == CLOSED else 1)
            QUOTA_DAILY_USED.labels(provider_id).set(state.daily_used)
            QUOTA_DAILY_LIMIT.labels(provider_id).set(spec.daily_quota)
        for gone in self._exported - specs.keys():
            for gauge in _GAUGES:
                try:
                    gauge.remove(gone)
                except KeyError:  # never set for it
                    pass
        self._exported = set(specs)

    async def refresh(self) -> None:
        """Read every listed provider's health from Redis (one round trip) and publish it."""
        specs = dict(self.providers())
        self.publish(specs, await self.health.refresh(specs))

    async def run(self, stop: asyncio.Event, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        """:meth:`refresh` every ``interval_s`` until ``stop``; Redis trouble keeps the last values."""
        while not stop.is_set():
            try:
                await self.refresh()
            except Exception:
                log.warning("provider health export failed", exc_info=True)
            await pause_unless_stopped(stop, interval_s)
