"""The event types customers see — in webhook bodies, endpoint filters and the events API — written once.

A message event's type is ``message.<event>`` (``esp.v1.MessageEventType`` without its prefix, lower-cased); an
account notification's (``esp.internal.v1.AccountEvent.kind``) has a name of its own; ``webhook_endpoint.disabled``
comes from the webhook dispatcher, ``test`` from ``SendTestWebhookEvent``. ATTEMPTED events (one per provider try)
stay internal: what a customer acts on is the outcome (sent, deferred, failed), not each try.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

from esp.v1 import messages_pb2

__all__ = [
    "ACCOUNT_EVENT_TYPES",
    "ENDPOINT_DISABLED",
    "EVENT_TYPES",
    "MESSAGE_EVENT_TYPES",
    "REASON_CODE_ATTRIBUTE",
    "RECIPIENT_REFUSED_REASON_CODE",
    "SUPPRESSED_REASON_CODE",
    "TEST_EVENT",
    "unknown_event_types",
]

_INTERNAL_MESSAGE_EVENTS = frozenset({messages_pb2.MESSAGE_EVENT_TYPE_UNSPECIFIED,
                                      messages_pb2.MESSAGE_EVENT_TYPE_ATTEMPTED})
_PREFIX = "MESSAGE_EVENT_TYPE_"

MESSAGE_EVENT_TYPES: Mapping[int, str] = MappingProxyType({
    number: "message." + name.removeprefix(_PREFIX).lower()
    for name, number in messages_pb2.MessageEventType.items() if number not in _INTERNAL_MESSAGE_EVENTS
})
"""``esp.v1.MessageEventType`` value → customer event type, for every type a customer sees."""

REASON_CODE_ATTRIBUTE = "reason_code"
"""The message event attribute that says, in a word, why a sender failed or rejected an email."""
SUPPRESSED_REASON_CODE = "SUPPRESSED"
"""``reason_code`` of the FAILED event of an email whose recipient was suppressed after it was queued."""
RECIPIENT_REFUSED_REASON_CODE = "RECIPIENT_REFUSED"
"""``reason_code`` of the REJECTED event of a recipient the provider refused when it took the email for the others
(an SMTP relay refusing an RCPT)."""

ACCOUNT_EVENT_TYPES: Mapping[str, str] = MappingProxyType({
    "low_balance_crossed": "account.low_balance",
    "unbilled_send": "account.unbilled_send",
    "campaign_paused": "campaign.paused",
    "campaign_completed": "campaign.completed",
    "domain_verified": "domain.verified",
    "domain_verification_failed": "domain.verification_failed",
})
"""``AccountEvent.kind`` (what the ledger, the campaigns service and the router publish) → customer event type.
A sending domain that (re)verifies is ``domain.verified``; one that stops verifying (a record removed) is
``domain.verification_failed``, with the failing records in ``failing_records``."""

ENDPOINT_DISABLED = "webhook_endpoint.disabled"
"""An endpoint was disabled by the platform (410 Gone, or failing for days); sent to the tenant's other endpoints."""

TEST_EVENT = "test"
"""What ``SendTestWebhookEvent`` delivers."""

EVENT_TYPES: frozenset[str] = frozenset(
    [*MESSAGE_EVENT_TYPES.values(), *ACCOUNT_EVENT_TYPES.values(), ENDPOINT_DISABLED, TEST_EVENT])
"""Every type an endpoint filter or an events query may name."""


def unknown_event_types(types: Iterable[str]) -> list[str]:
    """The names in ``types`` that are no event type, in the order given (empty when all are known)."""
    return [t for t in types if t not in EVENT_TYPES]
