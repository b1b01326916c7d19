"""What one provider call means: for the provider's shared health (``recorded_call``) and for each email it carried
(``after_attempt``), per the email's class (``libs.common.message_classes``); what becomes of an email no
provider can take now (``unroutable``, ``unavailable_delay_s``); and when a bulk email waits in the queue for a
cheap provider's rate budget instead of paying a dear one (``waits_for_cheaper``, ``paced_delay_s``).

The sender's delivery (``services.sender.delivery``) and the routing lab's simulation (``libs.routing_sim``) both
decide with these functions, so what the lab measures is what the sender does.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass

from libs.common.message_classes import AmbiguousPolicy, MessageClass, RetryPolicy, RoutingWeights
from libs.providers.model import Outcome, SendResult
from libs.routing.catalog import ProviderSpec
from libs.routing.health import CallHealth, ProviderHealth, RecordedCall
from libs.routing.readiness import NOT_READY
from libs.routing.scoring import RATE_BUDGET_SPENT, RouteDecision
from services.sender.retries import backoff_s, throttle_delay_s

__all__ = [
    "MIN_RETRY_S",
    "AttemptVerdict",
    "Next",
    "Unroutable",
    "after_attempt",
    "paced_delay_s",
    "rate_limited_cheapest",
    "recorded_call",
    "sent",
    "unavailable_delay_s",
    "unroutable",
    "waits_for_cheaper",
]

MIN_RETRY_S = 0.2
"""Shortest wait for a provider to become available: waiting is never a busy loop."""


def recorded_call(provider_id: str, results: Sequence[SendResult], *, emails: int, probe: bool,
                  reached_provider: bool = True, withheld: int = 0) -> RecordedCall:
    """What the health board is told about one call carrying ``emails`` emails (``withheld`` more were taken out
    after their permit was granted): its health verdict, the latency of a successful single-email call, and the
    quota to give back for emails the provider certainly did not take."""
    outcomes = [r.outcome for r in results]
    rejected = sum(1 for r in results if r.outcome is Outcome.PERMANENT and not r.provider_fault)
    if not reached_provider:
        return RecordedCall(provider_id, CallHealth.NOT_SENT, probe=probe, refund_emails=emails + withheld)
    if outcomes and all(o is Outcome.THROTTLED for o in outcomes):
        retry_after = max((r.retry_after_s or 0.0 for r in results), default=0.0) or 1.0
        return RecordedCall(provider_id, CallHealth.THROTTLED, probe=probe, retry_after_s=retry_after,
                            refund_emails=emails + withheld)
    if Outcome.ACCEPTED in outcomes or rejected:
        single = results[0] if len(results) == 1 and outcomes[0] is Outcome.ACCEPTED else None
        latency = single.elapsed_s * 1000 if single and single.elapsed_s is not None else None
        return RecordedCall(provider_id, CallHealth.SUCCESS, latency, probe, refund_emails=rejected + withheld)
    if all(r.outcome is Outcome.RETRYABLE and r.status_code is None for r in results):
        # No answer at all (connection refused, or dropped before the request was written): the adapters classify
        # that as retryable only when nothing can have been accepted, so the quota was not spent.
        return RecordedCall(provider_id, CallHealth.FAILURE, probe=probe, refund_emails=emails + withheld)
    return RecordedCall(provider_id, CallHealth.FAILURE, probe=probe, refund_emails=withheld)


def sent(policy: RetryPolicy, result: SendResult) -> bool:
    """Whether the email counts as sent: accepted, or ambiguous and its class does not resend blindly."""
    return result.outcome is Outcome.ACCEPTED or (
        result.outcome is Outcome.AMBIGUOUS and policy.ambiguous is AmbiguousPolicy.ASSUME_SENT)


class Next(enum.StrEnum):
    """What becomes of an email after one attempt."""

    SENT = "sent"
    REJECTED = "rejected"
    """The provider refused the email itself: it fails, no retry."""
    OTHER_PROVIDER_NOW = "other_provider_now"
    """Try the next provider within the same delivery."""
    LATER = "later"
    """Wait ``delay_s`` for the next delivery."""
    GIVE_UP = "give_up"
    """Failure budget spent: fail and dead-letter."""


@dataclass(frozen=True)
class AttemptVerdict:
    """The decision after one attempt, and what it changes in the email's memory."""

    next: Next
    failure: bool = False
    """The attempt counts against the email's failure budget and the provider is excluded from its next tries."""
    delay_s: float = 0.0
    """For ``LATER``: the backoff."""
    wait_hint_s: float = 0.0
    """For a throttled attempt: the soonest the provider may take the email again (0: no hint)."""


def after_attempt(policy: RetryPolicy, result: SendResult, *, failures: int, calls: int, probe: bool,
                  reached_provider: bool = True, rng: random.Random | None = None) -> AttemptVerdict:
    """Decide after an attempt, given the email's failures before it and the calls made for it in this delivery
    (this one included): see ``services.sender.retries`` for the policy in words."""
    if sent(policy, result):
        return AttemptVerdict(Next.SENT)
    if result.outcome is Outcome.PERMANENT and not result.provider_fault:
        return AttemptVerdict(Next.REJECTED)
    if result.outcome is Outcome.THROTTLED:
        # Not the email's fault and not a failure: the provider is paused for everyone; try elsewhere now.
        return AttemptVerdict(Next.OTHER_PROVIDER_NOW,
                              wait_hint_s=throttle_delay_s(policy, result.retry_after_s or 1.0, rng))
    if not reached_provider and result.outcome is Outcome.PERMANENT:
        return AttemptVerdict(Next.OTHER_PROVIDER_NOW)  # never left: another provider at once, no failure counted
    failures += 1
    if failures >= policy.max_failures:
        return AttemptVerdict(Next.GIVE_UP, failure=True)
    # otp falls over at once; so does the email a failed half-open probe was risked on.
    if (policy.failover_now and calls < policy.max_attempts_per_delivery) or probe:
        return AttemptVerdict(Next.OTHER_PROVIDER_NOW, failure=True)
    return AttemptVerdict(Next.LATER, failure=True, delay_s=backoff_s(policy, failures, rng))


class Unroutable(enum.StrEnum):
    """Why no provider is ranked for an email, and so what happens to it."""

    NO_CARRIER = "no_carrier"
    """No enabled provider carries its class, or none is ready for its ``From`` domain: wait the class's longest
    delay (a provider may be added, or verify the domain)."""
    TOO_LARGE = "too_large"
    """Every provider that could carry it is too small for it: it fails."""
    ALL_FAILED = "all_failed"
    """Every usable provider failed it once: start over with all of them after a backoff."""
    UNAVAILABLE = "unavailable"
    """Providers exist but refuse for now (breaker, Retry-After, quota, rate): wait for the soonest to free up."""


def unroutable(decision: RouteDecision, excluded: Set[str]) -> Unroutable:
    """Why ``decision`` ranked no provider, given the providers that failed the email already."""
    relevant = [s for s in decision.excluded
                if s.excluded_reason != "disabled" and not s.excluded_reason.startswith(("does not carry", NOT_READY))]
    if not relevant:
        return Unroutable.NO_CARRIER
    if all("exceeds cap" in s.excluded_reason for s in relevant):
        return Unroutable.TOO_LARGE
    if any(s.provider_id in excluded for s in relevant):
        return Unroutable.ALL_FAILED
    return Unroutable.UNAVAILABLE


def unavailable_delay_s(policy: RetryPolicy, message_class: MessageClass, providers: Iterable[ProviderSpec],
                        health: Mapping[str, ProviderHealth], hint_s: float | None) -> float:
    """How long an email every provider refused for now waits: until the soonest provider frees up (breaker
    cool-down, Retry-After, rate schedule) or the refusal's own hint, at least ``MIN_RETRY_S``; quota that runs out
    today is the one wait with no hint, and then the class's longest wait."""
    max_rate_wait = message_class.policy.routing.max_rate_wait_s
    waits = [hint_s or 0.0]
    for spec in providers:
        if spec.disabled or not spec.carries(message_class):
            continue
        h = health.get(spec.id, ProviderHealth())
        rate_wait = h.rate_backlog_s - max_rate_wait if spec.rate_limit_per_second > 0 else 0.0
        waits.extend((h.open_for_s, h.throttled_for_s, rate_wait))
    soonest = min((w for w in waits if w > 0), default=policy.max_delay_s)
    return min(policy.max_delay_s, max(MIN_RETRY_S, soonest))


def waits_for_cheaper(weights: RoutingWeights, rate_refused_cost: float | None, next_cost: float) -> bool:
    """Whether an email that a provider costing ``rate_refused_cost`` just refused for its rate budget should wait
    for it rather than go to the next provider in its chain, costing ``next_cost``: for a class that paces
    (``RoutingWeights.pace_cost_ratio``; bulk), when the next one costs more than that many times as much. A
    campaign burst faster than the cheap providers' rates then drains through them over minutes (the queue holds
    the rest) instead of spilling onto a provider several times dearer; quota, breaker and Retry-After refusals never
    make an email wait, as waiting would not free them soon."""
    if not weights.pace_cost_ratio or rate_refused_cost is None:
        return False
    return next_cost > weights.pace_cost_ratio * rate_refused_cost


def rate_limited_cheapest(decision: RouteDecision) -> tuple[str, float] | None:
    """The cheapest provider ``decision`` left out only because its rate schedule is booked beyond the class's wait,
    with what the email would cost there (None: no such provider); ``waits_for_cheaper`` compares the chain with it."""
    spent = [s for s in decision.excluded if s.excluded_reason.startswith(RATE_BUDGET_SPENT)]
    if not spent:
        return None
    cheapest = min(spent, key=lambda s: (s.expected_cost_micros, s.provider_id))
    return cheapest.provider_id, cheapest.expected_cost_micros


def paced_delay_s(policy: RetryPolicy, deliveries: int, rng: random.Random | None = None) -> float:
    """How long an email waiting for a cheaper provider's rate budget stays in the queue before it looks again: full
    jitter under an exponential ceiling by its deliveries so far (``backoff_s``), so the emails of a burst come back
    spread out and keep the provider's schedule full, rather than all at once or all the time."""
    return max(MIN_RETRY_S, backoff_s(policy, deliveries, rng))
