"""The three message classes and everything that differs between them, written once.

An email is an **otp** (tiny, latency-critical: a late code is a useless code), **transactional** (receipts,
password resets) or **bulk** (campaigns: cost-critical, may wait). Every service treats the classes differently
— ingest's accept pools, the router's weights, the sender's retry and fallback — and every such difference is a
field of ``ClassPolicy`` here, so a newcomer reads one table to know how a class behaves, and adding a class
touches one file.

``MessageClass`` is the domain name (a ``StrEnum``: ``"otp"`` is ``MessageClass.OTP``); ``from_proto`` and
``proto`` convert to and from ``esp.v1.MessageClass``, the only place where that mapping is written.

How the sender applies a ``RetryPolicy`` (the backoff, the throttle wait, ambiguous attempts) is
:mod:`services.sender.retries`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from esp.v1 import common_pb2

__all__ = [
    "CLASS_POLICIES",
    "AmbiguousPolicy",
    "ClassPolicy",
    "MessageClass",
    "RetryPolicy",
    "RoutingWeights",
    "class_name_of",
    "proto_of",
]


class MessageClass(StrEnum):
    """How urgent and how price-sensitive an email is."""

    OTP = "otp"
    TRANSACTIONAL = "transactional"
    BULK = "bulk"

    @classmethod
    def from_proto(cls, value: int) -> MessageClass:
        """The class of an ``esp.v1.MessageClass`` value; ``ValueError`` for UNSPECIFIED or an unknown value."""
        try:
            return _FROM_PROTO[value]
        except KeyError:
            raise ValueError(f"not a message class: {value}") from None

    @classmethod
    def parse(cls, name: str) -> MessageClass:
        """The class named ``name`` (``otp`` / ``transactional`` / ``bulk``); ``ValueError`` naming the choices."""
        try:
            return cls(name)
        except ValueError:
            raise ValueError(f"must be one of {', '.join(cls)} (got {name!r})") from None

    @property
    def proto(self) -> common_pb2.MessageClass.ValueType:
        """The ``esp.v1.MessageClass`` value of this class."""
        return _TO_PROTO[self]

    @property
    def policy(self) -> ClassPolicy:
        """How this class is treated everywhere (``CLASS_POLICIES[self]``)."""
        return CLASS_POLICIES[self]


_TO_PROTO: Mapping[MessageClass, common_pb2.MessageClass.ValueType] = {
    MessageClass.OTP: common_pb2.MESSAGE_CLASS_OTP,
    MessageClass.TRANSACTIONAL: common_pb2.MESSAGE_CLASS_TRANSACTIONAL,
    MessageClass.BULK: common_pb2.MESSAGE_CLASS_BULK,
}
_FROM_PROTO: Mapping[int, MessageClass] = {value: cls for cls, value in _TO_PROTO.items()}


def class_name_of(value: int) -> str:
    """``otp`` / ``transactional`` / ``bulk`` for an ``esp.v1.MessageClass`` value; empty for UNSPECIFIED or an
    unknown value (read models keep what they were given rather than refuse it)."""
    found = _FROM_PROTO.get(value)
    return found.value if found is not None else ""


def proto_of(name: str) -> common_pb2.MessageClass.ValueType:
    """The ``esp.v1.MessageClass`` value of a class name; UNSPECIFIED for an empty or unknown name."""
    try:
        return _TO_PROTO[MessageClass(name)]
    except ValueError:
        return common_pb2.MESSAGE_CLASS_UNSPECIFIED


# ----------------------------------------------------------------------------------------------------
# Per-class policies
# ----------------------------------------------------------------------------------------------------


class AmbiguousPolicy(StrEnum):
    """What the sender does after an attempt that may or may not have sent the email."""

    FAIL_OVER = "fail_over"
    ASSUME_SENT = "assume_sent"


@dataclass(frozen=True)
class RetryPolicy:
    """How the sender retries one class of email (applied by :mod:`services.sender.retries`)."""

    max_failures: int
    """Failed attempts (throttling and unavailable providers do not count) before the email is failed and
    dead-lettered."""
    base_delay_s: float = 1.0
    max_delay_s: float = 300.0
    """The class's cap on one backoff, and on any wait for a provider to become available."""
    failover_now: bool = False
    """Try the next provider at once within the same delivery (otp: a late code is a useless code)."""
    max_attempts_per_delivery: int = 1
    """Provider calls one delivery may make for the email before it waits for the next delivery."""
    ambiguous: AmbiguousPolicy = AmbiguousPolicy.ASSUME_SENT
    max_age_s: float = 3 * 86400
    """An email not sent this long after it was accepted is failed: a day-old code or receipt helps nobody."""
    batch_calls: bool = False
    """Send emails fetched together in one provider batch call where the provider has a batch API."""


@dataclass(frozen=True)
class RoutingWeights:
    """How one class weighs providers when they are ranked (``libs.routing.scoring``; need not sum to 1)."""

    cost: float
    latency: float
    health: float
    max_rate_wait_s: float
    """Longest an email of the class may wait for a rate-limited provider's next slot before routing elsewhere."""
    latency_by_tail: bool = False
    """Compare providers by their latency tail rather than their mean (a late OTP is a useless OTP)."""
    probe_first: bool = True
    """Send the half-open breaker's probe with this class as soon as it is due (otp: only as a last resort)."""
    health_floor: float = 0.9
    """The least health (1 - the provider's failure rate, shrunk while it has few calls) a provider needs to rank
    by cost for this class (``libs.routing.scoring``): bulk tolerates a provider failing a third of its calls, as a
    failed attempt costs nothing and bulk can wait for its retry."""
    pace_cost_ratio: float = 0.0
    """An email a provider refused for its rate budget waits in the queue for it rather than go to a provider
    costing more than this many times as much (0: never waits; ``services.sender.outcomes.waits_for_cheaper``)."""
    latency_objective_s: float = 0.0
    """The class's objective for the p99 from acceptance to a provider accepting the email (0: none). Alerting
    (``EspOtpLatencyHigh``) and the routing lab's oracle hold the class to it."""


@dataclass(frozen=True)
class ClassPolicy:
    """Everything that differs between message classes, service by service."""

    urgent: bool
    """Takes the urgent lane of every batching step on the accept path (admission, holds, commit, outbox), so a
    campaign being accepted never queues it."""
    accept_passes_in_flight: int
    """Ingest: passes of pooled single sends of one tenant and this class running at once; later sends wait for
    a pass to end and meanwhile pool with the sends that arrive after them (group commit). An OTP waiting for
    another OTP's pass would add that pass to its latency, so OTPs rarely wait."""
    routing: RoutingWeights
    """Router and sender: how providers are ranked for the class."""
    retry: RetryPolicy
    """Sender: retries, fallback and the useful life of the class."""
    honours_unsubscribes: bool
    """Ingest: an address suppressed because its owner unsubscribed is refused for this class. True for bulk only:
    an unsubscribe stops marketing, never an OTP code or a password reset; hard bounces, complaints and manual
    suppressions refuse every class (``libs.common.suppressions.suppression_key_for_class``)."""


CLASS_POLICIES: Mapping[MessageClass, ClassPolicy] = MappingProxyType({
    MessageClass.OTP: ClassPolicy(
        urgent=True,
        accept_passes_in_flight=16,
        routing=RoutingWeights(cost=0.05, latency=0.6, health=0.35, max_rate_wait_s=0.05, latency_by_tail=True,
                               probe_first=False, latency_objective_s=1.0),
        retry=RetryPolicy(max_failures=6, base_delay_s=0.25, max_delay_s=2.0, failover_now=True,
                          max_attempts_per_delivery=3, ambiguous=AmbiguousPolicy.FAIL_OVER, max_age_s=600),
        honours_unsubscribes=False,
    ),
    MessageClass.TRANSACTIONAL: ClassPolicy(
        urgent=False,
        accept_passes_in_flight=1,
        routing=RoutingWeights(cost=0.3, latency=0.35, health=0.35, max_rate_wait_s=1.0, latency_objective_s=10.0),
        retry=RetryPolicy(max_failures=10, base_delay_s=1.0, max_delay_s=60.0, max_age_s=86400),
        honours_unsubscribes=False,
    ),
    MessageClass.BULK: ClassPolicy(
        urgent=False,
        accept_passes_in_flight=1,
        routing=RoutingWeights(cost=0.65, latency=0.05, health=0.3, max_rate_wait_s=2.0, health_floor=0.5,
                               pace_cost_ratio=2.0),
        retry=RetryPolicy(max_failures=12, base_delay_s=1.0, max_delay_s=300.0, max_age_s=3 * 86400,
                          batch_calls=True),
        honours_unsubscribes=True,
    ),
})
"""The policy of every class; ``MessageClass.policy`` reads it."""
