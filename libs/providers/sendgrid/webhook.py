"""SendGrid Event Webhook: ECDSA (P-256, SHA-256) signature check and event parsing.

Secrets (``secrets`` mapping keys):
    ``verification_key``: the Signed Event Webhook's public key as SendGrid shows it, base64 DER
    SubjectPublicKeyInfo without PEM armour (a PEM block is accepted too).

SendGrid signs the bytes of the ``X-Twilio-Email-Event-Webhook-Timestamp`` header followed by the raw body;
the signature (base64 DER ECDSA) is in ``X-Twilio-Email-Event-Webhook-Signature``. The body is only parsed
after the signature verifies. It is a JSON array of events; custom args come back as top-level keys.

Every item of the batch stands on its own: an item that cannot be read (not an object, no event name, no
recipient) is a :class:`~libs.providers.webhook_model.MalformedItem` kept beside the good events, and the
request is still answered 2xx, since SendGrid re-sends a refused batch whole. Fields the reference lists but
real events leave out are tolerated: ``sg_event_id`` (absent from older and some ``dropped`` events: an id is
derived from the event's content), ``sg_message_id`` (absent from some ``bounce`` events, and on ``dropped``
events it can be a relay-node id starting with ``filter`` that no send call ever returned: then there is no
provider message id, and the event is matched by our message id from the custom args), ``timestamp`` (the
signed time instead) and a bounce's ``type`` (``blocked`` when its status is 4.x.x).

Freshness window: 5 minutes either side of now, by default; SendGrid documents none (the common choice of
Standard Webhooks and other receivers). Replay key: a hash of timestamp + body, the signed content itself
(not the signature, since an ECDSA signature can be re-encoded into a second valid one).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from libs.providers.events import (
    ESP_MESSAGE_ID_VARIABLE,
    ESP_TENANT_ID_VARIABLE,
    BounceType,
    DeliveryEvent,
    EventKind,
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
    WebhookConfigurationError,
    WebhookRequest,
)

__all__ = [
    "SendGridWebhookHandler",
    "create_handler",
    "send_message_id",
]

PROVIDER_TYPE = "sendgrid"
SECRET_VERIFICATION_KEY = "verification_key"
SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
DEFAULT_TOLERANCE = timedelta(minutes=5)

_SIMPLE_KINDS = {
    "delivered": EventKind.DELIVERED,
    "deferred": EventKind.DEFERRED,
    "dropped": EventKind.REJECTED,
    "open": EventKind.OPENED,
    "click": EventKind.CLICKED,
    "spamreport": EventKind.COMPLAINED,
    "unsubscribe": EventKind.UNSUBSCRIBED,
    "group_unsubscribe": EventKind.UNSUBSCRIBED,
}


@lru_cache(maxsize=64)
def load_verification_key(verification_key: str) -> ec.EllipticCurvePublicKey:
    """Load SendGrid's verification key (base64 DER SPKI, or PEM) as a P-256 public key.

    Raises:
        WebhookConfigurationError: the key is not a P-256 public key.
    """
    try:
        if "BEGIN PUBLIC KEY" in verification_key:
            key = serialization.load_pem_public_key(verification_key.encode())
        else:
            key = serialization.load_der_public_key(base64.b64decode(verification_key, validate=True))
    except (ValueError, binascii.Error) as exc:
        raise WebhookConfigurationError("sendgrid verification_key is not a base64 DER public key") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise WebhookConfigurationError("sendgrid verification_key is not a P-256 (prime256v1) key")
    return key


class SendGridWebhookHandler:
    """Authenticates and parses SendGrid's signed Event Webhook."""

    provider_type = PROVIDER_TYPE
    default_tolerance = DEFAULT_TOLERANCE

    async def authenticate(self, request: WebhookRequest) -> AuthenticatedWebhook:
        """Verify the ECDSA signature over timestamp + raw body, then parse the body."""
        public_key = load_verification_key(request.secret(SECRET_VERIFICATION_KEY))
        signature_b64 = request.header(SIGNATURE_HEADER)
        timestamp = request.header(TIMESTAMP_HEADER)
        if not signature_b64 or not timestamp:
            raise SignatureMissing(f"sendgrid webhook lacks {SIGNATURE_HEADER} or {TIMESTAMP_HEADER}")
        try:
            signature = base64.b64decode(signature_b64, validate=True)
        except (ValueError, binascii.Error) as exc:
            raise SignatureInvalid("sendgrid signature is not base64") from exc
        signed_content = timestamp.encode() + request.body
        try:
            public_key.verify(signature, signed_content, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature as exc:
            raise SignatureInvalid("sendgrid signature does not verify with the verification key") from exc
        try:
            signed_at = utc_from_epoch(int(timestamp))
        except (ValueError, OverflowError) as exc:
            raise MalformedWebhook(
                f"sendgrid timestamp header is not epoch seconds: {timestamp!r}", authentic=True
            ) from exc
        try:
            payload = json.loads(request.body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise MalformedWebhook("sendgrid webhook body is not JSON", authentic=True) from exc
        if isinstance(payload, dict):
            payload = [payload]  # one event posted on its own (test tools do this); read it as a batch of one
        if not isinstance(payload, list):
            raise MalformedWebhook("sendgrid webhook body is not a JSON array", authentic=True)
        replay_key = f"sha256:{hashlib.sha256(signed_content).hexdigest()}"
        return AuthenticatedWebhook(signed_at=signed_at, replay_key=replay_key, payload=payload)

    def parse(self, request: WebhookRequest, authenticated: AuthenticatedWebhook) -> ParseResult:
        """One normalised event per tracked SendGrid event (``processed`` and the like yield none)."""
        events: list[DeliveryEvent] = []
        malformed: list[MalformedItem] = []
        for index, item in enumerate(authenticated.payload):
            if not isinstance(item, dict):
                malformed.append(MalformedItem(item, "sendgrid batch item is not an object", index))
                continue
            try:
                event = _event(request.provider_name, item, authenticated.signed_at)
            except (KeyError, TypeError, ValueError, OverflowError) as exc:
                malformed.append(MalformedItem(item, f"sendgrid event unreadable: {exc}", index))
                continue
            if event is not None:
                events.append(event)
        return ParsedWebhook(events, malformed)


def _event(provider_name: str, data: dict[str, Any], signed_at: datetime) -> DeliveryEvent | None:
    name = data.get("event")
    if not isinstance(name, str) or not name:
        raise ValueError("no event name")
    bounce_type: BounceType | None = None
    if name in _SIMPLE_KINDS:
        kind = _SIMPLE_KINDS[name]
    elif name == "bounce":
        kind = EventKind.BOUNCED
        # "blocked" is the receiving server refusing for reasons unrelated to the address (reputation,
        # content); only "bounce" says the address is bad.
        bounce_type = BounceType.SOFT if _bounce_type(data) == "blocked" else BounceType.HARD
    else:
        return None
    recipient = _text(data.get("email"))
    if recipient is None:
        raise ValueError(f"{name} event names no recipient")
    sg_message_id = _text(data.get("sg_message_id"))
    raw_timestamp = data.get("timestamp")
    occurred_at = utc_from_epoch(float(raw_timestamp)) if raw_timestamp is not None else signed_at
    url = _text(data.get("url")) if kind is EventKind.CLICKED else None
    event_id = _text(data.get("sg_event_id")) or derived_event_id(
        PROVIDER_TYPE,
        [name, sg_message_id or "", _text(data.get("smtp-id")) or "", recipient,
         raw_timestamp if raw_timestamp is not None else signed_at.isoformat(),
         _text(data.get("reason")) or "", url or ""],
    )
    return DeliveryEvent(
        kind=kind,
        provider_type=PROVIDER_TYPE,
        provider_name=provider_name,
        recipient=recipient,
        occurred_at=occurred_at,
        event_id=event_id,
        provider_message_id=send_message_id(sg_message_id) if sg_message_id else None,
        message_id=_text(data.get(ESP_MESSAGE_ID_VARIABLE)),
        tenant_id=_text(data.get(ESP_TENANT_ID_VARIABLE)),
        bounce_type=bounce_type,
        reason=_text(data.get("reason")),
        diagnostic=_text(data.get("response")) or _text(data.get("status")),
        url=url,
        raw=data,
    )


def _bounce_type(data: dict[str, Any]) -> str:
    declared = _text(data.get("type"))
    if declared:
        return declared
    return "blocked" if str(data.get("status") or "").startswith("4") else "bounce"


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, dict | list):
        return None
    text = str(value).strip()
    return text or None


def send_message_id(sg_message_id: str) -> str | None:
    """The ``X-Message-Id`` the send call returned, from a per-recipient ``sg_message_id``; None if it has none.

    ``sg_message_id`` is ``<X-Message-Id>.<filter suffix>``. Current ids contain no dots, so the part before
    the first dot is the id; older ids did contain dots (``14c5d75ce93.dfd.64b469.filter0001…``), so a
    ``.filter`` marker, when present, takes precedence. An id that *starts* with ``filter`` (seen on ``dropped``
    events, which SendGrid may stamp with the filtering node's id alone) carries no ``X-Message-Id``: taking
    its first part would make up an id no send call returned.
    """
    if sg_message_id.startswith("filter"):
        return None
    prefix, marker, _ = sg_message_id.partition(".filter")
    return (prefix if marker else sg_message_id.split(".", 1)[0]) or None


def create_handler(context: HandlerContext) -> SendGridWebhookHandler:
    """Build the SendGrid handler (it needs nothing from the context)."""
    return SendGridWebhookHandler()
