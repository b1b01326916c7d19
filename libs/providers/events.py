"""One normalised model for the delivery callbacks every provider sends back.

Each provider's webhook module (``libs/providers/<name>/webhook.py``) turns its own payload into
:class:`DeliveryEvent` values, so the reports service deals with one shape whatever the provider. The raw
provider payload always travels along (``raw``) because the normalised view is lossy by design.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import getaddresses
from enum import StrEnum
from typing import Any

__all__ = [
    "ESP_MESSAGE_ID_HEADER",
    "ESP_MESSAGE_ID_VARIABLE",
    "ESP_TENANT_ID_VARIABLE",
    "BounceType",
    "DeliveryEvent",
    "EventKind",
    "addresses_in",
    "derived_event_id",
    "header_value",
    "utc_from_epoch",
    "utc_from_iso",
]

#: The header the send side puts our own message id in, and the name of the provider-side custom variable
#: carrying it (Mailgun ``v:esp_message_id``, SendGrid ``custom_args``, Postmark ``Metadata``,
#: SES ``EmailTags``).
ESP_MESSAGE_ID_HEADER = "X-ESP-Message-Id"
ESP_MESSAGE_ID_VARIABLE = "esp_message_id"
#: The custom variable carrying our tenant id next to the message id.
ESP_TENANT_ID_VARIABLE = "esp_tenant_id"


class EventKind(StrEnum):
    """What happened to a message, in our words."""

    DELIVERED = "delivered"
    BOUNCED = "bounced"
    DEFERRED = "deferred"
    REJECTED = "rejected"
    COMPLAINED = "complained"
    OPENED = "opened"
    CLICKED = "clicked"
    UNSUBSCRIBED = "unsubscribed"


class BounceType(StrEnum):
    """Whether a bounce should suppress the address (hard) or not (soft)."""

    HARD = "hard"
    SOFT = "soft"


@dataclass(frozen=True, kw_only=True)
class DeliveryEvent:
    """A provider's delivery callback, normalised.

    Equality and hashing ignore ``raw`` so that events parsed from two encodings of the same callback compare
    equal; ``raw`` is still always set on events produced by a webhook parser.
    """

    kind: EventKind
    """What happened."""
    provider_type: str
    """Adapter type that produced the callback: ``mailgun``, ``sendgrid``, ``ses``, ``postmark``."""
    provider_name: str
    """Configured provider instance name (the ``<provider-name>`` in ``POST /webhooks/<provider-name>``)."""
    recipient: str
    """The recipient address the event is about."""
    occurred_at: datetime
    """When the provider says it happened (timezone-aware, UTC)."""
    event_id: str
    """Stable id for deduplication: the provider's own event id where it has one, else derived from the
    callback deterministically, so a re-delivered callback yields the same id."""
    provider_message_id: str | None = None
    """The id the provider's send call returned, normalised to match it exactly (Mailgun with ``<>``,
    SendGrid's ``X-Message-Id`` without the ``.filter…`` suffix, SES ``mail.messageId``, Postmark
    ``MessageID``)."""
    message_id: str | None = None
    """Our own message id, when the callback carries it back (custom variables, metadata, tags, header)."""
    tenant_id: str | None = None
    """Our tenant id, when the callback carries it back the same way."""
    bounce_type: BounceType | None = None
    """Set for ``bounced`` events only."""
    reason: str | None = None
    """The provider's classification of the outcome (e.g. ``Permanent/NoEmail``, ``suppress-bounce``)."""
    diagnostic: str | None = None
    """Free text from the receiving server or provider (SMTP response, diagnostic code)."""
    url: str | None = None
    """The clicked link, for ``clicked`` events."""
    raw: Any = field(default=None, compare=False, hash=False, repr=False)
    """The provider's payload for this event (parsed JSON), kept as received."""

    def __post_init__(self) -> None:
        if self.occurred_at.tzinfo is None:
            raise ValueError("occurred_at must be timezone-aware")
        if (self.kind is EventKind.BOUNCED) != (self.bounce_type is not None):
            raise ValueError("bounce_type is required for bounced events and only for them")


def utc_from_epoch(seconds: float) -> datetime:
    """Convert epoch seconds (int or float) to an aware UTC datetime."""
    return datetime.fromtimestamp(seconds, tz=UTC)


def utc_from_iso(value: str) -> datetime:
    """Parse an ISO 8601 timestamp (``Z`` or offset) into an aware UTC datetime.

    Raises:
        ValueError: if the text is not ISO 8601 or carries no timezone.
    """
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"timestamp without timezone: {value!r}")
    return parsed.astimezone(UTC)


def derived_event_id(provider_type: str, parts: Iterable[object]) -> str:
    """A deterministic event id for providers whose callbacks carry none (same inputs, same id)."""
    digest = hashlib.sha256("\x1f".join(str(part) for part in parts).encode()).hexdigest()
    return f"{provider_type}:{digest[:32]}"


def header_value(headers: Iterable[Mapping[str, Any]], name: str) -> str | None:
    """Find a header in a ``[{"name": ..., "value": ...}]`` list (SES ``mail.headers``), ignoring case."""
    wanted = name.lower()
    for header in headers:
        if str(header.get("name", "")).lower() == wanted:
            value = header.get("value")
            return str(value) if value is not None else None
    return None


def addresses_in(header: str) -> list[str]:
    """The addresses an address header names (``"Alice" <a@example.com>, b@example.org`` → both addresses)."""
    return [address for _name, address in getaddresses([header]) if "@" in address]
