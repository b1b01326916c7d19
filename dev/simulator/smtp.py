"""The simulator's SMTP side: one port, personality chosen by the AUTH user, STARTTLS with a self-signed cert.

Replies follow the knobs: outage ``421`` and throttling ``454 Throttling failure`` (SES's wording) at MAIL FROM,
daily quota ``454 … Daily message quota exceeded`` and server errors ``450`` after DATA, syntax errors ``553``
at RCPT; a hang accepts the message and withholds the ``250`` for ``hang_s``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import secrets
import ssl
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dev.simulator.emitter import WebhookEmitter
from dev.simulator.model import SimMessage
from dev.simulator.parsing import is_valid_address, parse_mime
from dev.simulator.state import SimulatorState

# aiosmtpd 1.4 logs a deprecation warning on every successful AUTH from its own internals; keep it quiet.
logging.getLogger("mail.log").setLevel(logging.ERROR)

#: Largest message accepted (advertised with the SIZE extension).
DATA_SIZE_LIMIT = 64 * 1024 * 1024


def self_signed_tls_context(directory: Path) -> ssl.SSLContext:
    """A server TLS context with a fresh self-signed certificate for ``localhost`` / ``127.0.0.1``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "smtp.crt", directory / "smtp.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context


class SimulatorSmtpHandler:
    """aiosmtpd handler applying a personality's knobs and recording what arrives."""

    def __init__(self, state: SimulatorState, emitter: WebhookEmitter) -> None:
        self._state = state
        self._emitter = emitter

    def authenticate(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                     auth_data: Any) -> AuthResult:
        """AUTH PLAIN/LOGIN against the SMTP personalities' username and password."""
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        username = auth_data.login.decode(errors="replace")
        personality = self._state.smtp_personality(username)
        password = auth_data.password.decode(errors="replace")
        if personality is None or personality.credentials.get("password") != password:
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, auth_data=personality.name)

    def _record(self, session: Session, command: str, code: int, result: str, reason: str = "",
                messages: list[SimMessage] | None = None) -> None:
        peer = session.peer if isinstance(session.peer, tuple) else (str(session.peer),)
        self._state.record(
            {
                "personality": str(session.auth_data),
                "provider": "smtp",
                "method": "SMTP",
                "path": command,
                "status": code,
                "result": result,
                "reason": reason,
                "messages": messages or [],
                # The client's address and port tell tests which session (connection) a message came on.
                "request_headers": {"peer": ":".join(str(part) for part in peer),
                                    "tls": "yes" if session.ssl is not None else "no"},
            }
        )

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        """Outage and throttling are decided when a transaction starts."""
        name = str(session.auth_data)
        arrived = time.monotonic()
        await self._state.delay(name)
        if self._state.in_outage(name):
            self._record(session, "MAIL", 421, "outage")
            return "421 4.3.2 Service not available, try again later"
        if not self._state.admit_rate(name, arrived):
            self._record(session, "MAIL", 454, "throttled")
            return "454 4.7.0 Throttling failure: Maximum sending rate exceeded."
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        """Syntax-checks each recipient."""
        if not is_valid_address(address):
            return "553 5.1.3 The recipient address is not a valid RFC 5321 address"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Parse, apply quota and error knobs, record, and answer (maybe late)."""
        name = str(session.auth_data)
        knobs = self._state.knobs(name)
        content = envelope.original_content or envelope.content or b""
        raw = content if isinstance(content, bytes) else content.encode()
        try:
            message = parse_mime(raw, envelope_recipients=list(envelope.rcpt_tos))
        except ValueError as exc:
            self._record(session, "DATA", 554, "invalid", str(exc))
            return "554 5.6.0 Message is not valid MIME"
        message.sender = str(envelope.mail_from or message.sender)
        if not self._state.consume_quota(name, 1):
            self._record(session, "DATA", 454, "quota", messages=[message])
            return "454 4.7.0 Throttling failure: Daily message quota exceeded."
        if self._state.roll(knobs.error_rate):
            self._record(session, "DATA", 450, "error", messages=[message])
            return "450 4.3.0 Temporary server error, try again later"
        message.provider_message_id = secrets.token_hex(8).upper()
        hang = self._state.roll(knobs.hang_rate)
        self._record(session, "DATA", 250, "hung" if hang else "accepted", messages=[message])
        if hang:
            await self._state.hang(knobs.hang_s)
        return f"250 2.0.0 Ok: queued as {message.provider_message_id}"


def smtp_factory(state: SimulatorState, emitter: WebhookEmitter, tls_context: ssl.SSLContext | None) -> SMTP:
    """A new aiosmtpd protocol instance (one per connection)."""
    handler = SimulatorSmtpHandler(state, emitter)
    with warnings.catch_warnings():
        # Plain-text AUTH is deliberate here: loopback only, fake credentials, and clients may still STARTTLS.
        warnings.simplefilter("ignore", UserWarning)
        return _new_smtp(handler, tls_context)


def _new_smtp(handler: SimulatorSmtpHandler, tls_context: ssl.SSLContext | None) -> SMTP:
    return SMTP(
        handler,
        hostname="simulator.esp.test",
        data_size_limit=DATA_SIZE_LIMIT,
        tls_context=tls_context,
        require_starttls=False,
        auth_required=True,
        auth_require_tls=False,
        authenticator=handler.authenticate,
        timeout=60,
    )


def temporary_tls_directory() -> tempfile.TemporaryDirectory[str]:
    """Where the self-signed certificate lives while the simulator runs."""
    return tempfile.TemporaryDirectory(prefix="esp-sim-tls-")
