"""What each provider type can take, as a table that imports no send code.

Ingest (which decides at accept whether attachments must travel as links), the router and the sender (which rank
providers) read the size caps here without importing httpx, boto3 or aiosmtplib; each adapter's
``default_capabilities`` is its row of ``DEFAULT_CAPABILITIES``, so every fact is written once.

Two caps apply to one provider account, and ``provider_size_cap`` is the one place that combines them: the
registry entry's ``max_message_bytes`` (0: not set) and its type's own cap here. An adapter instance may lower its
type's cap further with the option ``max_message_bytes`` (SMTP may also raise it); the adapter enforces that
itself when it sends (``ProviderAdapter.precheck``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = [
    "DEFAULT_CAPABILITIES",
    "DEFAULT_SIZE_CAPS",
    "Capabilities",
    "provider_size_cap",
    "registers_domains",
]


@dataclass(frozen=True)
class Capabilities:
    """What a provider can take; the router routes by these and the adapter enforces them."""

    max_message_bytes: int
    """Largest message after encoding (MIME/base64), as measured by ``libs.providers.mime.mime_size``."""
    max_recipients_per_message: int
    """to + cc + bcc of one message."""
    max_batch_messages: int
    """How many emails one batch call may carry (1 when there is no batch API)."""
    supports_batch: bool
    supports_idempotency_key: bool
    """Whether the provider itself deduplicates on our message id."""
    regions: tuple[str, ...]
    max_tags: int = 100
    """How many tags one message may carry."""
    max_batch_recipients: int | None = None
    """Recipients one batch call may carry in total (None: messages x recipients per message)."""
    max_batch_bytes: int | None = None
    """Encoded size one batch call may carry in total (None: no limit beyond the per-message cap)."""
    unique_recipients_per_batch: bool = True
    """Whether one batch call may name each recipient address only once: the provider keys per-recipient data by
    address (Mailgun's recipient-variables) or refuses duplicates outright (SendGrid). False where a batch is a
    list of whole messages (Postmark)."""
    registers_domains: bool = False
    """Whether the provider must know a sending domain before it sends for it, and has an API to register one and
    read back its verification (an SES identity, a Mailgun domain, SendGrid domain authentication, a Postmark
    domain): routing sends a tenant domain's mail there only once the provider says it is ready
    (``libs.providers.domain_registration``). False for plain relays, which send for any domain."""
    signs_raw_mime: bool = False
    """Whether the provider takes the email as one MIME document we render (SMTP, SES raw, Mailgun's MIME
    endpoint), so the mesh signs it with the tenant's DKIM keys (``libs.providers.dkim``). Providers that take JSON
    fields render the MIME themselves: their own domain authentication signs (SendGrid, Postmark)."""


DEFAULT_CAPABILITIES: Mapping[str, Capabilities] = MappingProxyType({
    # The smallest cap of the big relays, and the recipients RFC 5321 requires servers to accept; both options.
    "smtp": Capabilities(
        max_message_bytes=25 * 1024 * 1024,
        max_recipients_per_message=100,
        max_batch_messages=1,
        supports_batch=False,
        supports_idempotency_key=False,
        regions=(),
        signs_raw_mime=True,
    ),
    "mailgun": Capabilities(
        max_message_bytes=25 * 1024 * 1024,
        max_recipients_per_message=1000,
        max_batch_messages=1000,
        supports_batch=True,
        supports_idempotency_key=False,
        regions=("us", "eu"),
        max_tags=3,
        max_batch_recipients=1000,
        signs_raw_mime=True,
        registers_domains=True,
    ),
    "sendgrid": Capabilities(
        max_message_bytes=30 * 1000 * 1000,
        max_recipients_per_message=1000,
        max_batch_messages=1000,
        supports_batch=True,
        supports_idempotency_key=False,
        regions=("global", "eu"),
        max_tags=10,
        max_batch_recipients=1000,
        max_batch_bytes=30 * 1000 * 1000,
        registers_domains=True,
    ),
    "ses": Capabilities(
        max_message_bytes=40 * 1024 * 1024,
        max_recipients_per_message=50,
        max_batch_messages=1,
        supports_batch=False,
        supports_idempotency_key=False,
        regions=(),
        max_tags=40,
        signs_raw_mime=True,
        registers_domains=True,
    ),
    "postmark": Capabilities(
        max_message_bytes=10 * 1000 * 1000,
        max_recipients_per_message=50,
        max_batch_messages=500,
        supports_batch=True,
        supports_idempotency_key=False,
        regions=("us",),
        max_tags=1,
        max_batch_bytes=50 * 1000 * 1000,
        unique_recipients_per_batch=False,  # a batch is a list of complete messages
        registers_domains=True,
    ),
})
"""The capabilities of every built-in provider type, by type name."""

DEFAULT_SIZE_CAPS: Mapping[str, int] = MappingProxyType(
    {provider_type: caps.max_message_bytes for provider_type, caps in DEFAULT_CAPABILITIES.items()})
"""Each built-in type's own message size cap (encoded bytes), by type name."""


def provider_size_cap(provider_type: str, registry_cap: int = 0, *,
                      type_caps: Mapping[str, int] = DEFAULT_SIZE_CAPS) -> int:
    """The size cap (encoded bytes) routing and ingest hold one provider account to; 0 when none is known.

    The lower of ``registry_cap`` (the registry entry's ``max_message_bytes``) and the type's own cap in
    ``type_caps``, of those that are set (above 0).
    """
    caps = [cap for cap in (registry_cap, type_caps.get(provider_type, 0)) if cap > 0]
    return min(caps) if caps else 0


def registers_domains(provider_type: str) -> bool:
    """Whether providers of ``provider_type`` need a tenant domain registered (and verified) before they send for
    it; False for types this table does not know."""
    caps = DEFAULT_CAPABILITIES.get(provider_type)
    return caps is not None and caps.registers_domains
