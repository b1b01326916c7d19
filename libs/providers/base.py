"""The provider adapter interface and the shared send algorithm.

Every upstream email provider (SMTP relay, Mailgun, SendGrid, Amazon SES, Postmark) sits behind one small
``ProviderAdapter`` protocol. Following django-anymail's shape, ``BaseAdapter`` owns the algorithm every
provider shares — validation, the size cap, timing, grouping batches, and turning transport failures into an
``Outcome`` — while each provider module only builds its payload, sends it and parses the answer.

The sender service calls ``send`` / ``send_batch`` and reads ``SendResult.outcome``; it never sees a
provider's exceptions for ordinary failures (those become ``RETRYABLE`` / ``THROTTLED`` / ``PERMANENT`` /
``AMBIGUOUS``). Exceptions are raised only for problems found *before* any network call: ``MessageTooLarge``,
``TooManyRecipients``, ``UnsupportedFeature`` and ``InvalidMessage`` — the router should have routed
elsewhere.
"""

from __future__ import annotations

import asyncio
import functools
import re
import ssl
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import httpx

if TYPE_CHECKING:
    from libs.providers.mime import StreamedBody

#: Header carrying our message id on every outgoing email (also used as the idempotency key).
ESP_MESSAGE_ID_HEADER = "X-ESP-Message-Id"
#: Metadata key under which our message id travels in provider-side custom data (custom_args, v:, Metadata,
#: EmailTags), so delivery webhooks can be matched back to our message without the provider id.
ESP_MESSAGE_ID_KEY = "esp_message_id"
#: Metadata key carrying the tenant id next to the message id.
ESP_TENANT_ID_KEY = "esp_tenant_id"

#: Placeholder syntax for per-recipient personalisation in subject/text/html: ``{{ first_name }}``.
#: Adapters translate it to the provider's native syntax for batch sends, or render it locally.
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


# ----------------------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------------------


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
    """Per-recipient values for ``{{ name }}`` placeholders, keyed by recipient address."""

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

    @property
    def accepted(self) -> bool:
        """Whether the provider took the email."""
        return self.outcome is Outcome.ACCEPTED


@dataclass(frozen=True)
class Capabilities:
    """What a provider can take; the router routes by these and the adapter enforces them."""

    max_message_bytes: int
    """Largest message after encoding (MIME/base64), as measured by ``estimated_encoded_size``."""
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
    credentials: Mapping[str, str]
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


# ----------------------------------------------------------------------------------------------------
# Errors (raised only before any network call)
# ----------------------------------------------------------------------------------------------------


class ProviderError(Exception):
    """Base of every error the provider layer raises."""


class AdapterConfigError(ProviderError):
    """A provider configuration is incomplete or invalid."""


class UnknownProviderType(AdapterConfigError):
    """No adapter is registered under the configured type."""


class InvalidMessage(ProviderError):
    """The email cannot be sent anywhere as it is (no recipients, no body …)."""


class UnsupportedFeature(ProviderError):
    """The email uses something this provider cannot do; route it to another provider."""

    def __init__(self, provider_type: str, feature: str) -> None:
        super().__init__(f"{provider_type} does not support {feature}")
        self.provider_type = provider_type
        self.feature = feature


class TooManyRecipients(UnsupportedFeature):
    """More recipients than one message at this provider may have."""

    def __init__(self, provider_type: str, count: int, limit: int) -> None:
        super().__init__(provider_type, f"{count} recipients in one message (limit {limit})")
        self.count = count
        self.limit = limit


class MessageTooLarge(ProviderError):
    """The encoded message exceeds the provider's cap; raised before any network call."""

    def __init__(self, provider_type: str, size: int, limit: int) -> None:
        super().__init__(f"message of {size} encoded bytes exceeds the {provider_type} cap of {limit} bytes")
        self.provider_type = provider_type
        self.size = size
        self.limit = limit


# ----------------------------------------------------------------------------------------------------
# The protocol the sender calls
# ----------------------------------------------------------------------------------------------------


@runtime_checkable
class ProviderAdapter(Protocol):
    """What the sender service needs from any provider."""

    config: ProviderConfig
    capabilities: Capabilities

    async def send(self, email: OutboundEmail) -> SendResult:
        """Hand one email to the provider."""
        ...

    async def send_batch(self, emails: Sequence[OutboundEmail]) -> list[SendResult]:
        """Hand several emails over, using the provider's batch API where it has one; one result per email."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


# ----------------------------------------------------------------------------------------------------
# Sizes and personalisation (shared by the router and every adapter)
# ----------------------------------------------------------------------------------------------------


def base64_encoded_size(raw_size: int, *, line_length: int | None = None) -> int:
    """Bytes of base64 for ``raw_size`` bytes; with ``line_length``, every line ends in CRLF."""
    encoded = 4 * ((raw_size + 2) // 3)
    if line_length is None or encoded == 0:
        return encoded
    lines = (encoded + line_length - 1) // line_length
    return encoded + 2 * lines


def estimated_encoded_size(email: OutboundEmail) -> int:
    """The size of the email as a MIME message (headers, bodies, base64 attachments), in bytes.

    Computed without reading any attachment bytes. This is the single measure the router and every adapter
    compare with ``Capabilities.max_message_bytes``; it is exact for SMTP and SES (which carry this MIME) and
    an upper bound for JSON providers (whose base64 has no line breaks). It renders the headers and bodies
    (milliseconds): hot paths first try ``mime.mime_size_bound`` (microseconds) through ``mime.fits_size_cap``.
    """
    from libs.providers.mime import mime_size

    return mime_size(email)


def personalize(email: OutboundEmail) -> OutboundEmail:
    """Render ``{{ name }}`` placeholders for an email with a single recipient and recipient variables.

    Emails without recipient variables are returned unchanged. Unknown placeholders are left as they are.
    """
    if not email.recipient_variables or len(email.recipients) != 1:
        return email
    variables = email.recipient_variables.get(email.recipients[0].email)
    if variables is None:
        return email

    def render(template: str | None) -> str | None:
        if template is None:
            return None
        return PLACEHOLDER_PATTERN.sub(lambda match: variables.get(match.group(1), match.group(0)), template)

    return replace(
        email,
        subject=render(email.subject) or "",
        text=render(email.text),
        html=render(email.html),
        recipient_variables={},
    )


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from an HTTP ``Retry-After`` value (delta-seconds or HTTP date); None if absent or invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


# ----------------------------------------------------------------------------------------------------
# The shared algorithm
# ----------------------------------------------------------------------------------------------------


@dataclass
class _OpenGroup:
    """A batch being filled while grouping."""

    indexes: list[int] = field(default_factory=list)
    addresses: set[str] = field(default_factory=set)
    recipients: int = 0
    size: int = 0

    def fits(self, addresses: set[str], size: int, caps: Capabilities, max_recipients: int, unique: bool) -> bool:
        if len(self.indexes) >= caps.max_batch_messages or self.recipients + len(addresses) > max_recipients:
            return False
        if caps.max_batch_bytes is not None and self.size + size > caps.max_batch_bytes:
            return False
        return not unique or self.addresses.isdisjoint(addresses)

    def add(self, index: int, addresses: set[str], size: int) -> None:
        self.indexes.append(index)
        self.addresses |= addresses
        self.recipients += len(addresses)
        self.size += size


class BaseAdapter(ABC):
    """Owns validation, the size cap, timing, batching and failure classification.

    Subclasses set ``type_name`` and ``default_capabilities`` and implement ``_deliver`` (one email) and, when
    the provider has a batch API, ``_deliver_batch`` + ``batch_key``. ``_classify_exception`` turns the
    transport's exceptions into results; anything it does not recognise propagates (a bug, not an outcome).
    """

    type_name: ClassVar[str] = ""
    default_capabilities: ClassVar[Capabilities]
    #: Whether one batch call may name each recipient address only once (per-recipient data keyed by address,
    #: or duplicates refused); providers whose batches are lists of whole messages set this to False.
    unique_recipients_per_batch: ClassVar[bool] = True

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        self.capabilities = self._capabilities_for(config)
        self._batch_concurrency = config.option_int("batch_concurrency", 4)

    # -- hooks -------------------------------------------------------------------------------------------

    def _capabilities_for(self, config: ProviderConfig) -> Capabilities:
        """Capabilities of this instance; option ``max_message_bytes`` may lower the size cap."""
        caps = self.default_capabilities
        lowered_cap = config.option_int("max_message_bytes", caps.max_message_bytes)
        return replace(caps, max_message_bytes=min(lowered_cap, caps.max_message_bytes))

    def check_features(self, email: OutboundEmail) -> None:
        """Raise ``UnsupportedFeature`` for anything in ``email`` this provider cannot do (default: tags)."""
        if len(email.tags) > self.capabilities.max_tags:
            raise UnsupportedFeature(
                self.type_name, f"{len(email.tags)} tags (limit {self.capabilities.max_tags})"
            )

    @abstractmethod
    async def _deliver(self, email: OutboundEmail) -> SendResult:
        """Send one validated email and parse the provider's answer (transport exceptions may propagate)."""

    async def _deliver_batch(self, emails: Sequence[OutboundEmail]) -> list[SendResult]:
        """Send a group of batch-compatible emails in one provider call; only called when supports_batch."""
        raise NotImplementedError

    def batch_key(self, email: OutboundEmail) -> object | None:
        """Emails with equal non-None keys may share one batch call; None means 'send on its own'."""
        return None

    @abstractmethod
    def _classify_exception(self, exc: BaseException) -> SendResult | None:
        """The result for a transport exception, or None if it is not a transport failure."""

    async def aclose(self) -> None:  # noqa: B027 - adapters without connections need nothing here
        """Release connections; adapters holding clients override this."""

    # -- the algorithm -----------------------------------------------------------------------------------

    def validate(self, email: OutboundEmail) -> None:
        """Everything checked before any network call; raises a ``ProviderError`` subclass."""
        if not email.recipients:
            raise InvalidMessage(f"email {email.message_id} has no recipients")
        if email.text is None and email.html is None:
            raise InvalidMessage(f"email {email.message_id} has neither a text nor an HTML body")
        if len(email.recipients) > self.capabilities.max_recipients_per_message:
            raise TooManyRecipients(
                self.type_name, len(email.recipients), self.capabilities.max_recipients_per_message
            )
        self.check_features(email)
        from libs.providers.mime import check_header_fields, fits_size_cap

        check_header_fields(email)
        fits, size = fits_size_cap(email, self.capabilities.max_message_bytes)
        if not fits:
            raise MessageTooLarge(self.type_name, size, self.capabilities.max_message_bytes)

    async def send(self, email: OutboundEmail) -> SendResult:
        """Validate, send, time and classify one email (see ``ProviderAdapter.send``)."""
        self.validate(email)
        return await self._timed(self._deliver(email))

    async def send_batch(self, emails: Sequence[OutboundEmail]) -> list[SendResult]:
        """Validate all, then send compatible groups through the batch API and the rest one by one.

        Raises (before any network call) if any email fails validation. Results are in input order.
        """
        for email in emails:
            self.validate(email)
        results: list[SendResult | None] = [None] * len(emails)
        groups, singles = self._group_for_batch(emails)
        limiter = asyncio.Semaphore(max(1, self._batch_concurrency))

        async def run_group(indexes: list[int]) -> None:
            async with limiter:
                group = [emails[i] for i in indexes]
                if len(group) == 1:
                    group_results = [await self._timed(self._deliver(group[0]))]
                else:
                    group_results = await self._timed_batch(group)
            for index, result in zip(indexes, group_results, strict=True):
                results[index] = result

        async with asyncio.TaskGroup() as tasks:
            for indexes in [*groups, *[[i] for i in singles]]:
                tasks.create_task(run_group(indexes))
        return [result for result in results if result is not None]

    def _group_for_batch(self, emails: Sequence[OutboundEmail]) -> tuple[list[list[int]], list[int]]:
        """Split indexes into batch groups (by ``batch_key``, within the batch limits) and single sends.

        Unless ``unique_recipients_per_batch`` is off, a group never holds the same recipient address twice:
        providers key per-recipient data by address (Mailgun's recipient-variables) or refuse duplicates
        outright (SendGrid).
        """
        if not self.capabilities.supports_batch:
            return [], list(range(len(emails)))
        from libs.providers.mime import mime_size_bound

        caps = self.capabilities
        max_recipients = caps.max_batch_recipients or caps.max_batch_messages * caps.max_recipients_per_message
        open_groups: dict[object, _OpenGroup] = {}
        groups: list[list[int]] = []
        singles: list[int] = []
        for index, email in enumerate(emails):
            key = self.batch_key(email)
            if key is None:
                singles.append(index)
                continue
            addresses = {address.email.lower() for address in email.recipients}
            # Sizes count at their cheap upper bound; the exact size is computed only when the bound would
            # close a group early, so the sum never exceeds the provider's limit and rarely costs a MIME build.
            size = mime_size_bound(email) if caps.max_batch_bytes is not None else 0
            group = open_groups.get(key)
            unique = self.unique_recipients_per_batch
            if group is not None and size and not group.fits(addresses, size, caps, max_recipients, unique):
                size = estimated_encoded_size(email)
            if group is None or not group.fits(addresses, size, caps, max_recipients, unique):
                group = _OpenGroup()
                groups.append(group.indexes)
                open_groups[key] = group
            group.add(index, addresses, size)
        return groups, singles

    async def _timed(self, attempt: Awaitable[SendResult]) -> SendResult:
        started = time.monotonic()
        try:
            result = await attempt
        except Exception as exc:
            classified = self._classify_exception(exc)
            if classified is None:
                raise
            result = classified
        return replace(result, elapsed_s=time.monotonic() - started)

    async def _timed_batch(self, emails: Sequence[OutboundEmail]) -> list[SendResult]:
        started = time.monotonic()
        try:
            results = await self._deliver_batch(emails)
        except Exception as exc:
            classified = self._classify_exception(exc)
            if classified is None:
                raise
            results = [classified] * len(emails)
        elapsed = time.monotonic() - started
        return [replace(result, elapsed_s=elapsed) for result in results]


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


# ----------------------------------------------------------------------------------------------------
# HTTP providers
# ----------------------------------------------------------------------------------------------------


def classify_http_failure(response: httpx.Response, reason: str) -> SendResult:
    """The outcome of a non-success HTTP answer by status, with the provider's message as ``reason``.

    429 throttled; 408 and 5xx retryable; 401/403/404 permanent and the provider's fault (credentials, account,
    domain or endpoint); any other 4xx permanent (the request itself is wrong).
    """
    status = response.status_code
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    reason = reason or response.reason_phrase
    if status == 429:
        return SendResult(Outcome.THROTTLED, retry_after_s=retry_after, reason=reason, status_code=status,
                          provider_fault=True)
    if status == 408 or status >= 500:
        return SendResult(Outcome.RETRYABLE, retry_after_s=retry_after, reason=reason, status_code=status,
                          provider_fault=True)
    if status in (401, 403, 404):
        return SendResult(Outcome.PERMANENT, reason=reason, status_code=status, provider_fault=True)
    return SendResult(Outcome.PERMANENT, reason=reason, status_code=status)


def classify_httpx_exception(exc: BaseException) -> SendResult | None:
    """Transport failures: before the request was fully written → retryable; after → ambiguous."""
    reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return SendResult(Outcome.RETRYABLE, reason=reason, provider_fault=True)
    if isinstance(exc, httpx.WriteTimeout | httpx.WriteError):
        return SendResult(Outcome.RETRYABLE, reason=reason, provider_fault=True)
    if isinstance(exc, httpx.ReadTimeout | httpx.ReadError | httpx.RemoteProtocolError):
        # The whole request went out and the answer never came: the provider may have accepted the email.
        return SendResult(Outcome.AMBIGUOUS, reason=reason, provider_fault=True)
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.ProxyError):
        return SendResult(Outcome.PERMANENT, reason=reason, provider_fault=True)
    return None


def response_json(response: httpx.Response) -> Any:
    """The response body parsed as JSON, or None when it is not JSON."""
    try:
        return response.json()
    except ValueError:
        return None


@functools.cache
def provider_tls_context() -> ssl.SSLContext:
    """The TLS context every provider's HTTP client of this process verifies with (the system's CA bundle, as
    httpx's default). Building one loads and parses the bundle: about 50 ms of CPU on the event loop that builds
    an adapter, and the sender builds adapters on its delivery loops whenever a provider is added or changed, so
    each client building its own stalled every OTP in flight for that long."""
    return httpx.create_ssl_context()


class HttpAdapter(BaseAdapter):
    """Base for providers with an HTTP API: one keep-alive ``httpx.AsyncClient`` per adapter instance.

    Subclasses implement ``build_request`` and ``parse_response`` (and the batch pair when they batch).
    ``transport`` lets tests inject an ``httpx`` transport without patching anything.
    """

    def __init__(self, config: ProviderConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(config)
        if not config.endpoint.startswith(("http://", "https://")):
            raise AdapterConfigError(f"provider {config.name!r}: endpoint must be an http(s) base URL")
        max_connections = config.option_int("max_connections", 100)
        self._client = httpx.AsyncClient(
            base_url=config.endpoint.rstrip("/"),
            headers=self.default_headers(),
            auth=self.auth(),
            timeout=httpx.Timeout(config.timeout_s, connect=config.connect_timeout_s),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
            verify=provider_tls_context(),
        )

    def default_headers(self) -> dict[str, str]:
        """Headers sent on every request (authentication tokens, Accept)."""
        return {}

    def auth(self) -> httpx.Auth | None:
        """httpx authentication for every request (e.g. basic auth)."""
        return None

    def streamed_request(self, method: str, path: str, body: StreamedBody) -> httpx.Request:
        """A request whose body streams with an exact Content-Length (no chunked encoding)."""
        return self._client.build_request(
            method,
            path,
            content=body.stream(),
            headers={"Content-Type": body.content_type, "Content-Length": str(body.size)},
        )

    @abstractmethod
    def build_request(self, email: OutboundEmail) -> httpx.Request:
        """The provider request for one email."""

    @abstractmethod
    def parse_response(self, email: OutboundEmail, response: httpx.Response) -> SendResult:
        """The result the provider's answer stands for."""

    def build_batch_request(self, emails: Sequence[OutboundEmail]) -> httpx.Request:
        """The provider request for a batch-compatible group."""
        raise NotImplementedError

    def parse_batch_response(self, emails: Sequence[OutboundEmail], response: httpx.Response) -> list[SendResult]:
        """One result per email of the batch, in order."""
        raise NotImplementedError

    async def _deliver(self, email: OutboundEmail) -> SendResult:
        response = await self._client.send(self.build_request(email))
        return self.parse_response(email, response)

    async def _deliver_batch(self, emails: Sequence[OutboundEmail]) -> list[SendResult]:
        response = await self._client.send(self.build_batch_request(emails))
        return self.parse_batch_response(emails, response)

    def _classify_exception(self, exc: BaseException) -> SendResult | None:
        return classify_httpx_exception(exc)

    async def aclose(self) -> None:
        """Close the HTTP client's connections."""
        await self._client.aclose()
