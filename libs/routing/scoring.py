"""Ranking providers for one email: a fallback chain, best first, with the reasons behind every rank.

Eligibility first — enabled, carries the class, ready for the email's ``From`` domain (``libs.routing.readiness``:
a provider that registers domains sends for a tenant's domain only once it has verified it), fits the size
(``libs.providers.capabilities.provider_size_cap``), breaker not open (nor its probe under way), no Retry-After
pause, quota left for the email, rate budget not booked beyond what the class may wait, not already failed for
this email.

Then the order: **the cheapest provider that meets the class's quality floor** (least cost with a quality floor,
the "cost subsidy" framing of Sinha et al., AISTATS 2021), and after those the ones that miss it, best score first.
A provider meets the floor when

- its latency p99 estimate (``ProviderHealth.latency_p99_ms``, a lognormal fit; a provider never measured is
  assumed fast, so it gets traffic and with it a measurement) is within the class's latency objective
  (``RoutingWeights.latency_objective_s``: otp 1 s, transactional 10 s, bulk none), so a silent brown-out (slow,
  not failing) loses the urgent classes as soon as the estimate moves;
- its health is at least the class's ``RoutingWeights.health_floor`` (otp and transactional 0.9, bulk 0.5), or
  ``QUOTA_HEALTH_FLOOR`` for a provider with a daily quota, whose failed calls spend quota later mail would have
  used: 1 - failure rate over the breaker's window, shrunk towards 0 while the window holds few calls, and judged
  once it holds ``HEALTH_FLOOR_MIN_CALLS`` (the breaker, not the rank, reacts to a run of failures);
- it is in the email's preferred region, if one is asked for (a preference, not a filter).

Among those, cheaper first: price per email + price per MB * size, divided by the manual ``weight``, and doubled
(``QUOTA_PACE_PENALTY``) for a provider that has spent more of its daily quota than the share of the day's expected
sending gone by (``ProviderHealth.day_share``, by the platform's ``libs.routing.pacing.DemandProfile``; uniform: the
share of the day gone by): a cheap quota is then paced over the day, kept for the hours when the alternative is
dear instead of burnt by noon, and still beats every provider more than twice its price. The routing lab
(``libs.routing_sim``, ``docs/ROUTING.md``) measured this order against a weighted score of cost, latency and
health, which sent otp and transactional mail to the fastest (and dearest) provider whatever the objective: the
score remains as the order among the providers that miss the floor, with each class's weights:

    score = weight * (w_cost·cost + w_latency·latency + w_health·health) * capacity * region

- cost     = cheapest eligible expected cost / this provider's;
- latency  = fastest latency / this provider's (otp compares tail estimates, the others means);
- capacity = how much of its quota and rate budget is left: 1 while plenty, fading to ½ as the daily quota
  runs out or the rate limiter's schedule fills up to the class's wait limit;
- region   = ½ for a provider outside the requested region.

A half-open provider (breaker cooled down, probe slot free) goes first for transactional and bulk, so recovery
is noticed at once — the probe risks one email, which falls over at once if it fails — and last for otp, which
probes only when nothing healthier is left.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from libs.common.message_classes import MessageClass, RoutingWeights
from libs.providers.capabilities import DEFAULT_SIZE_CAPS, provider_size_cap
from libs.routing.catalog import ProviderSpec
from libs.routing.health import HALF_OPEN, OPEN, ProviderHealth
from libs.routing.readiness import DomainReadiness, not_ready_reason

__all__ = [
    "HEALTH_FLOOR_MIN_CALLS",
    "QUOTA_HEALTH_FLOOR",
    "QUOTA_PACE_PENALTY",
    "QUOTA_PACE_SLACK",
    "RATE_BUDGET_SPENT",
    "EmailFacts",
    "ProviderScore",
    "RouteDecision",
    "rank",
]

QUOTA_LOW_SHARE = 0.1
"""Below this share of its daily quota left, a provider's capacity factor starts to fade."""
CAPACITY_FLOOR = 0.5
"""The capacity factor of a provider about to run out of quota or rate budget."""
OUT_OF_REGION = 0.5
UNLIMITED = float("inf")
ERROR_PRIOR_CALLS = 10
"""The failure rate counts as if this many successful calls were added to the window (Bayesian shrinkage)."""
QUOTA_PACE_SLACK = 0.05
"""A provider may run this share of its daily quota ahead of the day's pace before it counts as ahead ..."""
QUOTA_PACE_PENALTY = 2.0
"""... and then ranks as if it cost this many times its price: a cheap quota spent by mid-afternoon leaves the
evening to dear providers, so while ahead of pace it gives way to a provider up to this much dearer, and still
beats the dearer ones."""
RATE_BUDGET_SPENT = "rate budget spent"
"""How the exclusion reason of a provider whose rate schedule is booked beyond the class's wait begins."""
QUOTA_HEALTH_FLOOR = 0.9
"""The health floor of a provider with a daily quota, whatever the class's: its failed calls are not free, as the
quota they spend is the day's cheap capacity (the routing lab's Black Friday: a browned-out SES failing a third of
bulk's calls left its evening to a provider six times dearer)."""
HEALTH_FLOOR_MIN_CALLS = 10
"""A provider's health is held against its class's floor once the breaker's window holds this many calls: a run of
failures in a few calls is the breaker's to judge (it opens after its consecutive failures), a sustained failure
rate the floor's (a brown-out failing a third of its calls)."""
UNMEASURED_LATENCY_MS = 1.0
"""What a provider never measured is assumed to take: as fast as can be, so it gets traffic and a measurement
(optimism in the face of uncertainty; one email finds out)."""


@dataclass(frozen=True)
class EmailFacts:
    """What routing needs to know about an email."""

    message_class: str
    message_bytes: int
    recipient_count: int = 1
    excluded: frozenset[str] = frozenset()
    """Providers that already failed this email."""
    region: str = ""
    """Preferred region, if any."""
    tenant_id: str = ""
    from_domain: str = ""
    """The domain of the email's ``From`` address (lower-case): providers not ready for it are left out."""


@dataclass(frozen=True)
class ProviderScore:
    """One provider's rank and why: the inputs, the factor each became, and the result."""

    provider_id: str
    type: str
    score: float
    expected_cost_micros: float
    latency_ms: float
    """Latency the comparison used (mean, or tail for otp); 0 when never measured."""
    error_rate: float
    breaker: str
    remaining_daily_quota: float
    """Emails left today (``inf`` when unlimited)."""
    remaining_monthly_quota: float
    rate_limit_per_second: float
    rate_backlog_s: float
    """How far ahead the provider's rate schedule is booked."""
    cost_factor: float = 0.0
    latency_factor: float = 0.0
    health_factor: float = 0.0
    capacity_factor: float = 0.0
    region_factor: float = 1.0
    probe: bool = False
    """Half-open: the next email sent here is the breaker's probe."""
    excluded_reason: str = ""
    below_floor: str = ""
    """Why the provider misses the class's quality floor (empty: it meets it, and ranks by cost)."""
    latency_p99_ms: float = 0.0
    """The latency p99 estimate the floor was judged by (0 when never measured)."""
    ahead_of_quota_pace: bool = False
    """It has spent more of its daily quota than the share of the day's expected sending gone by (plus
    ``QUOTA_PACE_SLACK``): it ranks as ``QUOTA_PACE_PENALTY`` times dearer."""

    @property
    def rate_budget_per_second(self) -> float:
        """Calls the provider can still take in the next second (``inf`` when unlimited)."""
        if self.rate_limit_per_second <= 0:
            return UNLIMITED
        return max(0.0, self.rate_limit_per_second * (1.0 - self.rate_backlog_s))


@dataclass(frozen=True)
class RouteDecision:
    """Eligible providers in fallback order, and the ones left out with why."""

    ranked: tuple[ProviderScore, ...]
    excluded: tuple[ProviderScore, ...]


def remaining_quota(spec: ProviderSpec, health: ProviderHealth) -> tuple[float, float]:
    """Emails left today and this month (``inf`` when the provider has no such quota)."""
    daily = spec.daily_quota - health.daily_used if spec.daily_quota else UNLIMITED
    monthly = spec.monthly_quota - health.monthly_used if spec.monthly_quota else UNLIMITED
    return daily, monthly


def exclusion_reason(spec: ProviderSpec, health: ProviderHealth, email: EmailFacts, profile: RoutingWeights,
                     size_caps: Mapping[str, int], domains: DomainReadiness | None = None) -> str:
    """Why ``spec`` cannot take ``email`` right now; empty when it can."""
    cap = provider_size_cap(spec.type, spec.max_message_bytes, type_caps=size_caps)
    daily, monthly = remaining_quota(spec, health)
    if spec.disabled:
        return "disabled"
    if spec.id in email.excluded:
        return "failed for this email already"
    if not spec.carries(email.message_class):
        return f"does not carry {email.message_class}"
    not_ready = not_ready_reason(spec.id, spec.type, domains, email.tenant_id, email.from_domain)
    if not_ready:
        return not_ready
    if cap and email.message_bytes > cap:
        return f"message of {email.message_bytes} bytes exceeds cap of {cap}"
    if health.breaker == OPEN:
        return f"circuit breaker open (probe in {health.open_for_s:.1f}s)"
    if health.breaker == HALF_OPEN and health.probe_in_flight:
        return "circuit breaker half-open, probe in flight"
    if health.throttled_for_s > 0:
        return f"throttled by the provider for {health.throttled_for_s:.1f}s more (Retry-After)"
    if daily < 1:
        return "daily quota exhausted"
    if monthly < 1:
        return "monthly quota exhausted"
    if spec.rate_limit_per_second > 0 and health.rate_backlog_s > profile.max_rate_wait_s:
        return f"{RATE_BUDGET_SPENT} (booked {health.rate_backlog_s:.2f}s ahead)"
    return ""


def _capacity(spec: ProviderSpec, health: ProviderHealth, profile: RoutingWeights) -> float:
    factor = 1.0
    if spec.daily_quota:
        left_share = max(0.0, spec.daily_quota - health.daily_used) / spec.daily_quota
        if left_share < QUOTA_LOW_SHARE:
            factor = min(factor, CAPACITY_FLOOR + (1 - CAPACITY_FLOOR) * left_share / QUOTA_LOW_SHARE)
    if spec.rate_limit_per_second > 0 and profile.max_rate_wait_s > 0:
        booked = min(1.0, health.rate_backlog_s / profile.max_rate_wait_s)
        factor = min(factor, 1.0 - (1 - CAPACITY_FLOOR) * booked)
    return factor


def _ahead_of_quota_pace(spec: ProviderSpec, health: ProviderHealth) -> bool:
    """Whether the provider has spent its daily quota faster than the day's expected sending goes by."""
    if not spec.daily_quota:
        return False
    return health.daily_used > spec.daily_quota * min(1.0, health.day_share + QUOTA_PACE_SLACK)


def _health_floor(spec: ProviderSpec, profile: RoutingWeights) -> float:
    """The health a provider must keep for the class: the class's floor, raised to ``QUOTA_HEALTH_FLOOR`` for a
    provider with a daily quota, where a failed call is not free (its quota is not given back)."""
    return max(profile.health_floor, QUOTA_HEALTH_FLOOR) if spec.daily_quota else profile.health_floor


def _below_floor(spec: ProviderSpec, health: ProviderHealth, health_factor: float, region: float,
                 profile: RoutingWeights) -> str:
    """Why a provider misses the class's quality floor; empty when it meets it."""
    objective_ms = profile.latency_objective_s * 1000
    p99 = health.latency_p99_ms
    if objective_ms and p99 > objective_ms:
        return f"latency p99 estimate {p99:.0f} ms above the class objective of {objective_ms:.0f} ms"
    floor = _health_floor(spec, profile)
    if health.window_samples >= HEALTH_FLOOR_MIN_CALLS and health_factor < floor:
        whose = "class" if floor == profile.health_floor else "daily-quota"
        return f"health {health_factor:.2f} below the {whose} floor of {floor}"
    if region < 1:
        return "outside the preferred region"
    return ""


def rank(providers: Iterable[ProviderSpec], health: Mapping[str, ProviderHealth], email: EmailFacts,
         size_caps: Mapping[str, int] = DEFAULT_SIZE_CAPS, domains: DomainReadiness | None = None) -> RouteDecision:
    """Rank ``providers`` for ``email``. ``size_caps`` maps provider type → the type's own size cap (the
    capabilities table unless a test says otherwise); ``domains`` says which providers are ready for which tenant
    domains (None: every provider is)."""
    profile = MessageClass(email.message_class).policy.routing
    eligible: list[tuple[ProviderSpec, ProviderHealth, float, float]] = []
    excluded: list[ProviderScore] = []
    for spec in providers:
        h = health.get(spec.id, ProviderHealth())
        cost = spec.price_micros(email.message_bytes)
        latency = h.latency_tail_ms if profile.latency_by_tail else h.latency_ms_ewma
        reason = exclusion_reason(spec, h, email, profile, size_caps, domains)
        if reason:
            daily, monthly = remaining_quota(spec, h)
            excluded.append(ProviderScore(
                spec.id, spec.type, 0.0, cost, latency, h.error_rate, h.breaker, daily, monthly,
                spec.rate_limit_per_second, h.rate_backlog_s, excluded_reason=reason,
                latency_p99_ms=h.latency_p99_ms))
        else:
            eligible.append((spec, h, cost, latency))
    if not eligible:
        return RouteDecision((), tuple(excluded))
    cheapest = min(cost for _, _, cost, _ in eligible)
    fastest = min((latency or UNMEASURED_LATENCY_MS) for _, _, _, latency in eligible)
    ranked: list[ProviderScore] = []
    weights: dict[str, float] = {}
    for spec, h, cost, latency in eligible:
        cost_factor = cheapest / cost if cost > 0 else 1.0
        latency_factor = fastest / (latency or UNMEASURED_LATENCY_MS)
        health_factor = 1.0 - min(1.0, h.error_rate * h.window_samples / (h.window_samples + ERROR_PRIOR_CALLS))
        capacity = _capacity(spec, h, profile)
        region = OUT_OF_REGION if email.region and spec.region and spec.region != email.region else 1.0
        score = (spec.weight * (profile.cost * cost_factor + profile.latency * latency_factor
                                + profile.health * health_factor) * capacity * region)
        daily, monthly = remaining_quota(spec, h)
        ranked.append(ProviderScore(
            spec.id, spec.type, round(score, 6), cost, latency, h.error_rate, h.breaker, daily, monthly,
            spec.rate_limit_per_second, h.rate_backlog_s, round(cost_factor, 6), round(latency_factor, 6),
            round(health_factor, 6), round(capacity, 6), region, probe=h.breaker == HALF_OPEN,
            below_floor=_below_floor(spec, h, health_factor, region, profile), latency_p99_ms=h.latency_p99_ms,
            ahead_of_quota_pace=_ahead_of_quota_pace(spec, h)))
        weights[spec.id] = spec.weight if spec.weight > 0 else 1.0

    def order(s: ProviderScore) -> tuple[int, int, float, float, str]:
        # Probes first (transactional, bulk) or last (otp); then the providers meeting the floor, cheapest first;
        # then the others by score.
        group = 1
        if s.probe:
            group = 0 if profile.probe_first else 2
        if not s.below_floor:
            pace = QUOTA_PACE_PENALTY if s.ahead_of_quota_pace else 1.0
            return group, 0, s.expected_cost_micros * pace / weights[s.provider_id], -s.score, s.provider_id
        return group, 1, -s.score, s.expected_cost_micros, s.provider_id

    ranked.sort(key=order)
    return RouteDecision(tuple(ranked), tuple(excluded))

