"""What the analytics tests send through the mesh, the faults the simulator adds, and the figures that must follow.

Three simulated providers, each the only one carrying one message class, so which provider takes an email is known
before it is sent: ``mailgun-us`` (otp; slow, 250 ms a call), ``sendgrid-1`` (transactional; priced per email and
per MB) and ``postmark-1`` (bulk). Emails go out in phases, the simulator's knobs set for one fate per phase:
delivered; hard bounce (``bounce_rate`` 1); complaint (``complaint_rate`` 1: delivered, then complained); soft bounce
(Mailgun sends no webhook, the test posts Mailgun's signed "failed" callback of a soft bounce, built with the
simulator's own signing code). So every email's fate is known in advance, and checked against what the simulator
reports it did.

The expected figures are computed here from first principles, never by the code under test: each message's
timeline (ListMessageEvents, once it holds exactly the events the plan implies), its accept time, credits, tags and
recipient; counts per event, latencies as raw differences of timestamps, percentiles by nearest rank.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from itertools import product
from typing import Any

from esp.v1 import messages_pb2

from services.ingest.model import EmailDraft, Mailbox
from services.ingest.payloads import estimated_message_bytes

M = messages_pb2


@dataclass(frozen=True)
class ProviderPlan:
    """One simulated provider: the class it alone carries, its prices and its latency."""

    name: str
    """Both the simulator personality and the provider id in the catalog."""
    message_class: str
    price_per_email_micros: int
    price_per_mb_micros: int
    latency_ms: float

    def cost_micros(self, message_bytes: int) -> int:
        """What one email of ``message_bytes`` costs at this provider (the prices make it a whole number)."""
        per_mb, remainder = divmod(self.price_per_mb_micros * message_bytes, 1_000_000)
        assert remainder == 0, "choose a per-MB price that makes every email's cost a whole number of micros"
        return self.price_per_email_micros + per_mb


SLOW_PROVIDER = "mailgun-us"
SLOW_LATENCY_MS = 250.0
PROVIDERS: Mapping[str, ProviderPlan] = {p.name: p for p in (
    ProviderPlan(SLOW_PROVIDER, "otp", 300, 0, SLOW_LATENCY_MS),
    # A micro per byte: the per-MB part is visible in every email's cost and never needs rounding.
    ProviderPlan("sendgrid-1", "transactional", 120, 1_000_000, 0.0),
    ProviderPlan("postmark-1", "bulk", 80, 0, 0.0),
)}
PROVIDER_OF_CLASS = {p.message_class: p.name for p in PROVIDERS.values()}
CLASS_ENUMS = {"otp": "MESSAGE_CLASS_OTP", "transactional": "MESSAGE_CLASS_TRANSACTIONAL",
               "bulk": "MESSAGE_CLASS_BULK"}
DOMAINS: Mapping[str, str] = {"gmail.com": "gmail", "yahoo.com": "yahoo", "outlook.com": "outlook",
                              "icloud.com": "apple", "example.org": "other"}
"""Recipient domains and the mailbox provider each stands for."""
TAG_SETS: Mapping[str, Sequence[tuple[str, ...]]] = {
    "otp": (("login",), ("login", "eu"), ()),
    "transactional": (("receipt",), ("receipt", "eu"), ()),
    "bulk": (("news",), ("promo",)),  # Postmark takes one tag per email
}
"""Tags of the n-th email of a class, in turn: some emails have none, some two."""
BODIES = {"otp": "Your code is 123456", "transactional": "Thank you for your order. " * 80,
          "bulk": "This week's news. " * 20}


class Outcome(StrEnum):
    """What the simulator does with an email."""

    DELIVERED = "delivered"
    HARD_BOUNCE = "hard_bounce"
    COMPLAINT = "complaint"
    SOFT_BOUNCE = "soft_bounce"


TIMELINES: Mapping[Outcome, Counter[int]] = {
    Outcome.DELIVERED: Counter([M.MESSAGE_EVENT_TYPE_ACCEPTED, M.MESSAGE_EVENT_TYPE_SENT,
                                M.MESSAGE_EVENT_TYPE_DELIVERED]),
    Outcome.HARD_BOUNCE: Counter([M.MESSAGE_EVENT_TYPE_ACCEPTED, M.MESSAGE_EVENT_TYPE_SENT,
                                  M.MESSAGE_EVENT_TYPE_BOUNCED]),
    Outcome.COMPLAINT: Counter([M.MESSAGE_EVENT_TYPE_ACCEPTED, M.MESSAGE_EVENT_TYPE_SENT,
                                M.MESSAGE_EVENT_TYPE_DELIVERED, M.MESSAGE_EVENT_TYPE_COMPLAINED]),
    Outcome.SOFT_BOUNCE: Counter([M.MESSAGE_EVENT_TYPE_ACCEPTED, M.MESSAGE_EVENT_TYPE_SENT,
                                  M.MESSAGE_EVENT_TYPE_BOUNCED]),
}
"""The events each fate leaves in a message's timeline, exactly."""
SIMULATOR_CALLBACKS: Mapping[Outcome, list[str]] = {
    Outcome.DELIVERED: ["delivered"], Outcome.HARD_BOUNCE: ["bounced"],
    Outcome.COMPLAINT: ["complained", "delivered"], Outcome.SOFT_BOUNCE: [],
}
"""The delivery webhooks (sorted kinds) the simulator itself posts for each fate."""
BOUNCE_TYPES = {Outcome.HARD_BOUNCE: "hard", Outcome.SOFT_BOUNCE: "soft"}


@dataclass(frozen=True)
class PlannedEmail:
    """One email to send: whose, which class, its fate, its recipient and tags."""

    tenant: str
    """The tenant's label in the test ("A" or "B")."""
    message_class: str
    outcome: Outcome
    recipient: str
    tags: tuple[str, ...]

    @property
    def provider(self) -> str:
        return PROVIDER_OF_CLASS[self.message_class]

    @property
    def mailbox_provider(self) -> str:
        return DOMAINS[self.recipient.rpartition("@")[2]]

    @property
    def subject(self) -> str:
        return f"{self.message_class} {self.outcome}"

    @property
    def text_body(self) -> str:
        return BODIES[self.message_class]

    def rest_body(self, request_id: str) -> dict[str, Any]:
        """The JSON body of POST /v1/messages:send."""
        return {"requestId": request_id, "messageClass": CLASS_ENUMS[self.message_class],
                "from": {"email": "app@example.com", "name": "App"}, "to": [{"email": self.recipient}],
                "subject": self.subject, "textBody": self.text_body, "tags": list(self.tags)}

    def message_bytes(self) -> int:
        """The size providers are charged by (ingest's estimate, which the sender prices with)."""
        draft = EmailDraft(message_class=self.message_class, sender=Mailbox("app@example.com", "App"),
                           to=(Mailbox(self.recipient),), subject=self.subject, text_body=self.text_body,
                           tags=self.tags)
        return estimated_message_bytes(draft, [])


PHASES: Sequence[tuple[Outcome, Mapping[tuple[str, str], int]]] = (
    (Outcome.DELIVERED, {("A", "otp"): 8, ("A", "transactional"): 8, ("A", "bulk"): 8,
                         ("B", "otp"): 4, ("B", "transactional"): 4, ("B", "bulk"): 4}),
    (Outcome.HARD_BOUNCE, {("A", "otp"): 1, ("A", "transactional"): 1, ("A", "bulk"): 1, ("B", "transactional"): 1}),
    (Outcome.COMPLAINT, {("A", "transactional"): 1, ("A", "bulk"): 1, ("B", "bulk"): 1}),
    # Soft bounces are posted as Mailgun callbacks, so they are of the class Mailgun carries.
    (Outcome.SOFT_BOUNCE, {("A", "otp"): 2, ("B", "otp"): 1}),
)
"""How many emails of each tenant and class go out in each phase (46 in all)."""


def planned_phases(run: str) -> list[tuple[Outcome, list[PlannedEmail]]]:
    """The emails of every phase; recipients unique to ``run``, spread over the domains, tags taken in turn."""
    domains = list(DOMAINS)
    seen_of_class: Counter[str] = Counter()
    phases: list[tuple[Outcome, list[PlannedEmail]]] = []
    number = 0
    for outcome, counts in PHASES:
        emails: list[PlannedEmail] = []
        for (tenant, message_class), count in counts.items():
            for _ in range(count):
                tags = TAG_SETS[message_class][seen_of_class[message_class] % len(TAG_SETS[message_class])]
                seen_of_class[message_class] += 1
                recipient = f"{outcome.replace('_', '-')}-{number}-{run}@{domains[number % len(domains)]}"
                emails.append(PlannedEmail(tenant, message_class, outcome, recipient, tags))
                number += 1
        phases.append((outcome, emails))
    return phases


@dataclass(frozen=True)
class TimelineEvent:
    """One event of a message's timeline, as ListMessageEvents shows it."""

    type: int
    time: datetime
    provider: str
    latency_ms: int
    bounce_type: str

    @classmethod
    def of(cls, event: messages_pb2.MessageEvent) -> TimelineEvent:
        return cls(event.type, event.event_time.ToDatetime(tzinfo=UTC), event.provider, event.latency_ms,
                   event.bounce_type)


@dataclass(frozen=True)
class SentEmail:
    """An email the mesh took, with everything the expected figures need."""

    plan: PlannedEmail
    tenant_id: str
    message_id: str
    provider: str
    """The provider that took it (GetMessage)."""
    credits: int
    accept_time: datetime
    """The message's create_time: latencies run from there."""
    events: tuple[TimelineEvent, ...]

    def dimension(self, name: str, event: TimelineEvent) -> list[str]:
        """The values one of this email's events is counted under for a dimension (several for tags)."""
        if name == "provider":
            # The ACCEPTED event comes before any provider is chosen: it is counted under no provider.
            return [""] if event.type == M.MESSAGE_EVENT_TYPE_ACCEPTED else [self.provider]
        if name == "message_class":
            return [self.plan.message_class]
        if name == "tag":
            return list(self.plan.tags)
        if name == "mailbox_provider":
            return [self.plan.mailbox_provider]
        if name == "tenant":
            return [self.tenant_id]
        if name == "campaign":
            return [""]
        raise ValueError(name)


@dataclass
class Expected:
    """The figures of one group, from the raw events."""

    counts: Counter[str] = field(default_factory=Counter)
    send_latencies: list[float] = field(default_factory=list)
    delivery_latencies: list[float] = field(default_factory=list)
    call_latencies: list[float] = field(default_factory=list)


def _ms(later: datetime, earlier: datetime) -> float:
    return (later - earlier) / timedelta(milliseconds=1)


def bucket_key(moment: datetime, bucket: str) -> str:
    """A bucket's start as GetStats keys it (RFC 3339, UTC)."""
    start = moment.replace(second=0, microsecond=0)
    if bucket == "hour":
        start = start.replace(minute=0)
    elif bucket == "day":
        start = start.replace(hour=0, minute=0)
    return start.strftime("%Y-%m-%dT%H:%M:%SZ")


def _add(expected: Expected, email: SentEmail, event: TimelineEvent, cost: Callable[[SentEmail], int]) -> None:
    counts = expected.counts
    if event.type == M.MESSAGE_EVENT_TYPE_ACCEPTED:
        counts["accepted"] += 1
    elif event.type == M.MESSAGE_EVENT_TYPE_SENT:
        counts["sent"] += 1
        counts["provider_calls"] += 1
        counts["credits_charged"] += email.credits
        counts["provider_cost_micros"] += cost(email)
        expected.send_latencies.append(_ms(event.time, email.accept_time))
        expected.call_latencies.append(float(event.latency_ms))
    elif event.type == M.MESSAGE_EVENT_TYPE_DELIVERED:
        counts["delivered"] += 1
        expected.delivery_latencies.append(_ms(event.time, email.accept_time))
    elif event.type == M.MESSAGE_EVENT_TYPE_BOUNCED:
        counts["bounced"] += 1
        counts[f"bounced_{event.bounce_type}"] += 1
    elif event.type == M.MESSAGE_EVENT_TYPE_COMPLAINED:
        counts["complained"] += 1
    else:
        raise AssertionError(f"the plan has no {M.MessageEventType.Name(event.type)} events")


def expected_groups(emails: Iterable[SentEmail], cost: Callable[[SentEmail], int], dimensions: Sequence[str] = (),
                    bucket: str | None = None) -> dict[tuple[str, ...], Expected]:
    """The expected figures per group key (the bucket's start first when ``bucket``, then each dimension's value),
    each event counted under every group it belongs to."""
    groups: dict[tuple[str, ...], Expected] = {}
    for email in emails:
        for event in email.events:
            values = [email.dimension(d, event) for d in dimensions]
            if bucket is not None:
                values.insert(0, [bucket_key(event.time, bucket)])
            for key in product(*values):
                _add(groups.setdefault(key, Expected()), email, event, cost)
    return groups


def expected_total(emails: Iterable[SentEmail], cost: Callable[[SentEmail], int]) -> Expected:
    """Every event once."""
    return expected_groups(emails, cost).get((), Expected())


def exact_percentile(values: Sequence[float], quantile: float) -> float:
    """The nearest-rank percentile: the smallest value with at least ``quantile`` of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(quantile * len(ordered)) - 1)]


def within_sketch_error(estimate: float, exact: float) -> bool:
    """Whether a histogram estimate is within the sketch's stated error of the exact value: the estimate lies in
    the bucket holding the exact value, whose bounds differ by 25 % (so |estimate - exact| <= 25 % of exact); the
    first bucket is [0, 1] ms, where that means an absolute millisecond."""
    if exact <= 1.0:
        return 0.0 <= estimate <= 1.0
    return abs(estimate - exact) <= 0.25 * exact
