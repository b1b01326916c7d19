"""Mailgun delivery webhooks: HMAC-SHA256 signature check and event parsing.

Secrets (``secrets`` mapping keys):
    ``webhook_signing_key``: the domain's/account's *HTTP webhook signing key* (not the API key).

Mailgun posts one JSON event per request: ``{"signature": {"timestamp", "token", "signature"}, "event-data":
{...}}``. The signature is lowercase hex HMAC-SHA256(signing key, ``timestamp + token``); it does not cover
``event-data``, which is why the token is also a replay key. For subaccount domains Mailgun adds a
``parent-signature`` made with the primary account's key; either signature verifying is enough, so one key
can be configured per account. Legacy form-encoded webhooks are not supported: Mailgun made them read-only in
April 2023 and retired them in October 2023 (help.mailgun.com, "Legacy Webhooks").

Mailgun guarantees only ``event`` and ``timestamp`` in an event; everything else may be missing, so:

* the recipient is ``recipient``, else (a ``rejected`` event has none: Mailgun refused the whole request) every
  address of the ``To`` header in ``message.headers``, else ``message.recipients``, else ``envelope.targets``;
  a ``rejected`` event yields one event per such address;
* an event without ``id`` (older events have none) gets one derived from its content, stable across retries;
* an event without ``timestamp`` happened when it was signed;
* a ``failed`` event without ``severity`` is temporary when its SMTP code is 4xx, permanent otherwise.

An ``event-data`` that still cannot be read (no event name, nobody it is about, nothing to match it by) is a
:class:`~libs.providers.webhook_model.MalformedItem`: kept for inspection and answered 2xx, since Mailgun's
retries would carry the same payload.

Freshness window: 15 minutes either side of now, by default. Mailgun's documentation recommends checking the
timestamp without giving a number; receivers with a 5-minute window report rejecting genuine webhooks that
Mailgun posted late under load (beyondcode/laravel-mailbox#93, fixed by 10 minutes), so 15 minutes leaves a
margin while keeping the token cache (one Redis key per webhook for the window) small. Whether Mailgun
re-signs its retries (it retries for up to 8 hours) is not documented; raise the window through
``WebhookVerifier(tolerances={"mailgun": ...})`` if retries are seen rejected as stale.
"""

from __future__ import annotations

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
    addresses_in,
    derived_event_id,
    utc_from_epoch,
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
    "MailgunWebhookHandler",
    "create_handler",
]

PROVIDER_TYPE = "mailgun"
SECRET_SIGNING_KEY = "webhook_signing_key"
DEFAULT_TOLERANCE = timedelta(minutes=15)

# Permanent failures whose reason says Mailgun never tried to deliver (the address is on its suppression
# lists): that is a rejection by the provider, not a bounce from the recipient's server.
_SUPPRESSION_REASONS = frozenset({"suppress-bounce", "suppress-unsubscribe", "suppress-complaint"})
# Permanent failures that say nothing about the address itself, so they must not suppress it.
_SOFT_PERMANENT_REASONS = frozenset({"old", "espblock"})
_SIMPLE_KINDS = {
    "delivered": EventKind.DELIVERED,
    "opened": EventKind.OPENED,
    "clicked": EventKind.CLICKED,
    "unsubscribed": EventKind.UNSUBSCRIBED,
    "complained": EventKind.COMPLAINED,
    "rejected": EventKind.REJECTED,
}


def mailgun_signature(signing_key: str, timestamp: str, token: str) -> str:
    """The signature Mailgun computes: lowercase hex HMAC-SHA256 of ``timestamp + token``."""
    return hmac.new(signing_key.encode(), f"{timestamp}{token}".encode(), hashlib.sha256).hexdigest()


class MailgunWebhookHandler:
    """Authenticates and parses Mailgun's JSON webhooks."""

    provider_type = PROVIDER_TYPE
    default_tolerance = DEFAULT_TOLERANCE

    async def authenticate(self, request: WebhookRequest) -> AuthenticatedWebhook:
        """Check ``signature`` (or ``parent-signature``) against the webhook signing key."""
        signing_key = request.secret(SECRET_SIGNING_KEY)
        # The signature travels inside the JSON body, so the body has to be parsed to find it.
        payload = _json_object(request.body)
        signature_block = payload.get("signature")
        if not isinstance(signature_block, dict):
            raise SignatureMissing("mailgun webhook has no signature block")
        timestamp = signature_block.get("timestamp")
        token = signature_block.get("token")
        candidates = [signature_block.get("signature"), signature_block.get("parent-signature")]
        provided = [value for value in candidates if isinstance(value, str) and value]
        if not isinstance(timestamp, str | int) or not isinstance(token, str) or not token or not provided:
            raise SignatureMissing("mailgun signature block lacks timestamp, token or signature")
        expected = mailgun_signature(signing_key, str(timestamp), token).encode()
        # Compare every candidate (no early exit) in constant time.
        verified = False
        for value in provided:
            verified |= hmac.compare_digest(expected, value.encode("utf-8", "replace"))
        if not verified:
            raise SignatureInvalid("mailgun signature does not match the webhook signing key")
        try:
            signed_at = utc_from_epoch(float(timestamp))
        except (ValueError, OverflowError) as exc:
            raise MalformedWebhook(
                f"mailgun signature timestamp is not a number: {timestamp!r}", authentic=True
            ) from exc
        return AuthenticatedWebhook(signed_at=signed_at, replay_key=f"token:{token}", payload=payload)

    def parse(self, request: WebhookRequest, authenticated: AuthenticatedWebhook) -> ParseResult:
        """Turn ``event-data`` into events (``accepted`` and unknown events yield none)."""
        event_data = authenticated.payload.get("event-data")
        if not isinstance(event_data, dict):
            raise MalformedWebhook("mailgun webhook has no event-data object")
        try:
            events = _events(request.provider_name, event_data, authenticated.signed_at)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            return ParsedWebhook([], [MalformedItem(event_data, f"mailgun event-data unreadable: {exc}")])
        return ParsedWebhook(events)


def _events(provider_name: str, data: dict[str, Any], signed_at: datetime) -> list[DeliveryEvent]:
    name = data.get("event")
    if not isinstance(name, str) or not name:
        raise ValueError("no event name")
    reason = _text(data.get("reason"))
    diagnostic: str | None = None
    bounce_type: BounceType | None = None
    delivery_status = _mapping(data.get("delivery-status"))
    if name in _SIMPLE_KINDS:
        kind = _SIMPLE_KINDS[name]
    elif name == "failed":
        if _severity(data, delivery_status) == "temporary":
            kind = EventKind.DEFERRED
        elif reason in _SUPPRESSION_REASONS:
            kind = EventKind.REJECTED
        else:
            kind = EventKind.BOUNCED
            bounce_type = BounceType.SOFT if reason in _SOFT_PERMANENT_REASONS else BounceType.HARD
    else:
        return []
    if kind is EventKind.REJECTED and name == "rejected":
        reject = _mapping(data.get("reject"))
        reason = _text(reject.get("reason")) or reason
        diagnostic = _text(reject.get("description"))
    diagnostic = diagnostic or _text(delivery_status.get("description")) or _text(delivery_status.get("message"))
    message = _mapping(data.get("message"))
    headers = _mapping(message.get("headers"))
    header_message_id = _text(headers.get("message-id"))
    user_variables = _mapping(data.get("user-variables"))
    our_id = _text(user_variables.get(ESP_MESSAGE_ID_VARIABLE))
    recipients = _recipients(data, message, headers)
    if not recipients:
        if not (header_message_id or our_id):
            raise ValueError("names no recipient and no message id")
        recipients = [""]  # still about a message we can find; the receiver may know its only recipient
    raw_timestamp = data.get("timestamp")
    occurred_at = utc_from_epoch(float(raw_timestamp)) if raw_timestamp is not None else signed_at
    url = _text(data.get("url")) if kind is EventKind.CLICKED else None
    provider_id = data.get("id")
    events = []
    for recipient in recipients:
        if provider_id and len(recipients) == 1:
            event_id = str(provider_id)
        else:
            parts = [provider_id or "", name, header_message_id or "", our_id or "", recipient,
                     raw_timestamp if raw_timestamp is not None else signed_at.isoformat(), reason or "", url or ""]
            event_id = derived_event_id(PROVIDER_TYPE, parts)
        events.append(
            DeliveryEvent(
                kind=kind,
                provider_type=PROVIDER_TYPE,
                provider_name=provider_name,
                recipient=recipient,
                occurred_at=occurred_at,
                event_id=event_id,
                # The send API returns the id in angle brackets; webhooks drop them. Put them back to match.
                provider_message_id=f"<{header_message_id.strip('<>')}>" if header_message_id else None,
                message_id=our_id,
                tenant_id=_text(user_variables.get(ESP_TENANT_ID_VARIABLE)),
                bounce_type=bounce_type,
                reason=reason,
                diagnostic=diagnostic,
                url=url,
                raw=data,
            )
        )
    return events


def _recipients(data: dict[str, Any], message: dict[str, Any], headers: dict[str, Any]) -> list[str]:
    recipient = _text(data.get("recipient"))
    if recipient:
        return [recipient]
    found = addresses_in(_text(headers.get("to")) or "")
    if not found:
        listed = message.get("recipients")
        found = [str(item) for item in listed if item] if isinstance(listed, list) else []
    if not found:
        found = addresses_in(_text(_mapping(data.get("envelope")).get("targets")) or "")
    return list(dict.fromkeys(found))


def _severity(data: dict[str, Any], delivery_status: dict[str, Any]) -> str:
    severity = _text(data.get("severity"))
    if severity:
        return severity.lower()
    code = str(delivery_status.get("code") or "")
    return "temporary" if code.startswith("4") else "permanent"


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, dict | list):
        return None
    text = str(value).strip()
    return text or None


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedWebhook(
            "mailgun webhook body is not JSON (legacy form webhooks are unsupported)"
        ) from exc
    if not isinstance(payload, dict):
        raise MalformedWebhook("mailgun webhook body is not a JSON object")
    return payload


def create_handler(context: HandlerContext) -> MailgunWebhookHandler:
    """Build the Mailgun handler (it needs nothing from the context)."""
    return MailgunWebhookHandler()
