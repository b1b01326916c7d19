"""Postmark webhooks: HTTP basic auth check and record parsing.

Secrets (``secrets`` mapping keys):
    ``webhook_user``, ``webhook_password``: the basic-auth credentials embedded in the webhook URL set at
    Postmark (``https://user:password@host/webhooks/<provider-name>``).

Postmark does not sign its webhooks. The only proof of origin is the basic-auth credentials (compared in
constant time); integrity of the body rests on HTTPS, so a body altered by someone holding the credentials
cannot be detected. There is no signed timestamp either: freshness is judged on the record's own time
(``DeliveredAt``, ``BouncedAt``, ``ReceivedAt``, ``ChangedAt``) with an 11-hour window, because Postmark
retries failed webhooks for about 10.5 hours. Replay key: a hash of the body.

Records are recognised by ``RecordType`` and bounce ``Type`` names, never by ``TypeCode`` (Postmark's own
spam-complaint example pairs ``Type: SpamComplaint`` with ``TypeCode: 512``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from datetime import timedelta
from typing import Any

from libs.providers.events import (
    ESP_MESSAGE_ID_VARIABLE,
    ESP_TENANT_ID_VARIABLE,
    BounceType,
    DeliveryEvent,
    EventKind,
    derived_event_id,
    utc_from_iso,
)
from libs.providers.webhook_model import (
    AuthenticatedWebhook,
    HandlerContext,
    MalformedWebhook,
    SignatureInvalid,
    SignatureMissing,
    WebhookRequest,
    WebhookResult,
)

__all__ = [
    "PostmarkWebhookHandler",
    "create_handler",
]

PROVIDER_TYPE = "postmark"
SECRET_USER = "webhook_user"
SECRET_PASSWORD = "webhook_password"
DEFAULT_TOLERANCE = timedelta(hours=11)

#: The field holding each record's own time.
TIME_FIELD_BY_RECORD_TYPE = {
    "Delivery": "DeliveredAt",
    "Bounce": "BouncedAt",
    "SpamComplaint": "BouncedAt",
    "Open": "ReceivedAt",
    "Click": "ReceivedAt",
    "SubscriptionChange": "ChangedAt",
}
#: Bounce types that prove the address cannot receive mail: suppress it.
HARD_BOUNCE_TYPES = frozenset({"HardBounce", "BadEmailAddress", "ManuallyDeactivated"})
#: Bounce types about this delivery, not the address: do not suppress. Unknown types are treated as soft too.
SOFT_BOUNCE_TYPES = frozenset(
    {
        "SoftBounce",
        "Transient",
        "DnsError",
        "Blocked",
        "SpamNotification",
        "VirusNotification",
        "OpenRelayTest",
        "Unknown",
    }
)
#: Bounce types where Postmark refused to send at all (sender-side problems).
REJECTED_BOUNCE_TYPES = frozenset({"Unconfirmed", "DMARCPolicy", "SMTPApiError", "TemplateRenderingFailed"})
#: Bounce records that are not delivery outcomes (auto-replies, inbound processing, list subscribes).
IGNORED_BOUNCE_TYPES = frozenset(
    {"AutoResponder", "AddressChange", "ChallengeVerification", "Subscribe", "InboundError"}
)


class PostmarkWebhookHandler:
    """Authenticates Postmark's basic-auth webhooks and parses their records."""

    provider_type = PROVIDER_TYPE
    default_tolerance = DEFAULT_TOLERANCE

    async def authenticate(self, request: WebhookRequest) -> AuthenticatedWebhook:
        """Compare the basic-auth credentials, then read the record and its time."""
        expected_user = request.secret(SECRET_USER).encode()
        expected_password = request.secret(SECRET_PASSWORD).encode()
        scheme, _, encoded = (request.header("Authorization") or "").strip().partition(" ")
        if scheme.lower() != "basic" or not encoded.strip():
            raise SignatureMissing("postmark webhook carries no basic-auth credentials")
        try:
            user, separator, password = base64.b64decode(encoded.strip(), validate=True).partition(b":")
        except (ValueError, binascii.Error) as exc:
            raise SignatureInvalid("postmark basic-auth credentials are not base64") from exc
        # Evaluate both comparisons before deciding, so timing does not reveal which one failed.
        user_matches = hmac.compare_digest(expected_user, user)
        password_matches = hmac.compare_digest(expected_password, password)
        if not (bool(separator) & user_matches & password_matches):
            raise SignatureInvalid("postmark basic-auth credentials do not match")
        record = _json_object(request.body)
        record_type = record.get("RecordType")
        time_field = TIME_FIELD_BY_RECORD_TYPE.get(record_type) if isinstance(record_type, str) else None
        if time_field is None:
            raise MalformedWebhook(f"unknown postmark RecordType {record_type!r}")
        try:
            record_time = utc_from_iso(str(record[time_field]))
        except (KeyError, ValueError) as exc:
            raise MalformedWebhook(f"postmark {record_type} record has no usable {time_field}") from exc
        replay_key = f"sha256:{hashlib.sha256(request.body).hexdigest()}"
        return AuthenticatedWebhook(signed_at=record_time, replay_key=replay_key, payload=record)

    def parse(self, request: WebhookRequest, authenticated: AuthenticatedWebhook) -> WebhookResult:
        """At most one event per record (reactivations and auto-replies yield none)."""
        try:
            event = _event(request.provider_name, authenticated.payload, authenticated)
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedWebhook(f"postmark record is incomplete: {exc!r}") from exc
        return [event] if event is not None else []


def _event(
    provider_name: str, record: dict[str, Any], authenticated: AuthenticatedWebhook
) -> DeliveryEvent | None:
    record_type = record["RecordType"]
    bounce_type: BounceType | None = None
    reason: str | None = None
    diagnostic: str | None = record.get("Details") or None
    recipient = record.get("Recipient") or record.get("Email")
    if record_type == "Delivery":
        kind = EventKind.DELIVERED
    elif record_type == "SpamComplaint":
        kind, reason = EventKind.COMPLAINED, record.get("Type")
    elif record_type == "Bounce":
        reason = str(record["Type"])
        diagnostic = record.get("Details") or record.get("Description") or None
        if reason in IGNORED_BOUNCE_TYPES:
            return None
        if reason == "SpamComplaint":
            kind = EventKind.COMPLAINED
        elif reason == "Unsubscribe":
            kind = EventKind.UNSUBSCRIBED
        elif reason in REJECTED_BOUNCE_TYPES:
            kind = EventKind.REJECTED
        else:
            kind = EventKind.BOUNCED
            bounce_type = BounceType.HARD if reason in HARD_BOUNCE_TYPES else BounceType.SOFT
    elif record_type == "Open":
        kind = EventKind.OPENED
    elif record_type == "Click":
        kind = EventKind.CLICKED
    elif record_type == "SubscriptionChange":
        if not record.get("SuppressSending"):
            return None  # a reactivation: nothing to record as a delivery outcome
        reason = record.get("SuppressionReason") or None
        # Broadcast streams report complaints and hard bounces only as suppressions; keep their meaning.
        if reason == "SpamComplaint":
            kind = EventKind.COMPLAINED
        elif reason == "HardBounce":
            kind, bounce_type = EventKind.BOUNCED, BounceType.HARD
        else:
            kind = EventKind.UNSUBSCRIBED
    else:
        return None
    if not recipient:
        raise ValueError(f"{record_type} record names no recipient")
    message_id = record.get("MessageID")
    metadata = record.get("Metadata") or {}
    our_id = metadata.get(ESP_MESSAGE_ID_VARIABLE)
    timestamp = record[TIME_FIELD_BY_RECORD_TYPE[record_type]]
    url = record.get("OriginalLink") if kind is EventKind.CLICKED else None
    if record_type in ("Bounce", "SpamComplaint") and record.get("ID") is not None:
        event_id = f"{PROVIDER_TYPE}:bounce:{record['ID']}"
    else:
        event_id = derived_event_id(PROVIDER_TYPE, [record_type, message_id, recipient, timestamp, url or ""])
    return DeliveryEvent(
        kind=kind,
        provider_type=PROVIDER_TYPE,
        provider_name=provider_name,
        recipient=str(recipient),
        occurred_at=authenticated.signed_at,
        event_id=event_id,
        provider_message_id=str(message_id) if message_id else None,
        message_id=str(our_id) if our_id else None,
        tenant_id=str(metadata[ESP_TENANT_ID_VARIABLE]) if metadata.get(ESP_TENANT_ID_VARIABLE) else None,
        bounce_type=bounce_type,
        reason=reason,
        diagnostic=diagnostic,
        url=url,
        raw=record,
    )


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedWebhook("postmark webhook body is not JSON") from exc
    if not isinstance(payload, dict):
        raise MalformedWebhook("postmark webhook body is not a JSON object")
    return payload


def create_handler(context: HandlerContext) -> PostmarkWebhookHandler:
    """Build the Postmark handler (it needs nothing from the context)."""
    return PostmarkWebhookHandler()
