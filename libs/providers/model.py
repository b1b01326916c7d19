"""The email as the provider layer sees it, and what a provider made of it.

``OutboundEmail`` (with its ``Address`` and ``Attachment`` values) is what the sender hands to an adapter;
``SendResult`` with its ``Outcome`` is what one attempt achieved; ``ProviderConfig`` is one configured provider
account. Also here: the ids every outgoing email carries (``X-ESP-Message-Id`` and the custom-data keys webhooks
are matched by) and the ``{{ name }}`` personalisation every adapter understands. Nothing here sends, encodes or
imports a transport.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING

from libs.providers.errors import AdapterConfigError

if TYPE_CHECKING:  # the key type only: the model imports no cryptography (ingest reads it)
    from libs.providers.dkim import DkimKey

__all__ = [
    "ESP_MESSAGE_ID_HEADER",
    "ESP_MESSAGE_ID_KEY",
    "ESP_TENANT_ID_KEY",
    "PLACEHOLDER_PATTERN",
    "Address",
    "Attachment",
    "OutboundEmail",
    "Outcome",
    "ProviderConfig",
    "SendResult",
    "content_key",
    "personalize",
    "placeholder_literals",
    "recipient_values",
    "render_placeholders",
    "unique_addresses",
]

#: Header carrying our message id on every outgoing email (also used as the idempotency key).
ESP_MESSAGE_ID_HEADER = "X-ESP-Message-Id"
#: Metadata key under which our message id travels in provider-side custom data (custom_args, v:, Metadata,
#: EmailTags), so delivery webhooks can be matched back to our message without the provider id.
ESP_MESSAGE_ID_KEY = "esp_message_id"
#: Metadata key carrying the tenant id next to the message id.
ESP_TENANT_ID_KEY = "esp_tenant_id"

#: Placeholder syntax for per-recipient personalisation in the subject, the text and HTML bodies and header values:
#: ``{{ first_name }}``. Adapters translate it to the provider's native syntax for batch sends, or render it locally.
PLACEHOLDER_PATTERN = re.compile(r"\{\{\s*([A-Za-z0-9_.-]+)\s*\}\}")


class Outcome(StrEnum):
    """What one attempt at a provider achieved, from the sender's point of view."""

    ACCEPTED = "accepted"
    """The provider took responsibility for the email."""
    THROTTLED = "throttled"
    """The provider asked us to slow down; retry later (see ``retry_after_s``), possibly elsewhere."""
    RETRYABLE = "retryable"
    """A transient failure where the provider certainly did not accept the email; safe to retry."""
    PERMANENT = "permanent"
    """Retrying the same request at this provider will fail again."""
    AMBIGUOUS = "ambiguous"
    """The request was sent but no answer came back: the provider may or may not have accepted it."""


@dataclass(frozen=True)
class Address:
    """A mailbox: an address and an optional display name (any Unicode)."""

    email: str
    """The addr-spec, e.g. ``alice@example.com``."""
    name: str = ""
    """The display name, e.g. ``Alice Müller``; empty for none."""

    def formatted(self) -> str:
        """``Name <email>`` with the name quoted when it needs it; Unicode is kept (for JSON/form APIs)."""
        if not self.name:
            return self.email
        if re.search(r'[()<>\[\]:;@\\,."]', self.name):
            escaped = self.name.replace("\\", "\\\\").replace('"', '\\"')
            return f'"{escaped}" <{self.email}>'
        return f"{self.name} <{self.email}>"


async def _single_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


@dataclass(frozen=True)
class Attachment:
    """A file attached to an email; its bytes are streamed, never required to be in memory."""

    filename: str
    content_type: str
    size: int
    """Exact size of the raw (unencoded) bytes; adapters compute encoded sizes and Content-Length from it."""
    chunks: Callable[[], AsyncIterator[bytes]]
    """Opens a fresh stream of the bytes (the sender streams from S3); may be called more than once."""
    content_id: str | None = None
    """When set the attachment is inline, referenced from HTML as ``cid:<content_id>``."""

    @property
    def is_inline(self) -> bool:
        """Whether this attachment is referenced from the HTML body rather than shown as a file."""
        return self.content_id is not None

    @classmethod
    def from_bytes(
        cls, filename: str, content_type: str, data: bytes, *, content_id: str | None = None
    ) -> Attachment:
        """An attachment whose bytes are already in memory (small files, tests)."""
        return cls(filename, content_type, len(data), lambda: _single_chunk(data), content_id)


@dataclass(frozen=True)
class OutboundEmail:
    """One email as the sender hands it to a provider adapter."""

    message_id: str
    """Our id (a UUID string): sent as header ``X-ESP-Message-Id`` and used as the idempotency key."""
    tenant_id: str
    message_class: str
    """``otp`` | ``transactional`` | ``bulk``."""
    sender: Address
    to: tuple[Address, ...]
    cc: tuple[Address, ...] = ()
    bcc: tuple[Address, ...] = ()
    reply_to: tuple[Address, ...] = ()
    subject: str = ""
    text: str | None = None
    html: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    """Extra headers; must not repeat the standard ones (From, To, Subject …)."""
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    """Custom key/value data that the provider echoes back in its webhooks."""
    attachments: tuple[Attachment, ...] = ()
    recipient_variables: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    """Values of the ``{{ name }}`` placeholders in the subject, the bodies and header values, keyed by recipient
    address (the sender sets them for an email with a single ``to``). Values are final text: nobody escapes them
    (the HTML body's are HTML-escaped already where it needs it). A placeholder without a value stays as written."""
    sending_domain: str = ""
    """The tenant's verified domain that covers ``From`` (the ``From`` domain or a parent of it), set by the sender;
    empty for the platform's sandbox domains. A provider whose account holds sending domains sends through it
    (Mailgun's ``/v3/<domain>/...``; the router registers it there), else through the one the provider is
    configured with."""
    dkim_keys: tuple[DkimKey, ...] = ()
    """The tenant's active DKIM keys for the ``From`` domain (``d=`` its verified domain), set by the sender. An
    adapter whose provider takes our MIME (``Capabilities.signs_raw_mime``) signs the message with each, as the
    last thing done to it; the others ignore them (the provider's domain authentication signs)."""

    @property
    def recipients(self) -> tuple[Address, ...]:
        """Every envelope recipient: to, cc and bcc."""
        return (*self.to, *self.cc, *self.bcc)


@dataclass(frozen=True)
class SendResult:
    """The outcome of one attempt to hand one email to a provider."""

    outcome: Outcome
    provider_message_id: str | None = None
    """The provider's id as returned by the send call (Mailgun's keeps its ``<>`` brackets)."""
    retry_after_s: float | None = None
    """How long the provider asked us to wait, when it said so."""
    reason: str = ""
    """A short human-readable explanation (the provider's own message where there is one)."""
    status_code: int | None = None
    """The HTTP status or SMTP reply code, when the provider answered."""
    provider_fault: bool = False
    """True when the failure lies with the provider or our account there (bad credentials, unknown domain,
    quota, outage) rather than with the email: the sender should fail over instead of failing the email."""
    elapsed_s: float | None = None
    """Wall time of the attempt, measured by the base class."""
    refused_recipients: Mapping[str, str] = field(default_factory=dict)
    """On an accepted result, the recipients the provider refused while it took the email for the others (an SMTP
    relay refusing some RCPTs), each with the provider's reason (``"550 5.1.1 no such user"``): the email went to
    every other recipient and to none of these. Empty when every recipient was taken; an email refused for every
    recipient is not accepted at all."""
    dkim_algorithms: tuple[str, ...] = ()
    """The ``a=`` of each DKIM signature the mesh put on the email it handed over (empty: not signed by us)."""

    @property
    def accepted(self) -> bool:
        """Whether the provider took the email."""
        return self.outcome is Outcome.ACCEPTED


@dataclass(frozen=True)
class ProviderConfig:
    """One configured provider instance (an account at a provider, in a region)."""

    name: str
    """Our name for this instance, e.g. ``mailgun-eu``."""
    type: str
    """Adapter type: ``smtp`` | ``mailgun`` | ``sendgrid`` | ``ses`` | ``postmark``."""
    endpoint: str
    """Base URL for HTTP providers (e.g. ``https://api.mailgun.net``); ``host:port`` for SMTP. SES may leave
    it empty to use AWS's regional endpoint."""
    credentials: Mapping[str, str] = field(repr=False)
    """Secrets (API keys, passwords): kept out of ``repr`` so a logged config never shows them."""
    region: str = ""
    options: Mapping[str, str] = field(default_factory=dict)
    """Provider-specific settings as strings (see each adapter's docstring)."""
    timeout_s: float = 10.0
    """How long to wait for the provider's answer once the request is sent."""
    connect_timeout_s: float = 5.0
    """How long to wait for a connection (a failure here is always safe to retry)."""

    def credential(self, key: str) -> str:
        """A required credential, or ``AdapterConfigError`` naming it."""
        value = self.credentials.get(key, "")
        if not value:
            raise AdapterConfigError(f"provider {self.name!r} ({self.type}) needs credential {key!r}")
        return value

    def option(self, key: str, default: str = "") -> str:
        """An option as a string."""
        return self.options.get(key, default)

    def option_int(self, key: str, default: int) -> int:
        """An option parsed as an integer, or ``AdapterConfigError``."""
        raw = self.options.get(key)
        if raw is None or raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            raise AdapterConfigError(f"provider {self.name!r}: option {key!r} must be an integer") from None

    def option_bool(self, key: str, default: bool) -> bool:
        """An option parsed as a boolean (true/false/yes/no/1/0), or ``AdapterConfigError``."""
        raw = self.options.get(key)
        if raw is None or raw == "":
            return default
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise AdapterConfigError(f"provider {self.name!r}: option {key!r} must be a boolean")


def render_placeholders(template: str, variables: Mapping[str, str]) -> str:
    """``template`` with each ``{{ name }}`` replaced by its value; placeholders without one stay as written."""
    if "{" not in template:  # a one-character test is a memchr; "{{" would cost more than the regex pass
        return template
    return PLACEHOLDER_PATTERN.sub(lambda match: variables.get(match.group(1), match.group(0)), template)


def recipient_values(email: OutboundEmail) -> Mapping[str, str]:
    """The values the email's placeholders are rendered with: its single ``to`` recipient's (none for an email
    with several ``to`` recipients or no variables)."""
    if not email.recipient_variables or len(email.to) != 1:
        return {}
    return email.recipient_variables.get(email.to[0].email, {})


def personalize(email: OutboundEmail) -> OutboundEmail:
    """Render ``{{ name }}`` placeholders in the subject, bodies and header values with the values of the email's
    single ``to`` recipient, for providers (or calls) that send the email as it is.

    The message is one document, so its cc and bcc recipients see what the ``to`` recipient sees. Emails without
    recipient variables, or without exactly one ``to``, are returned unchanged. Unknown placeholders are left as they
    are.
    """
    variables = recipient_values(email)
    if not variables:
        return email
    return replace(
        email,
        subject=render_placeholders(email.subject, variables),
        text=None if email.text is None else render_placeholders(email.text, variables),
        html=None if email.html is None else render_placeholders(email.html, variables),
        headers={name: render_placeholders(value, variables) for name, value in email.headers.items()},
        recipient_variables={},
    )


def placeholder_literals(email: OutboundEmail, *, headers: bool = True) -> dict[str, str]:
    """Every placeholder name in the subject, bodies and (unless ``headers`` is False) header values, each with its
    text as first written (``{"name": "{{ name }}"}``).

    A batch adapter sends each recipient a value for every name here, the literal where the recipient has none,
    so an unknown placeholder reads as written at every provider, as ``personalize`` leaves it (in its first
    spelling, where the content spells it several ways: ``{{ name }}``, ``{{name}}``), and a recipient's
    variables that no placeholder uses are not sent at all.
    """
    literals: dict[str, str] = {}
    for text in (email.subject, email.text, email.html, *(email.headers.values() if headers else ())):
        if text and "{" in text:
            for match in PLACEHOLDER_PATTERN.finditer(text):
                literals.setdefault(match.group(1), match.group(0))
    return literals


def content_key(email: OutboundEmail) -> tuple[object, ...]:
    """Everything but the recipients, the id and the recipient variables: emails with equal keys can share one
    batch call at providers that personalise per recipient (Mailgun's recipient-variables, SendGrid's
    personalizations)."""
    return (
        email.tenant_id,
        email.message_class,
        email.sender,
        email.sending_domain,
        email.reply_to,
        email.subject,
        email.text,
        email.html,
        tuple(sorted(email.headers.items())),
        email.tags,
        tuple(sorted(email.metadata.items())),
        email.attachments,  # the same Attachment objects (identity of their stream factory counts)
    )


def unique_addresses(addresses: Iterable[Address]) -> list[Address]:
    """Addresses with case-insensitive duplicates removed, first occurrence kept."""
    seen: set[str] = set()
    unique: list[Address] = []
    for address in addresses:
        key = address.email.lower()
        if key not in seen:
            seen.add(key)
            unique.append(address)
    return unique

