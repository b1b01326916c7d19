"""The provider adapter contract and the shared send algorithm.

Every upstream email provider (SMTP relay, Mailgun, SendGrid, Amazon SES, Postmark) sits behind one small
``ProviderAdapter`` protocol, and the sender uses nothing else. Following django-anymail's shape, ``BaseAdapter``
owns the algorithm every provider shares — the checks before any network call, the size cap, planning batch
calls, timing, and turning transport failures into an ``Outcome`` — while each provider module fills its hooks:
build its payload, send it, parse the answer (``HttpAdapter`` does the sending for HTTP APIs).

The sender asks ``precheck`` whether a provider would take an email, ``plan_batches`` which emails share one
call, then calls ``send`` / ``send_batch`` and reads ``SendResult.outcome``; it never sees a provider's exceptions
for ordinary failures (those become ``RETRYABLE`` / ``THROTTLED`` / ``PERMANENT`` / ``AMBIGUOUS``). Exceptions
(``libs.providers.errors``) are raised only for problems found *before* any network call: ``MessageTooLarge``,
``TooManyRecipients``, ``UnsupportedFeature`` and ``InvalidMessage`` — the router should have routed elsewhere.

The email model lives in ``libs.providers.model``, the capabilities table in ``libs.providers.capabilities``,
sizes and MIME in ``libs.providers.mime``, DKIM in ``libs.providers.dkim``.

DKIM: where the provider takes our MIME (``Capabilities.signs_raw_mime``) and the sender attached the tenant's keys
(``OutboundEmail.dkim_keys``), the adapter passes the document it is about to hand over through ``sign_mime`` —
the last thing done to it. Such an email is one rendered, signed document, so it is sent on its own, never in a
batch call that personalises per recipient after our signature; a key that cannot sign leaves the email unsigned
by it (a warning), never unsent.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar, Protocol, runtime_checkable

import httpx

from libs.providers.capabilities import Capabilities
from libs.providers.dkim import DEFAULT_SIGNED_HEADERS, MAX_SIGNATURE_BYTES
from libs.providers.errors import (
    AdapterConfigError,
    InvalidMessage,
    MessageTooLarge,
    ProviderError,
    TooManyRecipients,
    UnsupportedFeature,
)
from libs.providers.mime import (
    MimeDocument,
    StreamedBody,
    check_header_fields,
    fits_size_cap,
    mime_size,
    mime_size_bound,
    sign_document,
)
from libs.providers.model import OutboundEmail, Outcome, ProviderConfig, SendResult

__all__ = [
    "BaseAdapter",
    "HttpAdapter",
    "ProviderAdapter",
    "classify_http_failure",
    "classify_httpx_exception",
    "parse_retry_after",
    "provider_tls_context",
    "response_json",
]

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------
# The protocol the sender calls
# ----------------------------------------------------------------------------------------------------


@runtime_checkable
class ProviderAdapter(Protocol):
    """What the sender service needs from any provider, and all it uses."""

    config: ProviderConfig
    capabilities: Capabilities

    def precheck(self, email: OutboundEmail, encoded_size: int) -> ProviderError | None:
        """Why the provider would refuse ``email`` before any network call (None: it would take it), judging its
        size by ``encoded_size``, the caller's measure; renders nothing. ``send`` checks again and decides."""
        ...

    def plan_batches(self, emails: Sequence[OutboundEmail], sizes: Sequence[int] | None = None, *,
                     max_emails: int = 0) -> list[list[int]]:
        """The provider calls ``emails`` need: lists of their indexes, each list one call (one email: a single
        send). ``sizes`` are their encoded sizes when the caller knows them; ``max_emails`` (0: none) lowers the
        batch limits on emails and recipients per call."""
        ...

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
# The shared algorithm
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _BatchLimits:
    """What one batch call may carry."""

    emails: int
    recipients: int
    bytes: int | None
    unique_recipients: bool


@dataclass
class _Batch:
    """A batch call being filled while planning."""

    indexes: list[int] = field(default_factory=list)
    addresses: set[str] = field(default_factory=set)
    recipients: int = 0
    size: int = 0

    def fits(self, addresses: set[str], size: int, limits: _BatchLimits) -> bool:
        if len(self.indexes) >= limits.emails or self.recipients + len(addresses) > limits.recipients:
            return False
        if limits.bytes is not None and self.size + size > limits.bytes:
            return False
        return not limits.unique_recipients or self.addresses.isdisjoint(addresses)

    def add(self, index: int, addresses: set[str], size: int) -> None:
        self.indexes.append(index)
        self.addresses |= addresses
        self.recipients += len(addresses)
        self.size += size


class BaseAdapter(ABC):
    """Owns the checks before any network call, the size cap, batch planning, timing and failure classification.

    Subclasses set ``type_name`` and ``default_capabilities`` (their row of
    ``libs.providers.capabilities.DEFAULT_CAPABILITIES``) and implement the hooks: ``_deliver`` (one email),
    ``_classify_exception``, and when the provider has a batch API ``_deliver_batch`` + ``batch_key``;
    ``check_features`` and ``_capabilities_for`` where the defaults do not fit. ``_classify_exception`` turns
    the transport's exceptions into results; anything it does not recognise propagates (a bug, not an outcome).
    """

    type_name: ClassVar[str] = ""
    default_capabilities: ClassVar[Capabilities]
    dkim_signed_headers: ClassVar[tuple[str, ...]] = DEFAULT_SIGNED_HEADERS
    """The headers our DKIM signatures cover when present; a provider that rewrites one leaves it out."""

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

    # -- DKIM ---------------------------------------------------------------------------------------------

    def signs(self, email: OutboundEmail) -> bool:
        """Whether this adapter signs ``email`` with DKIM: the provider takes our MIME and the email has keys."""
        return bool(email.dkim_keys) and self.capabilities.signs_raw_mime

    def _size_cap(self, email: OutboundEmail) -> int:
        """The size cap the email's unsigned MIME must fit: the provider's, less the room our signatures take."""
        cap = self.capabilities.max_message_bytes
        return cap - MAX_SIGNATURE_BYTES * len(email.dkim_keys) if self.signs(email) else cap

    async def sign_mime(self, email: OutboundEmail, document: MimeDocument) -> tuple[MimeDocument, tuple[str, ...]]:
        """``document`` (the email's final MIME, about to be handed over) signed with the email's DKIM keys when
        this adapter signs it (``signs``), and the algorithms that signed. A key that cannot sign is logged and
        left out; the email is never held back for it."""
        if not self.signs(email):
            return document, ()
        signed, made = await sign_document(document, email.dkim_keys, signed_headers=self.dkim_signed_headers)
        for key, why in made.failed:
            log.warning("DKIM key %s of %s did not sign email %s (%s); sent without its signature",
                        key.selector, key.domain, email.message_id, why)
        return signed, made.algorithms

    # -- the algorithm -----------------------------------------------------------------------------------

    def precheck(self, email: OutboundEmail, encoded_size: int) -> ProviderError | None:
        """Why this provider would refuse ``email`` before any network call, or None (see ``ProviderAdapter``).

        The cheap part of ``validate`` — recipients, bodies, recipient count, the size as ``encoded_size`` says,
        features — so the sender places a bulk batch of hundreds without building each email's MIME just to learn
        its size. ``validate`` runs again when the email is sent and stays the authority.
        """
        problem = self._shape_problem(email)
        if problem is None and encoded_size > self._size_cap(email):
            problem = MessageTooLarge(self.type_name, encoded_size, self._size_cap(email))
        if problem is None:
            try:
                self.check_features(email)
            except ProviderError as exc:
                problem = exc
        return problem

    def validate(self, email: OutboundEmail) -> None:
        """Everything checked before any network call; raises a ``ProviderError`` subclass."""
        problem = self._shape_problem(email)
        if problem is not None:
            raise problem
        self.check_features(email)
        check_header_fields(email)  # before any size is measured: rendering a bad header would raise
        cap = self._size_cap(email)
        fits, size = fits_size_cap(email, cap)
        if not fits:
            raise MessageTooLarge(self.type_name, size, cap)

    def _shape_problem(self, email: OutboundEmail) -> ProviderError | None:
        """No recipients, no body, or more recipients than one message here may have."""
        if not email.recipients:
            return InvalidMessage(f"email {email.message_id} has no recipients")
        if email.text is None and email.html is None:
            return InvalidMessage(f"email {email.message_id} has neither a text nor an HTML body")
        if len(email.recipients) > self.capabilities.max_recipients_per_message:
            return TooManyRecipients(
                self.type_name, len(email.recipients), self.capabilities.max_recipients_per_message
            )
        return None

    async def send(self, email: OutboundEmail) -> SendResult:
        """Validate, send, time and classify one email (see ``ProviderAdapter.send``)."""
        self.validate(email)
        return await self._timed(self._deliver(email))

    async def send_batch(self, emails: Sequence[OutboundEmail]) -> list[SendResult]:
        """Validate all, then make the calls ``plan_batches`` plans: batch calls for groups, single sends for the rest.

        Raises (before any network call) if any email fails validation. Results are in input order.
        """
        for email in emails:
            self.validate(email)
        results: list[SendResult | None] = [None] * len(emails)
        limiter = asyncio.Semaphore(max(1, self._batch_concurrency))

        async def call(indexes: list[int]) -> None:
            async with limiter:
                group = [emails[i] for i in indexes]
                if len(group) == 1:
                    group_results = [await self._timed(self._deliver(group[0]))]
                else:
                    group_results = await self._timed_batch(group)
            for index, result in zip(indexes, group_results, strict=True):
                results[index] = result

        async with asyncio.TaskGroup() as tasks:
            for indexes in self.plan_batches(emails):
                tasks.create_task(call(indexes))
        return [result for result in results if result is not None]

    def plan_batches(self, emails: Sequence[OutboundEmail], sizes: Sequence[int] | None = None, *,
                     max_emails: int = 0) -> list[list[int]]:
        """The calls for ``emails`` as lists of indexes: the batch groups in the order they were opened, then
        every email sent on its own.

        Emails share a call when ``batch_key`` gives them equal keys (never one this adapter signs: its signed
        document is its own), within the capabilities' batch limits and
        ``max_emails`` (the registry's ``batch_size``: a cap on emails and on recipients per call). Unless the
        capabilities turn ``unique_recipients_per_batch`` off, a group never holds the same recipient address
        twice. Bytes count against ``max_batch_bytes`` at ``sizes`` when given, else at the cheap bound, measured
        exactly only when the bound would close a group early — so the sum never exceeds the limit and rarely
        costs a MIME build.
        """
        caps = self.capabilities
        if not caps.supports_batch:
            return [[index] for index in range(len(emails))]
        recipients = caps.max_batch_recipients or caps.max_batch_messages * caps.max_recipients_per_message
        limits = _BatchLimits(min(caps.max_batch_messages, max_emails or caps.max_batch_messages),
                              min(recipients, max_emails or recipients), caps.max_batch_bytes,
                              caps.unique_recipients_per_batch)
        open_batches: dict[object, _Batch] = {}
        batches: list[list[int]] = []
        singles: list[list[int]] = []
        for index, email in enumerate(emails):
            key = None if self.signs(email) else self.batch_key(email)
            if key is None:
                singles.append([index])
                continue
            addresses = {address.email.lower() for address in email.recipients}
            size = 0 if limits.bytes is None else sizes[index] if sizes is not None else mime_size_bound(email)
            batch = open_batches.get(key)
            if batch is not None and sizes is None and size and not batch.fits(addresses, size, limits):
                size = mime_size(email)
            if batch is None or not batch.fits(addresses, size, limits):
                batch = open_batches[key] = _Batch()
                batches.append(batch.indexes)
            batch.add(index, addresses, size)
        return [*batches, *singles]

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


# ----------------------------------------------------------------------------------------------------
# HTTP providers
# ----------------------------------------------------------------------------------------------------


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
