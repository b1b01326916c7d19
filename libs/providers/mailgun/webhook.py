"""Mailgun delivery webhooks: HMAC-SHA256 signature check and event parsing.

Secrets (``secrets`` mapping keys):
    ``webhook_signing_key``: the domain's/account's *HTTP webhook signing key* (not the API key).

Mailgun posts one JSON event per request: ``{"signature": {"timestamp", "token", "signature"}, "event-data":
{...}}``. The signature is lowercase hex HMAC-SHA256(signing key, ``timestamp + token``); it does not cover
``event-data``, which is why the token is also a replay key. For subaccount domains Mailgun adds a
``parent-signature`` made with the primary account's key; either signature verifying is enough, so one key
can be configured per account. Legacy form-encoded webhooks are not supported (the JSON ones replaced them).

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
from datetime import timedelta
from typing import Any

from libs.providers.events import (
    ESP_MESSAGE_ID_VARIABLE,
    ESP_TENANT_ID_VARIABLE,
    BounceType,
    DeliveryEvent,
    EventKind,
    utc_from_epoch,
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
            raise MalformedWebhook(f"mailgun signature timestamp is not a number: {timestamp!r}") from exc
        return AuthenticatedWebhook(signed_at=signed_at, replay_key=f"token:{token}", payload=payload)

    def parse(self, request: WebhookRequest, authenticated: AuthenticatedWebhook) -> WebhookResult:
        """Turn ``event-data`` into at most one event (``accepted`` and unknown events yield none)."""
        event_data = authenticated.payload.get("event-data")
        if not isinstance(event_data, dict):
            raise MalformedWebhook("mailgun webhook has no event-data object")
        try:
            event = _event(request.provider_name, event_data)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise MalformedWebhook(f"mailgun event-data is incomplete: {exc!r}") from exc
        return [event] if event is not None else []


def _event(provider_name: str, data: dict[str, Any]) -> DeliveryEvent | None:
    name = data["event"]
    reason = data.get("reason") or None
    bounce_type: BounceType | None = None
    if name in _SIMPLE_KINDS:
        kind = _SIMPLE_KINDS[name]
    elif name == "failed":
        if data.get("severity") == "temporary":
            kind = EventKind.DEFERRED
        elif reason in _SUPPRESSION_REASONS:
            kind = EventKind.REJECTED
        else:
            kind = EventKind.BOUNCED
            bounce_type = BounceType.SOFT if reason in _SOFT_PERMANENT_REASONS else BounceType.HARD
    else:
        return None
    message = data.get("message") or {}
    headers = message.get("headers") or {}
    header_message_id = headers.get("message-id")
    user_variables = data.get("user-variables") or {}
    our_id = user_variables.get(ESP_MESSAGE_ID_VARIABLE)
    tenant_id = user_variables.get(ESP_TENANT_ID_VARIABLE)
    delivery_status = data.get("delivery-status") or {}
    diagnostic = delivery_status.get("description") or delivery_status.get("message") or None
    return DeliveryEvent(
        kind=kind,
        provider_type=PROVIDER_TYPE,
        provider_name=provider_name,
        recipient=str(data["recipient"]),
        occurred_at=utc_from_epoch(float(data["timestamp"])),
        event_id=str(data["id"]),
        # The send API returns the id in angle brackets; webhooks drop them. Put them back to match.
        provider_message_id=f"<{header_message_id}>" if header_message_id else None,
        message_id=str(our_id) if our_id else None,
        tenant_id=str(tenant_id) if tenant_id else None,
        bounce_type=bounce_type,
        reason=reason,
        diagnostic=diagnostic,
        url=data.get("url") if kind is EventKind.CLICKED else None,
        raw=data,
    )


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
