"""The reports domain's values: message states and their order, events, message status, suppressions, stats.

Plain records and enums, no protobuf types: ``services/reports/server.py`` translates to and from the API.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Generic, NamedTuple, TypeVar

T = TypeVar("T")


class MessageState(StrEnum):
    """Where a message is in its life (``esp.v1.MessageState`` without the prefix, lower-cased)."""

    ACCEPTED = "accepted"
    DEFERRED = "deferred"
    SENT = "sent"
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    FAILED = "failed"
    COMPLAINED = "complained"
    CANCELLED = "cancelled"
    SCHEDULED = "scheduled"


class EventType(StrEnum):
    """What happened to a message (``esp.v1.MessageEventType`` without the prefix, lower-cased)."""

    ACCEPTED = "accepted"
    ATTEMPTED = "attempted"
    SENT = "sent"
    DEFERRED = "deferred"
    FAILED = "failed"
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    COMPLAINED = "complained"
    OPENED = "opened"
    CLICKED = "clicked"
    UNSUBSCRIBED = "unsubscribed"
    REJECTED = "rejected"
    ATTACHMENTS_LINKED = "attachments_linked"
    DEAD_LETTERED = "dead_lettered"
    CANCELLED = "cancelled"


class SuppressionReason(StrEnum):
    """Why an address is suppressed."""

    HARD_BOUNCE = "hard_bounce"
    COMPLAINT = "complaint"
    UNSUBSCRIBE = "unsubscribe"
    MANUAL = "manual"

    @property
    def stops_every_class(self) -> bool:
        """Whether a suppression of every topic for this reason refuses every class of email. An unsubscribe stops
        bulk mail only (``ClassPolicy.honours_unsubscribes``); hard bounces, complaints and manual suppressions stop
        all. A topic-scoped suppression stops bulk mail of its topic only, whatever its reason."""
        return self is not SuppressionReason.UNSUBSCRIBE


# The state an event moves a message to, with its rank. A message only moves to a higher rank, so events may
# arrive in any order and any number of times: a late DEFERRED after SENT changes nothing, DELIVERED after
# SENT wins, a BOUNCED (possibly asynchronous, after DELIVERED) or COMPLAINED outranks DELIVERED. A provider's
# REJECTED comes after it had taken the message (SENT), so it outranks SENT; the sender's own FAILED does not,
# because a SENT for the same message means a later attempt did go out. CANCELLED (a cancelled campaign's email
# dropped before any provider had it) is final like the sender's FAILED and shares its rank: below SENT, whose
# provider did have the email, and with no free rank between FAILED and SENT (ranks are stored; renumbering would
# rewrite every message row). At that rank FAILED wins whichever came first (``YIELDING_STATES``): an email
# that failed for good is cancelled only by a redelivery of its task after the failure. Events absent here
# (ATTEMPTED, OPENED, CLICKED, UNSUBSCRIBED, ATTACHMENTS_LINKED) add to the timeline without changing the state.
STATE_TRANSITIONS: Mapping[EventType, tuple[MessageState, int]] = {
    EventType.ACCEPTED: (MessageState.ACCEPTED, 0),
    EventType.DEFERRED: (MessageState.DEFERRED, 1),
    EventType.FAILED: (MessageState.FAILED, 2),
    EventType.DEAD_LETTERED: (MessageState.FAILED, 2),
    EventType.CANCELLED: (MessageState.CANCELLED, 2),
    EventType.SENT: (MessageState.SENT, 3),
    EventType.REJECTED: (MessageState.FAILED, 4),
    EventType.DELIVERED: (MessageState.DELIVERED, 5),
    EventType.BOUNCED: (MessageState.BOUNCED, 6),
    EventType.COMPLAINED: (MessageState.COMPLAINED, 7),
}
YIELDING_STATES = frozenset({MessageState.CANCELLED})
"""States that give way to another state of the same rank, whatever the order of their events (the recorder's
merge in SQL says the same)."""
SCHEDULED_STATE = (MessageState.SCHEDULED, 0)
"""What the ACCEPTED event of a message with a send_time ahead moves it to: ACCEPTED's rank, so every later event
(the sender's DEFERRED, SENT, FAILED, CANCELLED ...) outranks it, and it never replaces a state recorded before."""
PLACEHOLDER_STATE = (MessageState.ACCEPTED, 0)
"""State of a message known only from events that do not set one (it was accepted, or nothing would happen)."""

EMPTY_MAPPING: Mapping[str, str] = MappingProxyType({})
"""The default of mapping fields of the records below (shared, so immutable)."""

# The bounce type that puts the recipient on the tenant's suppression list (soft bounces do not).
HARD_BOUNCE_TYPE = "hard"


class Mailbox(NamedTuple):
    """An address with an optional display name."""

    email: str
    name: str = ""


class AcceptedMessage(NamedTuple):
    """The summary of a message as ingest accepted it (carried by the ACCEPTED event)."""

    message_class: str
    sender: Mailbox
    to: tuple[Mailbox, ...] = ()
    cc: tuple[Mailbox, ...] = ()
    bcc: tuple[Mailbox, ...] = ()
    subject: str = ""
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, str] = EMPTY_MAPPING
    attachment_ids: tuple[str, ...] = ()
    request_id: str = ""
    credits: int = 0
    campaign: str = ""
    create_time: datetime | None = None
    """When ingest accepted it; the event time is used when absent."""
    send_time: datetime | None = None
    """When it is handed to a sender, for a message accepted with a send_time ahead (state SCHEDULED)."""


class MessageEventRecord(NamedTuple):
    """One event of a message's timeline (a named tuple, like the two records above: the consumer builds one per
    stream message, and a frozen dataclass cost several times as much to construct)."""

    event_id: str
    """Unique: the dedupe key of at-least-once delivery."""
    tenant_id: str
    message_id: str
    event_type: EventType
    event_time: datetime
    message_class: str = ""
    """``otp``, ``transactional``, ``bulk`` or empty when the producer did not say."""
    provider: str = ""
    provider_message_id: str = ""
    recipient: str = ""
    reason: str = ""
    attempt: int = 0
    outcome: str = ""
    """How an attempt ended: ``accepted``, ``throttled``, ``retryable``, ``permanent``, ``ambiguous`` or empty."""
    latency_ms: int = 0
    bounce_type: str = ""
    """``hard`` or ``soft`` for bounces."""
    url: str = ""
    attributes: Mapping[str, str] = EMPTY_MAPPING
    accepted: AcceptedMessage | None = None
    """Set on ACCEPTED events only."""
    provider_cost_micros: int = 0
    """On SENT events: what the provider charges for the email, at its price when it was sent."""


@dataclass(frozen=True)
class MessageStatus:
    """A message as the reports service knows it."""

    tenant_id: str
    message_id: str
    state: MessageState
    message_class: str
    sender: Mailbox
    to: tuple[Mailbox, ...]
    cc: tuple[Mailbox, ...]
    bcc: tuple[Mailbox, ...]
    subject: str
    tags: tuple[str, ...]
    metadata: Mapping[str, str]
    attachment_ids: tuple[str, ...]
    request_id: str
    credits: int
    campaign: str
    provider: str
    provider_message_id: str
    attempts: int
    create_time: datetime
    update_time: datetime
    accepted_seen: bool
    """False while the ACCEPTED event has not arrived: the summary fields are still empty."""
    send_time: datetime | None = None
    """When a scheduled message is handed to a sender (None: at once)."""


@dataclass(frozen=True)
class Suppression:
    """One suppressed address of a tenant."""

    tenant_id: str
    email: str
    """Lower-cased."""
    reason: SuppressionReason
    note: str = ""
    create_time: datetime | None = None
    source_message_id: str = ""
    topic: str = ""
    """The topic (list) it is scoped to, lower-cased; empty for every topic. A topic-scoped suppression stops only
    bulk mail of that topic (``libs.common.suppressions.suppression_keys_for``)."""


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing and the token of the next (empty on the last page)."""

    items: tuple[T, ...]
    next_page_token: str


