"""SMTP relay adapter (aiosmtplib), streaming the MIME message into DATA.

Configuration (``ProviderConfig``):
    endpoint: ``host:port`` of the relay.
    credentials: ``username`` and ``password`` (both optional; AUTH is used when given).
    options:
        ``tls``: ``starttls`` (default), ``implicit`` (TLS from the first byte, ports 465/2465) or ``none``.
        ``validate_certs``: ``true`` (default) / ``false``.
        ``pool_size``: connections kept open and reused (default 4); also the concurrency limit.
        ``local_hostname``: name sent in EHLO (default: the machine's FQDN).
        ``max_message_bytes``: size cap (default 25 MB, the smallest of the big relays).
        ``max_recipients``: recipients per message (default 100, what RFC 5321 requires servers to accept).

Reply codes: 2xx accepted; 421/451/452/454 (closing, local error, storage, "Throttling failure") throttled;
other 4xx retryable; 5xx permanent (530/534/535/538 as a provider fault: our credentials). A timeout or a
dropped connection after the final ``.`` was written is ambiguous — the relay may have queued the message.

A relay that does not offer what the configuration needs — STARTTLS under ``tls=starttls``, AUTH when credentials
are given — is a permanent fault of the provider: no retry can succeed, and no byte of the email (nor the
password) is sent. A transaction where the relay refused some recipients at RCPT and took the email for the
others is accepted with those recipients in ``SendResult.refused_recipients``, each with the relay's reply; one
where it refused every recipient is judged by the mildest refusal, as if it were the email's.

An email with the tenant's DKIM keys is signed after its MIME is rendered (``BaseAdapter.sign_mime``); dot-stuffing
is SMTP's transparency, undone by the relay, so the relay stores the bytes that were signed.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

import aiosmtplib

from libs.providers.base import BaseAdapter
from libs.providers.capabilities import DEFAULT_CAPABILITIES, Capabilities
from libs.providers.errors import AdapterConfigError
from libs.providers.mime import MimeDocument, build_mime
from libs.providers.model import OutboundEmail, Outcome, ProviderConfig, SendResult, personalize

__all__ = [
    "ADAPTER",
    "DotStuffer",
    "SmtpAdapter",
    "classify_reply",
    "queue_id_from_reply",
]

#: Reply codes that mean "slow down" rather than "broken" (RFC 5321 421/451/452 and SES's 454 throttling).
THROTTLE_CODES = frozenset({421, 451, 452, 454})
#: Reply codes that mean our credentials or authentication setup are wrong.
AUTH_FAILURE_CODES = frozenset({530, 534, 535, 538})
_QUEUED_AS = re.compile(r"queued as\s+<?([^\s>]+)>?", re.IGNORECASE)


class _MissingExtension(aiosmtplib.SMTPException):
    """The relay does not offer an extension the provider's configuration needs (STARTTLS, AUTH)."""


def classify_reply(code: int, message: str) -> SendResult:
    """The outcome an SMTP error reply stands for."""
    reason = f"{code} {message}".strip()
    if code in THROTTLE_CODES:
        return SendResult(Outcome.THROTTLED, reason=reason, status_code=code, provider_fault=True)
    if 400 <= code < 500:
        return SendResult(Outcome.RETRYABLE, reason=reason, status_code=code)
    if code in AUTH_FAILURE_CODES:
        return SendResult(Outcome.PERMANENT, reason=reason, status_code=code, provider_fault=True)
    return SendResult(Outcome.PERMANENT, reason=reason, status_code=code)


def queue_id_from_reply(message: str) -> str:
    """The relay's queue id from a 250 reply (``… queued as ABC123``), else the reply text itself."""
    match = _QUEUED_AS.search(message)
    return match.group(1) if match else message.strip()


class DotStuffer:
    """Applies SMTP transparency (RFC 5321 §4.5.2) to a stream: a line starting with ``.`` gets another ``.``.

    Keeps the last two bytes seen so a ``CRLF.`` split across chunk boundaries is still caught.
    """

    def __init__(self) -> None:
        self._tail = b"\r\n"  # the start of the data counts as the start of a line

    def feed(self, chunk: bytes) -> bytes:
        """The stuffed form of ``chunk``."""
        if not chunk:
            return chunk
        joined = self._tail + chunk
        stuffed = joined.replace(b"\r\n.", b"\r\n..")[len(self._tail) :]
        self._tail = joined[-2:]
        return stuffed


@dataclass(frozen=True)
class SmtpSettings:
    """The parsed SMTP options."""

    host: str
    port: int
    username: str | None
    password: str | None = field(repr=False)
    tls_mode: str
    validate_certs: bool
    pool_size: int
    local_hostname: str | None

    @classmethod
    def from_config(cls, config: ProviderConfig) -> SmtpSettings:
        """Parse and check ``config``; raises ``AdapterConfigError`` listing the problem."""
        host, _, port_text = config.endpoint.rpartition(":")
        if not host or not port_text.isdigit():
            raise AdapterConfigError(f"provider {config.name!r}: smtp endpoint must be host:port")
        tls_mode = config.option("tls", "starttls").lower()
        if tls_mode not in {"starttls", "implicit", "none"}:
            raise AdapterConfigError(f"provider {config.name!r}: option tls must be starttls, implicit or none")
        return cls(
            host=host.strip("[]"),
            port=int(port_text),
            username=config.credentials.get("username") or None,
            password=config.credentials.get("password") or None,
            tls_mode=tls_mode,
            validate_certs=config.option_bool("validate_certs", True),
            pool_size=max(1, config.option_int("pool_size", 4)),
            local_hostname=config.option("local_hostname") or None,
        )


class _ConnectionPool:
    """A few open SMTP sessions, each used by one transaction at a time."""

    def __init__(self, settings: SmtpSettings, connect_timeout_s: float, timeout_s: float) -> None:
        self._settings = settings
        self._connect_timeout_s = connect_timeout_s
        self._timeout_s = timeout_s
        self._idle: list[aiosmtplib.SMTP] = []
        self._slots = asyncio.Semaphore(settings.pool_size)

    async def _connect(self) -> aiosmtplib.SMTP:
        settings = self._settings
        tls_context = None
        if settings.tls_mode != "none" and not settings.validate_certs:
            tls_context = ssl.create_default_context()
            tls_context.check_hostname = False
            tls_context.verify_mode = ssl.CERT_NONE
        client = aiosmtplib.SMTP(
            hostname=settings.host,
            port=settings.port,
            local_hostname=settings.local_hostname,
            timeout=self._timeout_s,
            use_tls=settings.tls_mode == "implicit",
            start_tls=False,  # upgraded below, where a relay that does not offer it is told from a broken one
            validate_certs=settings.validate_certs,
            tls_context=tls_context,
        )
        await client.connect(timeout=self._connect_timeout_s)
        try:
            if settings.tls_mode == "starttls":
                await client.ehlo()
                if not client.supports_extension("starttls"):
                    raise _MissingExtension("the relay does not offer STARTTLS (option tls=starttls)")
                await client.starttls()
            if settings.username is not None:
                await client.ehlo()  # again after STARTTLS: the relay may offer AUTH only over TLS
                if not client.supports_extension("auth"):
                    raise _MissingExtension("the relay does not offer AUTH (credentials are configured)")
                await client.login(settings.username, settings.password or "")
        except BaseException:
            client.close()
            raise
        return client

    @asynccontextmanager
    async def session(self) -> AsyncIterator[_Session]:
        """A connected session; it goes back to the pool only if the caller marks it ``reusable``."""
        async with self._slots:
            reused = False
            client = None
            while self._idle:
                candidate = self._idle.pop()
                if candidate.is_connected:
                    client, reused = candidate, True
                    break
            if client is None:
                client = await self._connect()
            session = _Session(client, reused)
            try:
                yield session
            finally:
                if session.reusable and client.is_connected:
                    self._idle.append(client)
                else:
                    client.close()

    async def reconnect(self, session: _Session) -> None:
        """Replace a session's stale connection with a fresh one."""
        session.client.close()
        session.client = await self._connect()
        session.reused = False

    async def aclose(self) -> None:
        """Say QUIT on idle sessions and drop them."""
        idle, self._idle = self._idle, []
        for client in idle:
            try:
                await client.quit(timeout=1.0)
            except (aiosmtplib.SMTPException, OSError):
                client.close()


class _Session:
    def __init__(self, client: aiosmtplib.SMTP, reused: bool) -> None:
        self.client = client
        self.reused = reused
        self.reusable = False


class SmtpAdapter(BaseAdapter):
    """Sends through any SMTP relay; one transaction per email, sessions pooled."""

    type_name = "smtp"
    default_capabilities = DEFAULT_CAPABILITIES["smtp"]

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        self._settings = SmtpSettings.from_config(config)
        self._pool = _ConnectionPool(self._settings, config.connect_timeout_s, config.timeout_s)

    def _capabilities_for(self, config: ProviderConfig) -> Capabilities:
        # Relays differ widely, so unlike the API providers the caps here may be raised as well as lowered.
        caps = self.default_capabilities
        return Capabilities(
            max_message_bytes=config.option_int("max_message_bytes", caps.max_message_bytes),
            max_recipients_per_message=config.option_int("max_recipients", caps.max_recipients_per_message),
            max_batch_messages=1,
            supports_batch=False,
            supports_idempotency_key=False,
            regions=(config.region,) if config.region else (),
            signs_raw_mime=caps.signs_raw_mime,
        )

    async def _deliver(self, email: OutboundEmail) -> SendResult:
        document, signed_with = await self.sign_mime(email, build_mime(personalize(email)))
        async with self._pool.session() as session:
            try:
                result = await self._transaction(session, email, document)
            except (aiosmtplib.SMTPServerDisconnected, ConnectionError):
                if not session.reused:
                    raise
                # An idle pooled connection the relay has since closed fails on its first command, before any
                # part of this email was accepted: reconnect once and start the transaction again.
                await self._pool.reconnect(session)
                result = await self._transaction(session, email, document)
        return replace(result, dkim_algorithms=signed_with) if signed_with else result

    async def _transaction(
        self, session: _Session, email: OutboundEmail, document: MimeDocument
    ) -> SendResult:
        client = session.client
        mail_options = [f"SIZE={document.size}"] if client.supports_extension("size") else []
        try:
            await client.mail(email.sender.email, options=mail_options)
        except aiosmtplib.SMTPResponseException as exc:
            await self._reset(session)
            return classify_reply(exc.code, exc.message)
        session.reused = False  # from here on a disconnect is not a stale-connection symptom

        refused: list[tuple[str, int, str]] = []
        for recipient in email.recipients:
            try:
                await client.rcpt(recipient.email)
            except aiosmtplib.SMTPRecipientRefused as exc:
                refused.append((recipient.email, exc.code, exc.message))
        if len(refused) == len(email.recipients):
            await self._reset(session)
            # Judge by the mildest refusal: if any recipient might work later, the email might too.
            _, code, message = min(refused, key=lambda item: item[1])
            return classify_reply(code, message)

        start = await client.execute_command(b"DATA")
        if start.code != 354:
            await self._reset(session)
            return classify_reply(start.code, start.message)
        return await self._stream_data(session, document, refused)

    async def _stream_data(
        self, session: _Session, document: MimeDocument, refused: list[tuple[str, int, str]]
    ) -> SendResult:
        client = session.client
        protocol = client.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("connection lost before DATA")
        stuffer = DotStuffer()
        async for chunk in document.stream():
            protocol.write(stuffer.feed(chunk))
            # aiosmtplib has no public streaming DATA; its protocol keeps the stdlib flow-control helper, which
            # is what makes us wait for the socket instead of buffering a 150 MB attachment in memory.
            await protocol._drain_helper()
        # Everything after the terminating dot is ambiguous: the relay may queue the message and still fail
        # to tell us. (write + read_response run without yielding, so the reply cannot be missed.)
        protocol.write(b".\r\n")
        try:
            reply = await protocol.read_response(timeout=self.config.timeout_s)
        except (aiosmtplib.SMTPTimeoutError, aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
            client.close()
            return SendResult(Outcome.AMBIGUOUS, reason=f"no reply after end of data: {exc}")
        if reply.code != 250:
            return classify_reply(reply.code, reply.message)
        session.reusable = True
        return SendResult(
            Outcome.ACCEPTED,
            provider_message_id=queue_id_from_reply(reply.message),
            status_code=reply.code,
            refused_recipients={rcpt: f"{code} {message}".strip() for rcpt, code, message in refused},
        )

    async def _reset(self, session: _Session) -> None:
        """RSET after a refused transaction so the session can be reused; drop it if that fails."""
        try:
            reply = await session.client.rset()
        except (aiosmtplib.SMTPException, OSError):
            return
        session.reusable = reply.code == 250

    def _classify_exception(self, exc: BaseException) -> SendResult | None:
        if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
            return SendResult(
                Outcome.PERMANENT, reason=f"authentication failed: {exc}", status_code=exc.code,
                provider_fault=True,
            )
        if isinstance(exc, aiosmtplib.SMTPNotSupported | _MissingExtension):
            return SendResult(Outcome.PERMANENT, reason=str(exc), provider_fault=True)
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            # Replies outside MAIL/RCPT/DATA (the greeting, EHLO, STARTTLS): the relay's state, not the email's.
            result = classify_reply(exc.code, exc.message)
            return SendResult(
                result.outcome, reason=result.reason, status_code=result.status_code, provider_fault=True
            )
        if isinstance(exc, aiosmtplib.SMTPException | OSError | TimeoutError):
            # Connect failures, and disconnects/timeouts before the end of data: nothing was accepted.
            return SendResult(Outcome.RETRYABLE, reason=f"{type(exc).__name__}: {exc}", provider_fault=True)
        return None

    async def aclose(self) -> None:
        """Close pooled sessions."""
        await self._pool.aclose()


ADAPTER = SmtpAdapter
"""The adapter class of type ``smtp``, found by ``libs.providers.registry``."""
