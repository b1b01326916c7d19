"""SendGrid Event Webhook: ECDSA (P-256, SHA-256) signature check and event parsing.

Secrets (``secrets`` mapping keys):
    ``verification_key``: the Signed Event Webhook's public key as SendGrid shows it, base64 DER
    SubjectPublicKeyInfo without PEM armour (a PEM block is accepted too).

SendGrid signs the bytes of the ``X-Twilio-Email-Event-Webhook-Timestamp`` header followed by the raw body;
the signature (base64 DER ECDSA) is in ``X-Twilio-Email-Event-Webhook-Signature``. The body is only parsed
after the signature verifies. It is a JSON array of events; custom args come back as top-level keys.

Freshness window: 5 minutes either side of now, by default; SendGrid documents none (the common choice of
Standard Webhooks and other receivers). Replay key: a hash of timestamp + body, the signed content itself
(not the signature, since an ECDSA signature can be re-encoded into a second valid one).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from datetime import timedelta
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
    utc_from_epoch,
)
from libs.providers.webhook_model import (
    AuthenticatedWebhook,
    HandlerContext,
    MalformedWebhook,
    SignatureInvalid,
    SignatureMissing,
    WebhookConfigurationError,
    WebhookRequest,
    WebhookResult,
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
            raise MalformedWebhook(f"sendgrid timestamp header is not epoch seconds: {timestamp!r}") from exc
        try:
            payload = json.loads(request.body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise MalformedWebhook("sendgrid webhook body is not JSON") from exc
        if not isinstance(payload, list):
            raise MalformedWebhook("sendgrid webhook body is not a JSON array")
        replay_key = f"sha256:{hashlib.sha256(signed_content).hexdigest()}"
        return AuthenticatedWebhook(signed_at=signed_at, replay_key=replay_key, payload=payload)

    def parse(self, request: WebhookRequest, authenticated: AuthenticatedWebhook) -> WebhookResult:
        """One normalised event per tracked SendGrid event (``processed`` and the like yield none)."""
        events: list[DeliveryEvent] = []
        for item in authenticated.payload:
            if not isinstance(item, dict):
                raise MalformedWebhook("sendgrid webhook array holds a non-object")
            try:
                event = _event(request.provider_name, item)
            except (KeyError, TypeError, ValueError, OverflowError) as exc:
                raise MalformedWebhook(f"sendgrid event is incomplete: {exc!r}") from exc
            if event is not None:
                events.append(event)
        return events


def _event(provider_name: str, data: dict[str, Any]) -> DeliveryEvent | None:
    name = data["event"]
    bounce_type: BounceType | None = None
    if name in _SIMPLE_KINDS:
        kind = _SIMPLE_KINDS[name]
    elif name == "bounce":
        kind = EventKind.BOUNCED
        # "blocked" is the receiving server refusing for reasons unrelated to the address (reputation,
        # content); only "bounce" says the address is bad.
        bounce_type = BounceType.SOFT if data.get("type") == "blocked" else BounceType.HARD
    else:
        return None
    sg_message_id = data.get("sg_message_id")
    our_id = data.get(ESP_MESSAGE_ID_VARIABLE)
    return DeliveryEvent(
        kind=kind,
        provider_type=PROVIDER_TYPE,
        provider_name=provider_name,
        recipient=str(data["email"]),
        occurred_at=utc_from_epoch(int(data["timestamp"])),
        event_id=str(data["sg_event_id"]),
        provider_message_id=send_message_id(str(sg_message_id)) if sg_message_id else None,
        message_id=str(our_id) if our_id else None,
        tenant_id=str(data[ESP_TENANT_ID_VARIABLE]) if data.get(ESP_TENANT_ID_VARIABLE) else None,
        bounce_type=bounce_type,
        reason=data.get("reason") or None,
        diagnostic=data.get("response") or data.get("status") or None,
        url=data.get("url") if kind is EventKind.CLICKED else None,
        raw=data,
    )


def send_message_id(sg_message_id: str) -> str:
    """The ``X-Message-Id`` the send call returned, from a per-recipient ``sg_message_id``.

    ``sg_message_id`` is ``<X-Message-Id>.<filter suffix>``. Current ids contain no dots, so the part before
    the first dot is the id; older ids did contain dots (``14c5d75ce93.dfd.64b469.filter0001…``), so a
    ``.filter`` marker, when present, takes precedence.
    """
    prefix, marker, _ = sg_message_id.partition(".filter")
    return prefix if marker else sg_message_id.split(".", 1)[0]


def create_handler(context: HandlerContext) -> SendGridWebhookHandler:
    """Build the SendGrid handler (it needs nothing from the context)."""
    return SendGridWebhookHandler()
