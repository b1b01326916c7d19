"""Ranking providers for one email: a fallback chain, best first, with the reasons for every score.

Eligibility first (enabled, carries the class, fits the size, breaker not open, quota left, not already failed
for this email), then a weighted score. Class weights: otp favours speed and health, bulk favours cost.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from libs.routing.catalog import ProviderSpec
from libs.routing.health import CLOSED, HALF_OPEN, OPEN, ProviderHealth


@dataclass(frozen=True)
class ClassWeights:
    """How much each factor counts for a class (they need not sum to 1)."""

    cost: float
    latency: float
    health: float


CLASS_WEIGHTS: Mapping[str, ClassWeights] = {
    "otp": ClassWeights(cost=0.05, latency=0.6, health=0.35),
    "transactional": ClassWeights(cost=0.3, latency=0.35, health=0.35),
    "bulk": ClassWeights(cost=0.65, latency=0.05, health=0.3),
}
UNKNOWN_LATENCY_MS = 250.0
"""Latency assumed for a provider never measured: neutral, so a new provider gets traffic and a measurement."""
HALF_OPEN_PENALTY = 0.2
"""A recovering provider ranks low: it gets its probe only when better providers are unavailable."""


@dataclass(frozen=True)
class EmailFacts:
    """What routing needs to know about an email."""

    message_class: str
    message_bytes: int
    recipient_count: int = 1
    excluded: frozenset[str] = frozenset()
    region: str = ""


@dataclass(frozen=True)
class ProviderScore:
    """One provider's rank and why."""

    provider_id: str
    type: str
    score: float
    expected_cost_micros: float
    latency_ms: float
    error_rate: float
    breaker: str
    remaining_daily_quota: float
    rate_limit_per_second: float
    excluded_reason: str = ""


@dataclass(frozen=True)
class RouteDecision:
    """Eligible providers in fallback order, and the ones left out."""

    ranked: tuple[ProviderScore, ...]
    excluded: tuple[ProviderScore, ...]


def _remaining(spec: ProviderSpec, health: ProviderHealth) -> float:
    left = [float("inf")]
    if spec.daily_quota:
        left.append(spec.daily_quota - health.daily_used)
    if spec.monthly_quota:
        left.append(spec.monthly_quota - health.monthly_used)
    return min(left)


def rank(providers: Iterable[ProviderSpec], health: Mapping[str, ProviderHealth], email: EmailFacts,
         size_caps: Mapping[str, int]) -> RouteDecision:
    """Rank ``providers`` for ``email``. ``size_caps`` maps provider type → the adapter's max encoded size."""
    weights = CLASS_WEIGHTS[email.message_class]
    mb = email.message_bytes / 1_000_000
    candidates: list[tuple[ProviderSpec, ProviderHealth, float, float]] = []
    excluded: list[ProviderScore] = []
    for spec in providers:
        h = health.get(spec.id, ProviderHealth())
        cost = spec.price_per_email_micros + spec.price_per_mb_micros * mb
        latency = h.latency_ms_ewma or UNKNOWN_LATENCY_MS
        remaining = _remaining(spec, h)
        cap = min(c for c in (spec.max_message_bytes, size_caps.get(spec.type, 0)) if c) if (
            spec.max_message_bytes or size_caps.get(spec.type)) else 0
        reason = ""
        if spec.disabled:
            reason = "disabled"
        elif spec.id in email.excluded:
            reason = "failed for this email already"
        elif not spec.carries(email.message_class):
            reason = f"does not carry {email.message_class}"
        elif cap and email.message_bytes > cap:
            reason = f"message of {email.message_bytes} bytes exceeds cap of {cap}"
        elif h.breaker == OPEN:
            reason = "circuit breaker open"
        elif remaining < email.recipient_count:
            reason = "quota exhausted"
        elif email.region and spec.region and spec.region != email.region:
            reason = f"region {spec.region} is not {email.region}"
        if reason:
            excluded.append(ProviderScore(spec.id, spec.type, 0.0, cost, latency, h.error_rate, h.breaker,
                                          remaining, spec.rate_limit_per_second, reason))
        else:
            candidates.append((spec, h, cost, latency))
    if not candidates:
        return RouteDecision((), tuple(excluded))
    cheapest = min(c[2] for c in candidates) or 1.0
    fastest = min(c[3] for c in candidates)
    ranked: list[ProviderScore] = []
    for spec, h, cost, latency in candidates:
        cost_score = cheapest / cost if cost > 0 else 1.0
        latency_score = fastest / latency
        health_score = 1.0 - min(1.0, h.error_rate)
        score = spec.weight * (weights.cost * cost_score + weights.latency * latency_score
                               + weights.health * health_score)
        if h.breaker == HALF_OPEN:
            score *= HALF_OPEN_PENALTY
        ranked.append(ProviderScore(spec.id, spec.type, round(score, 6), cost, latency, h.error_rate,
                                    h.breaker if h.breaker != CLOSED else CLOSED, _remaining(spec, h),
                                    spec.rate_limit_per_second))
    ranked.sort(key=lambda s: (-s.score, s.expected_cost_micros, s.provider_id))
    return RouteDecision(tuple(ranked), tuple(excluded))
