"""The providers of a scenario as the sender meets them: their catalog entries over the day, and what each call
to one of them returns and how long it takes, the same for the same seed.

A call fails with the provider's error rate (a 5xx: retryable, the provider's fault), fails at once during an
outage (connection refused), takes ``latency_factor`` times as long and fails with the brown-out's error rate
during a brown-out, and is answered 429 with Retry-After beyond the throttle's calls per second during a
throttle. Quota cuts and price changes are catalog changes, as the platform team would make them in the registry.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping

from libs.providers.model import Outcome, SendResult
from libs.routing.catalog import ProviderSpec
from libs.routing_sim.scenario import MarketEvent, Scenario, SimProvider

__all__ = ["CONNECTION_REFUSED_S", "Market", "catalog_entry"]

CONNECTION_REFUSED_S = 0.005
"""How long a call to a provider in an outage takes to fail."""


def catalog_entry(provider: SimProvider, changes: tuple[MarketEvent, ...] = ()) -> ProviderSpec:
    """The registry entry of a provider, with the quota cuts and price changes of ``changes`` applied in order."""
    daily_quota = provider.daily_quota
    per_email, per_mb = provider.price_per_email_micros, provider.price_per_mb_micros
    for change in changes:
        if change.kind == "quota_cut":
            daily_quota = change.daily_quota
        elif change.kind == "price_change":
            per_email, per_mb = change.price_per_email_micros, change.price_per_mb_micros
    return ProviderSpec(
        id=provider.id, type=provider.type, endpoint=f"sim://{provider.id}", region=provider.region,
        display_name=provider.id, price_per_email_micros=per_email, price_per_mb_micros=per_mb,
        max_message_bytes=provider.max_message_bytes, rate_limit_per_second=provider.rate_limit_per_second,
        daily_quota=daily_quota, monthly_quota=provider.monthly_quota, allowed_classes=provider.classes)


class Market:
    """The scenario's providers answering calls."""

    def __init__(self, scenario: Scenario, seed: int) -> None:
        self.scenario = scenario
        self._rng = random.Random(seed)
        self._providers: Mapping[str, SimProvider] = {p.id: p for p in scenario.providers}
        self._events: Mapping[str, tuple[MarketEvent, ...]] = {
            p.id: tuple(e for e in scenario.events if e.provider == p.id) for p in scenario.providers}
        self._second: dict[str, tuple[int, int]] = {}

    def catalog_changes(self) -> list[tuple[float, ProviderSpec]]:
        """When the registry changes during the day, and each provider's entry from then on."""
        changes = []
        for provider in self.scenario.providers:
            applied: list[MarketEvent] = []
            for event in sorted(self._events[provider.id], key=lambda e: e.start_s):
                if event.kind in ("quota_cut", "price_change"):
                    applied.append(event)
                    changes.append((event.start_s, catalog_entry(provider, tuple(applied))))
        return sorted(changes, key=lambda c: c[0])

    def call(self, provider_id: str, at_s: float) -> SendResult:
        """What one call made at ``at_s`` returns; ``elapsed_s`` is how long it took."""
        provider = self._providers[provider_id]
        error_rate, latency_factor = provider.error_rate, 1.0
        for event in self._events[provider_id]:
            if not event.active(at_s):
                continue
            if event.kind == "outage":
                return SendResult(Outcome.RETRYABLE, reason="connection refused", provider_fault=True,
                                  elapsed_s=CONNECTION_REFUSED_S)
            if event.kind == "brownout":
                error_rate = max(error_rate, event.error_rate)
                latency_factor *= event.latency_factor
            if event.kind == "throttle" and self._over_rate(provider_id, at_s, event.rate_per_second):
                return SendResult(Outcome.THROTTLED, retry_after_s=event.retry_after_s or None,
                                  reason="429 too many requests", status_code=429, elapsed_s=0.02)
        latency = self._rng.lognormvariate(math.log(provider.latency.median_ms / 1000), provider.latency.sigma)
        elapsed = latency * latency_factor
        if self._rng.random() < error_rate:
            return SendResult(Outcome.RETRYABLE, reason="503 service unavailable", status_code=503,
                              provider_fault=True, elapsed_s=elapsed)
        return SendResult(Outcome.ACCEPTED, provider_message_id=f"{provider_id}-{self._rng.getrandbits(48):x}",
                          status_code=200, elapsed_s=elapsed)

    def _over_rate(self, provider_id: str, at_s: float, per_second: float) -> bool:
        """Count the call in its second; True when the second already had ``per_second`` calls."""
        second = int(at_s)
        seen, count = self._second.get(provider_id, (second, 0))
        if seen != second:
            count = 0
        self._second[provider_id] = (second, count + 1)
        return count + 1 > per_second
