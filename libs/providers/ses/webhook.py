"""Amazon SES event notifications delivered through SNS (HTTP/S subscription).

Secrets (``secrets`` mapping keys):
    ``topic_arns``: the SNS topic ARNs this provider may post from, separated by commas or whitespace.

Verification follows AWS's "Verifying the signatures of Amazon SNS messages":

* ``SigningCertURL`` must be ``https``, end in ``.pem`` and be on a host matching
  ``^sns\\.[a-zA-Z0-9\\-]{3,}\\.amazonaws\\.com(\\.cn)?$`` (the pattern of AWS's own
  validators); it is checked *before* anything is fetched, then fetched through an injectable
  :class:`~libs.providers.webhooks.CertificateFetcher` and cached by URL;
* the string to sign is ``Key\\nValue\\n`` for each present key, in the documented order (Notification:
  Message, MessageId, Subject, Timestamp, TopicArn, Type; confirmations: Message, MessageId, SubscribeURL,
  Timestamp, Token, TopicArn, Type); ``SignatureVersion`` 1 is SHA1withRSA, 2 is SHA256withRSA;
* ``TopicArn`` must be on the allow-list.

Raw message delivery must stay off: without the envelope there is no signature (``SignatureMissing``).

Freshness window: 65 minutes either side of now, by default. ``Timestamp`` is when SNS published the
notification and SNS re-sends the same signed document on every retry; an HTTP/S delivery policy can retry for
at most 3,600 s (a hard SNS limit), plus 5 minutes of clock skew. Replay key: the SNS ``MessageId``.

``Message`` is parsed in both forms: event publishing (``eventType``: Send, Reject, Bounce, Complaint,
Delivery, Open, Click, Rendering Failure, DeliveryDelay, Subscription) and identity notifications
(``notificationType``: Bounce, Complaint, Delivery). SES reserves the right to add fields and real records
leave out some the examples show, so the parser tolerates what it can do without:

* an event object without its own ``timestamp`` happened when SNS published it (the envelope's signed
  ``Timestamp``), else when the email was sent (``mail.timestamp``); Reject, Rendering Failure and Send are
  dated by ``mail.timestamp``, which is theirs;
* a bounce, complaint, delivery or delay without its recipient list is about every ``mail.destination``;
  a recipient given as a bare address string is read like one given as ``{"emailAddress": ...}``;
* a bounce without ``bounceType`` is ``Undetermined`` (soft: it must not suppress the address);
* without ``mail.messageId`` the event is matched by our own message id (tags or header).

A ``Message`` that is JSON but still cannot be read is a :class:`~libs.providers.webhook_model.MalformedItem`
(kept for inspection, answered 2xx: SNS would retry the same document); one that is not JSON at all refuses
the request as malformed.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections import OrderedDict
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from libs.providers.events import (
    ESP_MESSAGE_ID_HEADER,
    ESP_MESSAGE_ID_VARIABLE,
    ESP_TENANT_ID_VARIABLE,
    BounceType,
    DeliveryEvent,
    EventKind,
    derived_event_id,
    header_value,
    utc_from_iso,
)
from libs.providers.webhook_model import (
    AuthenticatedWebhook,
    CertificateFetcher,
    CertificateUnavailable,
    HandlerContext,
    MalformedItem,
    MalformedWebhook,
    ParsedWebhook,
    ParseResult,
    SignatureInvalid,
    SignatureMissing,
    SubscriptionConfirmation,
    WebhookRequest,
)

__all__ = [
    "HttpxCertificateFetcher",
    "SesWebhookHandler",
    "StaticCertificateFetcher",
    "create_handler",
    "string_to_sign",
    "validate_signing_cert_url",
]

PROVIDER_TYPE = "ses"
SECRET_TOPIC_ARNS = "topic_arns"
DEFAULT_TOLERANCE = timedelta(minutes=65)

NOTIFICATION = "Notification"
SUBSCRIPTION_CONFIRMATION = "SubscriptionConfirmation"
UNSUBSCRIBE_CONFIRMATION = "UnsubscribeConfirmation"

#: Keys of the string to sign, in order, per message type (absent optional keys are skipped).
SIGNED_KEYS: Mapping[str, tuple[str, ...]] = {
    NOTIFICATION: ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    SUBSCRIPTION_CONFIRMATION: (
        "Message",
        "MessageId",
        "SubscribeURL",
        "Timestamp",
        "Token",
        "TopicArn",
        "Type",
    ),
    UNSUBSCRIBE_CONFIRMATION: (
        "Message",
        "MessageId",
        "SubscribeURL",
        "Timestamp",
        "Token",
        "TopicArn",
        "Type",
    ),
}
_OPTIONAL_SIGNED_KEYS = frozenset({"Subject"})
_SIGNATURE_HASHES: Mapping[str, type[hashes.HashAlgorithm]] = {"1": hashes.SHA1, "2": hashes.SHA256}
_CERT_HOST_PATTERN = re.compile(r"^sns\.[a-zA-Z0-9\-]{3,}\.amazonaws\.com(\.cn)?$")
_MAX_CERTIFICATE_BYTES = 64 * 1024


def string_to_sign(document: Mapping[str, Any]) -> bytes:
    """Build SNS's canonical string to sign for a notification or confirmation document.

    Raises:
        MalformedWebhook: unknown ``Type`` or a required key missing / not a string.
    """
    message_type = document.get("Type")
    keys = SIGNED_KEYS.get(message_type) if isinstance(message_type, str) else None
    if keys is None:
        raise MalformedWebhook(f"unknown SNS message Type {message_type!r}")
    lines: list[str] = []
    for key in keys:
        value = document.get(key)
        if value is None and key in _OPTIONAL_SIGNED_KEYS:
            continue
        if not isinstance(value, str):
            raise MalformedWebhook(f"SNS {message_type} lacks string field {key!r}")
        lines.append(f"{key}\n{value}\n")
    return "".join(lines).encode()


def validate_signing_cert_url(url: str) -> None:
    """Refuse any ``SigningCertURL`` that is not an HTTPS ``.pem`` on an SNS host.

    Raises:
        SignatureInvalid: the URL is not one SNS would use.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise SignatureInvalid(f"SigningCertURL is not a URL: {url!r}") from exc
    if parts.scheme != "https":
        raise SignatureInvalid(f"SigningCertURL is not https: {url!r}")
    if parts.username is not None or parts.password is not None or port not in (None, 443):
        raise SignatureInvalid(f"SigningCertURL has credentials or an unusual port: {url!r}")
    if not _CERT_HOST_PATTERN.match(parts.hostname or ""):
        raise SignatureInvalid(f"SigningCertURL host is not an SNS host: {url!r}")
    if not parts.path.endswith(".pem") or parts.query or parts.fragment:
        raise SignatureInvalid(f"SigningCertURL does not name a .pem file: {url!r}")


class HttpxCertificateFetcher:
    """Fetches SNS signing certificates over HTTPS with httpx (no redirects, size-capped)."""

    def __init__(self, client: httpx.AsyncClient | None = None, *, timeout_s: float = 5.0) -> None:
        """Use ``client`` if given (its lifetime is the caller's), else a short-lived client per fetch."""
        self._client = client
        self._timeout_s = timeout_s

    async def fetch(self, url: str) -> bytes:
        """GET the certificate; network errors and non-200 answers raise :class:`CertificateUnavailable`."""
        try:
            if self._client is not None:
                response = await self._client.get(url, follow_redirects=False, timeout=self._timeout_s)
            else:
                async with httpx.AsyncClient(timeout=self._timeout_s) as client:
                    response = await client.get(url, follow_redirects=False)
        except httpx.HTTPError as exc:
            raise CertificateUnavailable(f"cannot fetch {url}: {exc!r}") from exc
        if response.status_code != 200:
            raise CertificateUnavailable(f"cannot fetch {url}: HTTP {response.status_code}")
        if len(response.content) > _MAX_CERTIFICATE_BYTES:
            raise CertificateUnavailable(f"certificate at {url} is implausibly large")
        return response.content


class StaticCertificateFetcher:
    """Serves certificates from memory by URL: for the provider simulator in development, and tests.

    The URL still has to pass :func:`validate_signing_cert_url` before it is asked for.
    """

    def __init__(self, certificates: Mapping[str, bytes]) -> None:
        """``certificates`` maps a SigningCertURL to PEM bytes."""
        self._certificates = dict(certificates)
        self.requested_urls: list[str] = []
        """Every URL asked for, in order (lets tests see the cache working)."""

    async def fetch(self, url: str) -> bytes:
        """The PEM registered for ``url``; unknown URLs raise :class:`CertificateUnavailable`."""
        self.requested_urls.append(url)
        try:
            return self._certificates[url]
        except KeyError:
            raise CertificateUnavailable(f"no certificate registered for {url}") from None


class SesWebhookHandler:
    """Authenticates SNS envelopes and parses the SES events inside them."""

    provider_type = PROVIDER_TYPE
    default_tolerance = DEFAULT_TOLERANCE

    def __init__(self, certificate_fetcher: CertificateFetcher, *, max_cached_certificates: int = 32) -> None:
        """Fetch signing certificates with ``certificate_fetcher`` and keep the last few in memory."""
        self._certificate_fetcher = certificate_fetcher
        self._certificates: OrderedDict[str, x509.Certificate] = OrderedDict()
        self._max_cached_certificates = max_cached_certificates

    async def authenticate(self, request: WebhookRequest) -> AuthenticatedWebhook:
        """Check topic, certificate URL, certificate and RSA signature of the SNS envelope."""
        allowed_topics = set(re.split(r"[\s,]+", request.secret(SECRET_TOPIC_ARNS).strip())) - {""}
        if (request.header("x-amz-sns-rawdelivery") or "").lower() == "true":
            raise SignatureMissing("SNS raw message delivery carries no signature; turn it off")
        document = _json_object(request.body, "SNS envelope")
        signature_b64 = document.get("Signature")
        cert_url = document.get("SigningCertURL")
        version = document.get("SignatureVersion")
        if not isinstance(signature_b64, str) or not signature_b64 or not isinstance(cert_url, str):
            raise SignatureMissing("SNS message lacks Signature or SigningCertURL")
        hash_algorithm = _SIGNATURE_HASHES.get(str(version))
        if hash_algorithm is None:
            raise SignatureInvalid(f"unsupported SNS SignatureVersion {version!r}")
        if document.get("TopicArn") not in allowed_topics:
            raise SignatureInvalid(f"unexpected TopicArn {document.get('TopicArn')!r}")
        validate_signing_cert_url(cert_url)
        signed = string_to_sign(document)
        try:
            signature = base64.b64decode(signature_b64, validate=True)
        except (ValueError, binascii.Error) as exc:
            raise SignatureInvalid("SNS Signature is not base64") from exc
        certificate = await self._certificate(cert_url)
        if not certificate.not_valid_before_utc <= request.now <= certificate.not_valid_after_utc:
            raise SignatureInvalid(f"SNS signing certificate at {cert_url} is not valid now")
        public_key = certificate.public_key()
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise SignatureInvalid("SNS signing certificate does not hold an RSA key")
        try:
            public_key.verify(signature, signed, padding.PKCS1v15(), hash_algorithm())
        except InvalidSignature as exc:
            raise SignatureInvalid("SNS signature does not verify with the signing certificate") from exc
        try:
            signed_at = utc_from_iso(str(document["Timestamp"]))
        except ValueError as exc:
            raise MalformedWebhook(
                f"SNS Timestamp is not ISO 8601: {document['Timestamp']!r}", authentic=True
            ) from exc
        return AuthenticatedWebhook(
            signed_at=signed_at, replay_key=f"sns:{document['MessageId']}", payload=document
        )

    def parse(self, request: WebhookRequest, authenticated: AuthenticatedWebhook) -> ParseResult:
        """A confirmation, or the SES events inside a notification's ``Message``."""
        document: dict[str, Any] = authenticated.payload
        message_type = document["Type"]
        if message_type == SUBSCRIPTION_CONFIRMATION:
            return SubscriptionConfirmation(
                topic_arn=document["TopicArn"],
                subscribe_url=document["SubscribeURL"],
                token=document["Token"],
                message_id=document["MessageId"],
                message=document["Message"],
            )
        if message_type == UNSUBSCRIBE_CONFIRMATION:
            return ParsedWebhook([])
        message = _json_object(document["Message"].encode(), "SNS Message")
        try:
            return ParsedWebhook(_events(request.provider_name, message, str(document["Timestamp"])))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            return ParsedWebhook([], [MalformedItem(message, f"SES event unreadable: {exc!r}")])

    async def _certificate(self, url: str) -> x509.Certificate:
        certificate = self._certificates.get(url)
        if certificate is not None:
            self._certificates.move_to_end(url)
            return certificate
        pem = await self._certificate_fetcher.fetch(url)
        try:
            certificate = x509.load_pem_x509_certificate(pem)
        except ValueError as exc:
            raise SignatureInvalid(f"SigningCertURL {url} did not serve a PEM certificate") from exc
        self._certificates[url] = certificate
        while len(self._certificates) > self._max_cached_certificates:
            self._certificates.popitem(last=False)
        return certificate


def _events(provider_name: str, message: dict[str, Any], published_at: str) -> list[DeliveryEvent]:
    event_type = message.get("eventType") or message.get("notificationType")
    common = _Common(provider_name, message, published_at)
    match event_type:
        case "Delivery":
            delivery = common.section("delivery")
            return [
                common.event(
                    EventKind.DELIVERED,
                    recipient,
                    common.time_of(delivery),
                    diagnostic=delivery.get("smtpResponse"),
                )
                for recipient in common.recipients(delivery.get("recipients"))
            ]
        case "Bounce":
            bounce = common.section("bounce")
            kind_of_bounce = str(bounce.get("bounceType") or "Undetermined")
            # Only Permanent says the address is bad; Transient and Undetermined must not suppress it.
            bounce_type = BounceType.HARD if kind_of_bounce == "Permanent" else BounceType.SOFT
            reason = f"{kind_of_bounce}/{bounce.get('bounceSubType') or ''}".rstrip("/")
            return [
                common.event(
                    EventKind.BOUNCED,
                    recipient,
                    common.time_of(bounce),
                    bounce_type=bounce_type,
                    reason=reason,
                    diagnostic=details.get("diagnosticCode") or details.get("status"),
                    identity=bounce.get("feedbackId"),
                )
                for recipient, details in common.recipients_with_details(bounce.get("bouncedRecipients"))
            ]
        case "Complaint":
            complaint = common.section("complaint")
            return [
                common.event(
                    EventKind.COMPLAINED,
                    recipient,
                    common.time_of(complaint),
                    reason=complaint.get("complaintFeedbackType"),
                    identity=complaint.get("feedbackId"),
                )
                for recipient in common.recipients(complaint.get("complainedRecipients"))
            ]
        case "DeliveryDelay":
            delay = common.section("deliveryDelay")
            return [
                common.event(
                    EventKind.DEFERRED,
                    recipient,
                    common.time_of(delay),
                    reason=delay.get("delayType"),
                    diagnostic=details.get("diagnosticCode") or details.get("status"),
                )
                for recipient, details in common.recipients_with_details(delay.get("delayedRecipients"))
            ]
        case "Reject":
            reject = common.section("reject")
            return [
                common.event(EventKind.REJECTED, recipient, common.sent_at(), reason=reject.get("reason"))
                for recipient in common.recipients(None)
            ]
        case "Rendering Failure" | "RenderingFailure":
            failure = common.section("failure")
            return [
                common.event(
                    EventKind.REJECTED,
                    recipient,
                    common.sent_at(),
                    reason="Rendering Failure",
                    diagnostic=failure.get("errorMessage"),
                )
                for recipient in common.recipients(None)
            ]
        case "Open":
            opened = common.section("open")
            return [common.event(EventKind.OPENED, common.engagement_recipient(), common.time_of(opened))]
        case "Click":
            click = common.section("click")
            return [
                common.event(
                    EventKind.CLICKED,
                    common.engagement_recipient(),
                    common.time_of(click),
                    url=click.get("link"),
                )
            ]
        case "Subscription":
            subscription = common.section("subscription")
            preferences = subscription.get("newTopicPreferences")
            if not _opted_out(preferences if isinstance(preferences, dict) else {}):
                return []
            return [
                common.event(
                    EventKind.UNSUBSCRIBED,
                    common.engagement_recipient(),
                    common.time_of(subscription),
                    reason=subscription.get("contactList"),
                )
            ]
        case _:
            # Send, AmazonSnsSubscriptionSucceeded and future types: nothing we track.
            return []


def _opted_out(preferences: Mapping[str, Any]) -> bool:
    if preferences.get("unsubscribeAll"):
        return True
    statuses = preferences.get("topicSubscriptionStatus") or []
    return any(str(status.get("subscriptionStatus", "")).lower() == "optout" for status in statuses)


class _Common:
    """What every event from one SES message shares, and its fallbacks for what a record leaves out."""

    def __init__(self, provider_name: str, message: dict[str, Any], published_at: str) -> None:
        self.provider_name = provider_name
        self.message = message
        self.published_at = published_at
        mail = message.get("mail")
        self.mail: dict[str, Any] = mail if isinstance(mail, dict) else {}
        self.event_type = str(message.get("eventType") or message.get("notificationType"))
        tags = self.mail.get("tags")
        tags = tags if isinstance(tags, dict) else {}
        tagged = tags.get(ESP_MESSAGE_ID_VARIABLE) or []
        headers = self.mail.get("headers")
        self.message_id = (
            tagged[0] if tagged else header_value(headers if isinstance(headers, list) else [],
                                                  ESP_MESSAGE_ID_HEADER)
        )
        tenant_tagged = tags.get(ESP_TENANT_ID_VARIABLE) or []
        self.tenant_id = tenant_tagged[0] if tenant_tagged else None
        provider_message_id = self.mail.get("messageId")
        self.provider_message_id = str(provider_message_id) if provider_message_id else None

    def section(self, name: str) -> dict[str, Any]:
        """The event's own object (``bounce``, ``delivery`` ...), empty when the record leaves it out."""
        section = self.message.get(name)
        return section if isinstance(section, dict) else {}

    def sent_at(self) -> str:
        """When the email was sent (``mail.timestamp``), else when SNS published the event."""
        return str(self.mail.get("timestamp") or self.published_at)

    def time_of(self, section: Mapping[str, Any]) -> str:
        """The event's own time, else when SNS published it, else when the email was sent."""
        return str(section.get("timestamp") or self.published_at or self.mail.get("timestamp"))

    def destination(self) -> list[str]:
        destination = self.mail.get("destination")
        return [str(address) for address in destination if address] if isinstance(destination, list) else []

    def recipients_with_details(self, listed: Any) -> list[tuple[str, dict[str, Any]]]:
        """Each recipient an event lists (objects with ``emailAddress``, or bare addresses), else every
        destination of the email; raises when there is nobody the event is about."""
        found: list[tuple[str, dict[str, Any]]] = []
        for entry in listed if isinstance(listed, list) else []:
            if isinstance(entry, dict) and entry.get("emailAddress"):
                found.append((str(entry["emailAddress"]), entry))
            elif isinstance(entry, str) and entry:
                found.append((entry, {}))
        if not found:
            found = [(address, {}) for address in self.destination()]
        if not found:
            raise ValueError(f"{self.event_type} event names no recipient and its mail no destination")
        return found

    def recipients(self, listed: Any) -> list[str]:
        return [recipient for recipient, _details in self.recipients_with_details(listed)]

    def engagement_recipient(self) -> str:
        # Open, Click and Subscription events do not say which recipient acted; with one destination (how
        # we send) it is that one, otherwise all destinations are reported together.
        return ", ".join(self.destination())

    def event(
        self,
        kind: EventKind,
        recipient: str,
        timestamp: str,
        *,
        bounce_type: BounceType | None = None,
        reason: str | None = None,
        diagnostic: str | None = None,
        url: str | None = None,
        identity: str | None = None,
    ) -> DeliveryEvent:
        occurred_at: datetime = utc_from_iso(timestamp)
        if not (recipient or self.provider_message_id or self.message_id):
            raise ValueError(f"{self.event_type} event names no recipient and no message")
        # Content-derived ids dedupe SES's own duplicate publications as well as SNS retries.
        id_parts = [identity or self.provider_message_id or self.message_id, self.event_type, recipient,
                    timestamp, url or ""]
        return DeliveryEvent(
            kind=kind,
            provider_type=PROVIDER_TYPE,
            provider_name=self.provider_name,
            recipient=recipient,
            occurred_at=occurred_at,
            event_id=derived_event_id(PROVIDER_TYPE, id_parts),
            provider_message_id=self.provider_message_id,
            message_id=self.message_id,
            tenant_id=self.tenant_id,
            bounce_type=bounce_type,
            reason=reason or None,
            diagnostic=diagnostic or None,
            url=url,
            raw=self.message,
        )


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedWebhook(f"{what} is not JSON") from exc
    if not isinstance(payload, dict):
        raise MalformedWebhook(f"{what} is not a JSON object")
    return payload


def create_handler(context: HandlerContext) -> SesWebhookHandler:
    """Build the SES handler with the context's certificate fetcher (HTTPS via httpx by default)."""
    return SesWebhookHandler(context.certificate_fetcher or HttpxCertificateFetcher())
