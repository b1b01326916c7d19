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
spam-complaint example pairs ``Type: SpamComplaint`` with ``TypeCode: 512``) unless ``Type`` is missing.

Real records leave out fields the examples show, and a refused record is lost (Postmark retries it, then
gives up), so only credentials refuse a request:

* a record without ``RecordType`` (the older bounce webhook shape, still shown on Postmark's webhooks page) is
  recognised by its fields (``BouncedAt``/``TypeCode`` → Bounce, ``DeliveredAt`` → Delivery, …);
* a record without its time field is judged and dated by any other time field it has, else by now (it then
  cannot be stale; the body hash still guards against replays within the window);
* a bounce without ``Email`` (an ``Unsubscribe`` bounce record — a reply asking to be removed — comes without
  ``Email`` or ``BouncedAt``) still yields its event, matched by ``MessageID``; the receiver fills in the
  recipient from the message when it had only one;
* a record type we do not track yields nothing; a record that still cannot be read is a
  :class:`~libs.providers.webhook_model.MalformedItem`, kept for inspection and answered 2xx.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from datetime import datetime, timedelta
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
    MalformedItem,
    MalformedWebhook,
    ParsedWebhook,
    ParseResult,
    SignatureInvalid,
    SignatureMissing,
    WebhookRequest,
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
#: Bounce type names by ``TypeCode``, used only when a record has no ``Type``.
BOUNCE_TYPE_BY_CODE = {
    1: "HardBounce",
    2: "Transient",
    16: "Unsubscribe",
    32: "Subscribe",
    64: "AutoResponder",
    128: "AddressChange",
    256: "DnsError",
    512: "SpamNotification",
    1024: "OpenRelayTest",
    2048: "Unknown",
    4096: "SoftBounce",
    8192: "VirusNotification",
    16384: "ChallengeVerification",
    100000: "BadEmailAddress",
    100001: "SpamComplaint",
    100002: "ManuallyDeactivated",
    100003: "Unconfirmed",
    100006: "Blocked",
    100007: "SMTPApiError",
    100008: "InboundError",
    100009: "DMARCPolicy",
    100010: "TemplateRenderingFailed",
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
        record_time = _record_time(record) or request.now
        replay_key = f"sha256:{hashlib.sha256(request.body).hexdigest()}"
        return AuthenticatedWebhook(signed_at=record_time, replay_key=replay_key, payload=record)

    def parse(self, request: WebhookRequest, authenticated: AuthenticatedWebhook) -> ParseResult:
        """At most one event per record (reactivations, auto-replies and untracked record types yield none)."""
        record: dict[str, Any] = authenticated.payload
        try:
            event = _event(request.provider_name, record, authenticated)
        except (KeyError, TypeError, ValueError) as exc:
            return ParsedWebhook([], [MalformedItem(record, f"postmark record unreadable: {exc}")])
        return ParsedWebhook([event] if event is not None else [])


def _record_type(record: dict[str, Any]) -> str | None:
    """``RecordType``, or for records without one (the older bounce webhook), the type their fields show."""
    declared = record.get("RecordType")
    if isinstance(declared, str) and declared:
        return declared
    if "BouncedAt" in record or "TypeCode" in record or ("Type" in record and "Email" in record):
        return "SpamComplaint" if record.get("Type") == "SpamComplaint" else "Bounce"
    if "DeliveredAt" in record:
        return "Delivery"
    if "ChangedAt" in record or "SuppressSending" in record:
        return "SubscriptionChange"
    if "OriginalLink" in record or "ClickLocation" in record:
        return "Click"
    if "FirstOpen" in record or "ReadSeconds" in record:
        return "Open"
    return None


def _record_time(record: dict[str, Any]) -> datetime | None:
    """The record's own time: its type's time field first, else any time field it has."""
    record_type = _record_type(record)
    preferred = TIME_FIELD_BY_RECORD_TYPE.get(record_type or "")
    for name in (preferred, *TIME_FIELD_BY_RECORD_TYPE.values()):
        value = record.get(name) if name else None
        if isinstance(value, str) and value:
            try:
                return utc_from_iso(value)
            except ValueError:
                continue
    return None


def _bounce_type_name(record: dict[str, Any]) -> str:
    declared = record.get("Type")
    if isinstance(declared, str) and declared:
        return declared
    code = record.get("TypeCode")
    return BOUNCE_TYPE_BY_CODE.get(code, "Unknown") if isinstance(code, int) else "Unknown"


def _event(
    provider_name: str, record: dict[str, Any], authenticated: AuthenticatedWebhook
) -> DeliveryEvent | None:
    record_type = _record_type(record)
    if record_type is None:
        raise ValueError("no RecordType, and no field that tells which record it is")
    bounce_type: BounceType | None = None
    reason: str | None = None
    diagnostic: str | None = _text(record.get("Details"))
    if record_type == "Delivery":
        kind = EventKind.DELIVERED
    elif record_type == "SpamComplaint":
        kind, reason = EventKind.COMPLAINED, _bounce_type_name(record)
    elif record_type == "Bounce":
        reason = _bounce_type_name(record)
        diagnostic = diagnostic or _text(record.get("Description"))
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
        reason = _text(record.get("SuppressionReason"))
        suppress = record.get("SuppressSending")
        if not (suppress if suppress is not None else reason):
            return None  # a reactivation: nothing to record as a delivery outcome
        # Broadcast streams report complaints and hard bounces only as suppressions; keep their meaning.
        if reason == "SpamComplaint":
            kind = EventKind.COMPLAINED
        elif reason == "HardBounce":
            kind, bounce_type = EventKind.BOUNCED, BounceType.HARD
        else:
            kind = EventKind.UNSUBSCRIBED
    else:
        return None  # a record type we do not track (inbound, future types)
    recipient = _text(record.get("Recipient")) or _text(record.get("Email")) or ""
    message_id = _text(record.get("MessageID"))
    metadata = record.get("Metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    our_id = _text(metadata.get(ESP_MESSAGE_ID_VARIABLE))
    if not (recipient or message_id or our_id):
        raise ValueError(f"{record_type} record names no recipient and no message")
    url = _text(record.get("OriginalLink")) if kind is EventKind.CLICKED else None
    if record_type in ("Bounce", "SpamComplaint") and record.get("ID") is not None:
        event_id = f"{PROVIDER_TYPE}:bounce:{record['ID']}"
    else:
        timestamp = record.get(TIME_FIELD_BY_RECORD_TYPE.get(record_type, ""))
        # Without its own time a record is told apart by its whole content (a retry carries the same body).
        moment = timestamp or hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
        event_id = derived_event_id(PROVIDER_TYPE, [record_type, message_id, recipient, moment, url or ""])
    return DeliveryEvent(
        kind=kind,
        provider_type=PROVIDER_TYPE,
        provider_name=provider_name,
        recipient=recipient,
        occurred_at=authenticated.signed_at,
        event_id=event_id,
        provider_message_id=message_id,
        message_id=our_id,
        tenant_id=_text(metadata.get(ESP_TENANT_ID_VARIABLE)),
        bounce_type=bounce_type,
        reason=reason,
        diagnostic=diagnostic,
        url=url,
        raw=record,
    )


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, dict | list):
        return None
    text = str(value).strip()
    return text or None


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedWebhook("postmark webhook body is not JSON", authentic=True) from exc
    if not isinstance(payload, dict):
        raise MalformedWebhook("postmark webhook body is not a JSON object", authentic=True)
    return payload


def create_handler(context: HandlerContext) -> PostmarkWebhookHandler:
    """Build the Postmark handler (it needs nothing from the context)."""
    return PostmarkWebhookHandler()
