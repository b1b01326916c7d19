"""Genuine signed delivery callbacks in each provider's wire format, for the provider simulator and tests.

Each ``<provider>_callback`` function takes a normalised :class:`~libs.providers.events.DeliveryEvent` (what
should be reported) plus the signing secrets, and returns the HTTP headers and body bytes the real provider
would POST. The signatures use the real algorithms (Mailgun HMAC-SHA256, SendGrid ECDSA P-256, SNS RSA
SHA1/SHA256, Postmark basic auth) and are built here independently of the verifiers in ``libs/providers``,
so a test that feeds one into the other checks both against the providers' documented formats.

Key material helpers: :func:`generate_sendgrid_key_pair` (verification key as base64 DER SPKI, the way
SendGrid shows it) and :func:`generate_sns_certificate` (a self-signed RSA certificate in PEM standing in for
the one SNS serves at ``SigningCertURL``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from libs.providers.events import (
    ESP_MESSAGE_ID_HEADER,
    ESP_MESSAGE_ID_VARIABLE,
    ESP_TENANT_ID_VARIABLE,
    BounceType,
    DeliveryEvent,
    EventKind,
)

SENDER = "sender@example.com"
SNS_ENDPOINT = "https://sns.us-east-1.amazonaws.com"


@dataclass(frozen=True)
class SignedCallback:
    """An HTTP request a provider would send: POST these headers and this body."""

    headers: dict[str, str]
    """Request headers (names as the provider spells them)."""
    body: bytes
    """The exact request body."""


@dataclass(frozen=True)
class SendGridKeyPair:
    """A Signed Event Webhook key pair."""

    private_key_pem: bytes
    """PKCS#8 PEM of the P-256 private key (SendGrid keeps this one)."""
    verification_key: str
    """Public key as base64 DER SubjectPublicKeyInfo without PEM armour, as SendGrid's settings show it."""


@dataclass(frozen=True)
class SnsSigningCertificate:
    """An RSA key and the self-signed certificate served at a ``SigningCertURL``."""

    private_key_pem: bytes
    """PKCS#8 PEM of the RSA private key."""
    certificate_pem: bytes
    """The X.509 certificate (PEM) holding the public key."""


# --------------------------------------------------------------------------------------------------- keys


def generate_sendgrid_key_pair() -> SendGridKeyPair:
    """A fresh P-256 key pair, public half encoded the way SendGrid hands out verification keys."""
    private_key = ec.generate_private_key(ec.SECP256R1())
    spki = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return SendGridKeyPair(
        private_key_pem=_pkcs8_pem(private_key), verification_key=base64.b64encode(spki).decode()
    )


def generate_sns_certificate(
    *,
    common_name: str = "sns.amazonaws.com",
    not_before: datetime | None = None,
    valid_for: timedelta = timedelta(days=365),
    key_size: int = 2048,
) -> SnsSigningCertificate:
    """A fresh RSA key and a self-signed certificate for it, valid from ``not_before`` (default: an hour ago)
    for ``valid_for``."""
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before = not_before or datetime.now(UTC) - timedelta(hours=1)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + valid_for)
        .sign(private_key, hashes.SHA256())
    )
    return SnsSigningCertificate(
        private_key_pem=_pkcs8_pem(private_key),
        certificate_pem=certificate.public_bytes(serialization.Encoding.PEM),
    )


# ------------------------------------------------------------------------------------------------ Mailgun


def mailgun_event_data(event: DeliveryEvent) -> dict[str, Any]:
    """Mailgun's ``event-data`` object for a normalised event."""
    data: dict[str, Any] = {
        "id": event.event_id,
        "timestamp": event.occurred_at.timestamp(),
        "log-level": "info",
        "recipient": event.recipient,
        "recipient-domain": event.recipient.rpartition("@")[2],
        "tags": [],
        "user-variables": _our_ids(event),
        "flags": {
            "is-routed": False,
            "is-authenticated": True,
            "is-system-test": False,
            "is-test-mode": False,
        },
        "message": {
            "headers": {
                "to": event.recipient,
                "from": SENDER,
                "subject": "Simulated message",
                "message-id": (event.provider_message_id or "").strip("<>"),
            },
            "attachments": [],
            "size": 1024,
        },
    }
    if event.kind is EventKind.BOUNCED:
        default_reason = "bounce" if event.bounce_type is BounceType.HARD else "old"
        data |= _mailgun_failure("permanent", event.reason or default_reason, 550, event.diagnostic)
    elif event.kind is EventKind.DEFERRED:
        data |= _mailgun_failure("temporary", event.reason or "generic", 452, event.diagnostic)
    elif event.kind is EventKind.REJECTED:
        data |= _mailgun_failure("permanent", event.reason or "suppress-bounce", 605, event.diagnostic)
    else:
        data["event"] = {
            EventKind.DELIVERED: "delivered",
            EventKind.OPENED: "opened",
            EventKind.CLICKED: "clicked",
            EventKind.UNSUBSCRIBED: "unsubscribed",
            EventKind.COMPLAINED: "complained",
        }[event.kind]
        if event.kind is EventKind.DELIVERED:
            data["delivery-status"] = {
                "code": 250,
                "message": "OK",
                "description": event.diagnostic or "",
                "attempt-no": 1,
            }
        if event.kind is EventKind.CLICKED:
            data["url"] = event.url
    return data


def sign_mailgun_payload(
    event_data: Mapping[str, Any], signing_key: str, *, timestamp: int | None = None, token: str | None = None
) -> SignedCallback:
    """Wrap ``event-data`` in a Mailgun webhook body signed with the webhook signing key."""
    timestamp_text = str(timestamp if timestamp is not None else int(datetime.now(UTC).timestamp()))
    token = token or secrets.token_hex(25)  # Mailgun's tokens are 50 characters
    signature = hmac.new(signing_key.encode(), (timestamp_text + token).encode(), hashlib.sha256).hexdigest()
    body = {
        "signature": {"timestamp": timestamp_text, "token": token, "signature": signature},
        "event-data": dict(event_data),
    }
    return SignedCallback(
        headers={"Content-Type": "application/json", "User-Agent": "mailgun/treq-16.12.0"},
        body=json.dumps(body).encode(),
    )


def mailgun_callback(
    event: DeliveryEvent, signing_key: str, *, timestamp: int | None = None, token: str | None = None
) -> SignedCallback:
    """A signed Mailgun webhook reporting ``event``."""
    return sign_mailgun_payload(mailgun_event_data(event), signing_key, timestamp=timestamp, token=token)


def _mailgun_failure(severity: str, reason: str, code: int, diagnostic: str | None) -> dict[str, Any]:
    return {
        "event": "failed",
        "log-level": "error" if severity == "permanent" else "warn",
        "severity": severity,
        "reason": reason,
        "delivery-status": {
            "code": code,
            "message": "",
            "description": diagnostic or "",
            "attempt-no": 1,
        },
    }


# ----------------------------------------------------------------------------------------------- SendGrid


def sendgrid_event(event: DeliveryEvent, *, sequence: int = 0) -> dict[str, Any]:
    """One SendGrid Event Webhook event object for a normalised event (custom args at top level)."""
    provider_message_id = event.provider_message_id or "simulated"
    data: dict[str, Any] = {
        "email": event.recipient,
        "timestamp": int(event.occurred_at.timestamp()),
        "smtp-id": f"<{provider_message_id}@geopod-ismtpd-3>",
        "sg_event_id": event.event_id,
        "sg_message_id": f"{provider_message_id}.filterdrecv-5645d9c87f-6r2ch-1-5F5FC1BC-{sequence}.0",
        "category": ["simulated"],
    }
    data |= _our_ids(event)  # custom args come back as top-level keys
    match event.kind:
        case EventKind.DELIVERED:
            data |= {"event": "delivered", "response": event.diagnostic or "250 OK", "ip": "168.1.1.1"}
        case EventKind.DEFERRED:
            data |= {
                "event": "deferred",
                "response": event.diagnostic or "400 try again later",
                "attempt": "1",
            }
        case EventKind.BOUNCED:
            data |= {
                "event": "bounce",
                "type": "bounce" if event.bounce_type is BounceType.HARD else "blocked",
                "reason": event.reason or "550 5.1.1 unknown recipient",
                "status": event.diagnostic or "5.1.1",
            }
        case EventKind.REJECTED:
            data |= {
                "event": "dropped",
                "reason": event.reason or "Bounced Address",
                "status": event.diagnostic,
            }
        case EventKind.OPENED:
            data |= {"event": "open", "useragent": "Mozilla/4.0", "ip": "255.255.255.255"}
        case EventKind.CLICKED:
            data |= {"event": "click", "url": event.url, "useragent": "Mozilla/4.0", "ip": "255.255.255.255"}
        case EventKind.COMPLAINED:
            data["event"] = "spamreport"
        case EventKind.UNSUBSCRIBED:
            data["event"] = "unsubscribe"
    return {key: value for key, value in data.items() if value is not None}


def sign_sendgrid_body(
    body: bytes, private_key_pem: bytes, *, timestamp: int | None = None
) -> SignedCallback:
    """Sign a raw SendGrid webhook body the way SendGrid does (ECDSA P-256/SHA-256 over timestamp + body)."""
    private_key = serialization.load_pem_private_key(private_key_pem, password=None)
    if not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise TypeError("a SendGrid signing key is an EC private key")
    timestamp_text = str(timestamp if timestamp is not None else int(datetime.now(UTC).timestamp()))
    signature = private_key.sign(timestamp_text.encode() + body, ec.ECDSA(hashes.SHA256()))
    return SignedCallback(
        headers={
            "Content-Type": "application/json",
            "User-Agent": "SendGrid Event API",
            "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
            "X-Twilio-Email-Event-Webhook-Timestamp": timestamp_text,
        },
        body=body,
    )


def sendgrid_callback(
    events: Sequence[DeliveryEvent], private_key_pem: bytes, *, timestamp: int | None = None
) -> SignedCallback:
    """A signed SendGrid Event Webhook POST carrying ``events`` as one JSON array."""
    body = json.dumps([sendgrid_event(event, sequence=index) for index, event in enumerate(events)]).encode()
    return sign_sendgrid_body(body, private_key_pem, timestamp=timestamp)


# -------------------------------------------------------------------------------------------- SES via SNS


SesForm = Literal["eventType", "notificationType"]
_IDENTITY_NOTIFICATION_KINDS = {
    EventKind.DELIVERED: "Delivery",
    EventKind.BOUNCED: "Bounce",
    EventKind.COMPLAINED: "Complaint",
}


def ses_message(event: DeliveryEvent, *, form: SesForm = "eventType") -> dict[str, Any]:
    """The SES event record (the SNS ``Message``) for a normalised event.

    ``form="eventType"`` is configuration-set event publishing; ``"notificationType"`` is the identity-level
    notification, which exists only for deliveries, bounces and complaints.
    """
    at = _ses_time(event.occurred_at)
    mail: dict[str, Any] = {
        "timestamp": at,
        "source": SENDER,
        "sourceArn": "arn:aws:ses:us-east-1:123456789012:identity/example.com",
        "sendingAccountId": "123456789012",
        "messageId": event.provider_message_id or "simulated",
        "destination": [event.recipient],
        "headersTruncated": False,
        "headers": [{"name": "From", "value": SENDER}, {"name": "To", "value": event.recipient}],
        "commonHeaders": {"from": [SENDER], "to": [event.recipient], "subject": "Simulated message"},
    }
    if event.message_id:
        mail["headers"].append({"name": ESP_MESSAGE_ID_HEADER, "value": event.message_id})
    if event.message_id or event.tenant_id:
        mail["tags"] = {name: [value] for name, value in _our_ids(event).items()}
        mail["tags"]["ses:configuration-set"] = ["esp"]
    record: dict[str, Any] = {"mail": mail}
    feedback_id = f"{event.event_id}-000000"
    match event.kind:
        case EventKind.DELIVERED:
            record["delivery"] = {
                "timestamp": at,
                "processingTimeMillis": 546,
                "recipients": [event.recipient],
                "smtpResponse": event.diagnostic or "250 ok dirdel",
                "reportingMTA": "a8-70.smtp-out.amazonses.com",
            }
            name = "Delivery"
        case EventKind.BOUNCED:
            default = "Permanent/General" if event.bounce_type is BounceType.HARD else "Transient/General"
            bounce_type, _, sub_type = (event.reason or default).partition("/")
            record["bounce"] = {
                "bounceType": bounce_type,
                "bounceSubType": sub_type or "General",
                "timestamp": at,
                "feedbackId": feedback_id,
                "reportingMTA": "dsn; e240-7.smtp-out.amazonses.com",
                "bouncedRecipients": [
                    {
                        "emailAddress": event.recipient,
                        "action": "failed",
                        "status": "5.1.1",
                        "diagnosticCode": event.diagnostic or "smtp; 550 5.1.1 user unknown",
                    }
                ],
            }
            name = "Bounce"
        case EventKind.COMPLAINED:
            record["complaint"] = {
                "complainedRecipients": [{"emailAddress": event.recipient}],
                "timestamp": at,
                "feedbackId": feedback_id,
                "userAgent": "Mozilla/5.0",
                "complaintFeedbackType": event.reason or "abuse",
                "arrivalDate": at,
            }
            name = "Complaint"
        case EventKind.DEFERRED:
            record["deliveryDelay"] = {
                "timestamp": at,
                "delayType": event.reason or "TransientCommunicationFailure",
                "expirationTime": _ses_time(event.occurred_at + timedelta(hours=12)),
                "delayedRecipients": [
                    {
                        "emailAddress": event.recipient,
                        "status": "4.4.1",
                        "diagnosticCode": event.diagnostic or "smtp; 421 4.4.1 try again later",
                    }
                ],
            }
            name = "DeliveryDelay"
        case EventKind.REJECTED:
            record["reject"] = {"reason": event.reason or "Bad content"}
            name = "Reject"
        case EventKind.OPENED:
            record["open"] = {"ipAddress": "192.0.2.1", "timestamp": at, "userAgent": "Mozilla/5.0"}
            name = "Open"
        case EventKind.CLICKED:
            record["click"] = {
                "ipAddress": "192.0.2.1",
                "timestamp": at,
                "userAgent": "Mozilla/5.0",
                "link": event.url,
                "linkTags": {},
            }
            name = "Click"
        case EventKind.UNSUBSCRIBED:
            record["subscription"] = {
                "contactList": event.reason or "esp-contacts",
                "timestamp": at,
                "source": "UnsubscribeHeader",
                "newTopicPreferences": {"unsubscribeAll": True, "topicSubscriptionStatus": []},
                "oldTopicPreferences": {"unsubscribeAll": False, "topicSubscriptionStatus": []},
            }
            name = "Subscription"
    if form == "notificationType":
        if event.kind not in _IDENTITY_NOTIFICATION_KINDS:
            raise ValueError(f"SES identity notifications have no {event.kind} type")
        record["notificationType"] = name
    else:
        record["eventType"] = name
    return record


def sign_sns_document(
    document: Mapping[str, Any],
    private_key_pem: bytes,
    cert_url: str,
    *,
    signature_version: Literal[1, 2] = 2,
) -> dict[str, Any]:
    """Add ``SignatureVersion``, ``SigningCertURL`` and ``Signature`` to an SNS document, as SNS does."""
    private_key = serialization.load_pem_private_key(private_key_pem, password=None)
    if not isinstance(private_key, rsa.RSAPrivateKey):
        raise TypeError("an SNS signing key is an RSA private key")
    if document["Type"] == "Notification":
        keys = ["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"]
    else:
        keys = ["Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"]
    canonical = "".join(f"{key}\n{document[key]}\n" for key in keys if key in document)
    algorithm = hashes.SHA1() if signature_version == 1 else hashes.SHA256()
    signature = private_key.sign(canonical.encode(), padding.PKCS1v15(), algorithm)
    return {
        **document,
        "SignatureVersion": str(signature_version),
        "Signature": base64.b64encode(signature).decode(),
        "SigningCertURL": cert_url,
    }


def sns_request(document: Mapping[str, Any]) -> SignedCallback:
    """The HTTP request SNS makes for a (signed) document: JSON body sent as text/plain, SNS headers."""
    headers = {
        "Content-Type": "text/plain; charset=UTF-8",
        "User-Agent": "Amazon Simple Notification Service Agent",
        "x-amz-sns-message-type": str(document["Type"]),
        "x-amz-sns-message-id": str(document["MessageId"]),
        "x-amz-sns-topic-arn": str(document["TopicArn"]),
    }
    if document["Type"] == "Notification":
        headers["x-amz-sns-subscription-arn"] = f"{document['TopicArn']}:{uuid.uuid4()}"
    return SignedCallback(headers=headers, body=json.dumps(document).encode())


def ses_callback(
    event: DeliveryEvent,
    private_key_pem: bytes,
    cert_url: str,
    topic_arn: str,
    *,
    signature_version: Literal[1, 2] = 2,
    published_at: datetime | None = None,
    sns_message_id: str | None = None,
    subject: str | None = None,
    form: SesForm = "eventType",
) -> SignedCallback:
    """A signed SNS notification carrying the SES record for ``event``."""
    document: dict[str, Any] = {
        "Type": "Notification",
        "MessageId": sns_message_id or str(uuid.uuid4()),
        "TopicArn": topic_arn,
        "Message": json.dumps(ses_message(event, form=form)),
        "Timestamp": _ses_time(published_at or datetime.now(UTC)),
        "UnsubscribeURL": f"{SNS_ENDPOINT}/?Action=Unsubscribe&SubscriptionArn={topic_arn}:x",
    }
    if subject is not None:
        document["Subject"] = subject
    return sns_request(
        sign_sns_document(document, private_key_pem, cert_url, signature_version=signature_version)
    )


def sns_subscription_confirmation(
    private_key_pem: bytes,
    cert_url: str,
    topic_arn: str,
    *,
    subscribe_url: str | None = None,
    token: str | None = None,
    published_at: datetime | None = None,
    signature_version: Literal[1, 2] = 2,
) -> SignedCallback:
    """A signed SNS ``SubscriptionConfirmation`` request for ``topic_arn``."""
    token = token or secrets.token_hex(64)
    document = {
        "Type": "SubscriptionConfirmation",
        "MessageId": str(uuid.uuid4()),
        "Token": token,
        "TopicArn": topic_arn,
        "Message": f"You have chosen to subscribe to the topic {topic_arn}.\n"
        "To confirm the subscription, visit the SubscribeURL included in this message.",
        "SubscribeURL": subscribe_url
        or f"{SNS_ENDPOINT}/?Action=ConfirmSubscription&TopicArn={topic_arn}&Token={token}",
        "Timestamp": _ses_time(published_at or datetime.now(UTC)),
    }
    return sns_request(
        sign_sns_document(document, private_key_pem, cert_url, signature_version=signature_version)
    )


def _ses_time(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ----------------------------------------------------------------------------------------------- Postmark


_POSTMARK_TYPE_CODES = {
    "HardBounce": 1,
    "Transient": 2,
    "DnsError": 256,
    "SpamNotification": 512,
    "SoftBounce": 4096,
    "BadEmailAddress": 100000,
    "SpamComplaint": 100001,
    "ManuallyDeactivated": 100002,
    "Unconfirmed": 100003,
    "Blocked": 100006,
    "DMARCPolicy": 100009,
}


def postmark_record(event: DeliveryEvent) -> dict[str, Any]:
    """The Postmark webhook record for a normalised event.

    Raises:
        ValueError: for ``deferred``: Postmark reports no deferrals (transient failures arrive as bounces).
    """
    at = event.occurred_at.astimezone(UTC).isoformat().replace("+00:00", "Z")
    common: dict[str, Any] = {
        "MessageID": event.provider_message_id,
        "ServerID": 23,
        "MessageStream": "outbound",
        "Tag": "simulated",
        "Metadata": _our_ids(event),
    }
    client = {"Name": "Chrome 35.0.1916.153", "Company": "Google", "Family": "Chrome"}
    match event.kind:
        case EventKind.DELIVERED:
            return {
                "RecordType": "Delivery",
                **common,
                "Recipient": event.recipient,
                "DeliveredAt": at,
                "Details": event.diagnostic or "smtp;250 2.0.0 OK",
            }
        case EventKind.BOUNCED | EventKind.REJECTED | EventKind.COMPLAINED:
            record_type = "Bounce"
            if event.kind is EventKind.COMPLAINED:
                bounce_type = record_type = "SpamComplaint"
            elif event.kind is EventKind.REJECTED:
                bounce_type = event.reason or "DMARCPolicy"
            else:
                bounce_type = event.reason or (
                    "HardBounce" if event.bounce_type is BounceType.HARD else "SoftBounce"
                )
            return {
                "RecordType": record_type,
                **common,
                "ID": int(hashlib.sha256(event.event_id.encode()).hexdigest()[:12], 16),
                "Type": bounce_type,
                # Postmark's own spam-complaint example carries 512 here; parsers must not rely on it.
                "TypeCode": 512
                if record_type == "SpamComplaint"
                else _POSTMARK_TYPE_CODES.get(bounce_type, 2048),
                "Name": bounce_type,
                "Description": "Simulated",
                "Details": event.diagnostic or "",
                "Email": event.recipient,
                "From": SENDER,
                "BouncedAt": at,
                "DumpAvailable": False,
                "Inactive": event.kind is not EventKind.BOUNCED or event.bounce_type is BounceType.HARD,
                "CanActivate": True,
                "Subject": "Simulated message",
                "Content": "",
            }
        case EventKind.OPENED:
            return {
                "RecordType": "Open",
                **common,
                "FirstOpen": True,
                "Client": client,
                "OS": {"Name": "OS X 10.7 Lion", "Company": "Apple", "Family": "OS X"},
                "Platform": "WebMail",
                "UserAgent": "Mozilla/5.0",
                "ReadSeconds": 5,
                "Geo": {},
                "Recipient": event.recipient,
                "ReceivedAt": at,
            }
        case EventKind.CLICKED:
            return {
                "RecordType": "Click",
                **common,
                "ClickLocation": "HTML",
                "Client": client,
                "OS": {"Name": "OS X", "Company": "Apple", "Family": "OS X"},
                "Platform": "Desktop",
                "UserAgent": "Mozilla/5.0",
                "OriginalLink": event.url,
                "Geo": {},
                "Recipient": event.recipient,
                "ReceivedAt": at,
            }
        case EventKind.UNSUBSCRIBED:
            return {
                "RecordType": "SubscriptionChange",
                **common,
                "ChangedAt": at,
                "Recipient": event.recipient,
                "Origin": "Recipient",
                "SuppressSending": True,
                "SuppressionReason": event.reason or "ManualSuppression",
            }
        case EventKind.DEFERRED:
            raise ValueError("postmark reports no deferrals; transient failures arrive as soft bounces")
    raise ValueError(f"unhandled event kind {event.kind}")


def sign_postmark_payload(record: Mapping[str, Any], user: str, password: str) -> SignedCallback:
    """A Postmark webhook POST of ``record`` with the basic-auth credentials from the webhook URL."""
    credentials = base64.b64encode(f"{user}:{password}".encode()).decode()
    return SignedCallback(
        headers={
            "Content-Type": "application/json",
            "User-Agent": "Postmark",
            "Authorization": f"Basic {credentials}",
        },
        body=json.dumps(dict(record)).encode(),
    )


def postmark_callback(event: DeliveryEvent, user: str, password: str) -> SignedCallback:
    """An authenticated Postmark webhook reporting ``event``."""
    return sign_postmark_payload(postmark_record(event), user, password)


def _our_ids(event: DeliveryEvent) -> dict[str, str]:
    """Our ids as the send side stores them in provider custom data (only those the event has)."""
    ids = {ESP_MESSAGE_ID_VARIABLE: event.message_id, ESP_TENANT_ID_VARIABLE: event.tenant_id}
    return {name: value for name, value in ids.items() if value}


def _pkcs8_pem(private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
