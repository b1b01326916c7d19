"""What a provider's webhook handler receives, returns and raises: the contract between
:mod:`libs.providers.webhooks` (the verifier, which owns the steps) and each ``libs/providers/<type>/webhook.py``.

Handlers are tolerant: providers' real payloads leave out fields their examples show (ids, timestamps,
recipients), so a handler falls back where the provider documents another source (a header, the envelope's
time, the signed time) and refuses only what it cannot read at all. One unreadable item inside a readable
body (a SendGrid batch, a Mailgun ``event-data`` without an event name) is a :class:`MalformedItem` returned
beside the good events, never a reason to refuse the others.

Exception tree (map to HTTP in the receiver)::

    WebhookError
    ├── WebhookRejected            request refused, no events produced
    │   ├── SignatureMissing       no signature / credentials at all
    │   ├── SignatureInvalid       wrong key, tampered body, bad certificate URL, unexpected topic
    │   ├── StaleWebhook           signed too long ago (or too far in the future)
    │   ├── ReplayedWebhook        already accepted once (answer 2xx: the provider must stop retrying)
    │   └── MalformedWebhook       the body cannot be read at all (``authentic`` says whether it was verified)
    ├── CertificateUnavailable     a signing certificate could not be fetched (transient: retry later)
    ├── UnsupportedProvider        no webhook handler for this provider type (e.g. smtp)
    └── WebhookConfigurationError  our own secrets are missing or unusable
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, runtime_checkable

from libs.providers.events import DeliveryEvent

__all__ = [
    "AuthenticatedWebhook",
    "CertificateFetcher",
    "CertificateUnavailable",
    "HandlerContext",
    "MalformedItem",
    "MalformedWebhook",
    "ParseResult",
    "ParsedWebhook",
    "ReplayedWebhook",
    "SignatureInvalid",
    "SignatureMissing",
    "StaleWebhook",
    "SubscriptionConfirmation",
    "UnsupportedProvider",
    "WebhookConfigurationError",
    "WebhookError",
    "WebhookHandler",
    "WebhookRejected",
    "WebhookRequest",
    "WebhookResult",
]


class WebhookError(Exception):
    """Base class of every error raised while handling a provider webhook."""


class WebhookRejected(WebhookError):
    """The request was refused; no event from it may be used."""


class SignatureMissing(WebhookRejected):
    """The request carries no signature or credentials."""


class SignatureInvalid(WebhookRejected):
    """The signature or credentials do not verify (forged, tampered, wrong key, untrusted certificate)."""


class StaleWebhook(WebhookRejected):
    """The signed timestamp lies outside the freshness window."""


class ReplayedWebhook(WebhookRejected):
    """This exact signed request was accepted before.

    A genuine provider retry of a callback we already accepted also lands here, so receivers should answer
    2xx (nothing more to do) rather than an error that makes the provider retry again.
    """


class MalformedWebhook(WebhookRejected):
    """The request's body cannot be read at all (not JSON, not the provider's shape).

    ``authentic`` is True when the request was verified before the body turned out unreadable (the provider
    really sent it: worth keeping for inspection), False when the body could not even be checked (anyone may
    have sent it).
    """

    def __init__(self, message: str, *, authentic: bool = False) -> None:
        """A refusal for ``message``; ``authentic`` as the class says."""
        super().__init__(message)
        self.authentic = authentic


class CertificateUnavailable(WebhookError):
    """A signing certificate could not be fetched; the request was neither accepted nor refused.

    Receivers should answer 5xx so the provider retries later.
    """


class UnsupportedProvider(WebhookError):
    """There is no webhook handler for this provider type."""


class WebhookConfigurationError(WebhookError):
    """The configured secrets for the provider are missing or unusable (our fault, not the sender's)."""


@dataclass(frozen=True)
class SubscriptionConfirmation:
    """A verified SNS ``SubscriptionConfirmation``: not an event; the receiver must confirm it.

    Confirm by fetching ``subscribe_url`` (HTTPS GET) or calling SNS ``ConfirmSubscription`` with
    ``topic_arn`` and ``token``; notifications only flow after that.
    """

    topic_arn: str
    """The topic asking for confirmation (already checked against the allow-list)."""
    subscribe_url: str
    """URL whose GET confirms the subscription."""
    token: str
    """Token for ``ConfirmSubscription``."""
    message_id: str
    """SNS message id of the confirmation request."""
    message: str
    """SNS's human-readable message."""


@dataclass(frozen=True)
class MalformedItem:
    """One item of an authentic callback that could not be turned into an event, kept as received."""

    raw: Any
    """The item as received (parsed JSON), for inspection."""
    reason: str
    """Why it could not be read."""
    index: int | None = None
    """Its position in a batched body (SendGrid), None for a body of one item."""


@dataclass(frozen=True)
class ParsedWebhook:
    """What an authentic callback said: its events, and the items that could not be read."""

    events: list[DeliveryEvent]
    """The normalised events (possibly empty: providers also report things we do not track)."""
    malformed: list[MalformedItem] = field(default_factory=list)
    """Items that could not be read; the good events are still used."""


WebhookResult = list[DeliveryEvent] | SubscriptionConfirmation
"""What :meth:`~libs.providers.webhooks.WebhookVerifier.verify_and_parse` returns: the good events only."""
ParseResult = ParsedWebhook | SubscriptionConfirmation
"""What a handler's ``parse`` (and :meth:`~libs.providers.webhooks.WebhookVerifier.verify`) returns."""


@dataclass(frozen=True)
class WebhookRequest:
    """One inbound webhook HTTP request, as handlers see it."""

    provider_name: str
    """Configured provider instance the request was addressed to."""
    secrets: Mapping[str, str] = field(repr=False)
    """That provider's webhook secrets (keys documented per handler); kept out of ``repr``."""
    headers: Mapping[str, str]
    """Request headers with lower-cased names."""
    body: bytes
    """The raw request body, exactly as received."""
    now: datetime
    """The time to judge freshness against (aware)."""

    def header(self, name: str) -> str | None:
        """A request header by case-insensitive name."""
        return self.headers.get(name.lower())

    def secret(self, key: str) -> str:
        """A required secret; its absence is a configuration error, not the sender's fault."""
        value = self.secrets.get(key)
        if not value:
            raise WebhookConfigurationError(f"provider {self.provider_name!r} has no webhook secret {key!r}")
        return value


@dataclass(frozen=True)
class AuthenticatedWebhook:
    """What a handler learned while authenticating a request."""

    signed_at: datetime
    """The time the request claims to be from (signed where the provider signs it)."""
    replay_key: str
    """Key identifying this exact signed request, for the replay guard."""
    payload: Any
    """The parsed payload, handed back to the handler's ``parse``."""


@runtime_checkable
class CertificateFetcher(Protocol):
    """Fetches a signing certificate (PEM bytes) by URL. The caller validates the URL first."""

    async def fetch(self, url: str) -> bytes:
        """Return the PEM bytes served at ``url``."""
        ...


@dataclass(frozen=True)
class HandlerContext:
    """What a provider handler may need besides the request."""

    certificate_fetcher: CertificateFetcher | None = None
    """Used by handlers that verify with certificates fetched by URL (SES/SNS)."""


class WebhookHandler(Protocol):
    """One provider's webhook knowledge: how to authenticate a request and how to read it."""

    provider_type: str
    """The provider type this handler serves."""
    default_tolerance: timedelta
    """Default freshness window, either side of now."""

    async def authenticate(self, request: WebhookRequest) -> AuthenticatedWebhook:
        """Check the signature/credentials; raise a :class:`WebhookRejected` subclass if they fail."""
        ...

    def parse(self, request: WebhookRequest, authenticated: AuthenticatedWebhook) -> ParseResult:
        """Turn an authenticated payload into events and unreadable items.

        Raise :class:`MalformedWebhook` only when nothing in the body can be read.
        """
        ...
