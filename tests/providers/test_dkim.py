"""DKIM signatures made by ``libs.providers.dkim``, verified by dkimpy (the reference implementation) against the
public key record ``generate_key`` returns."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable

import dkim as dkimpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

from libs.providers.dkim import BodyHash, DkimKey, generate_key, sign
from libs.providers.mime import build_mime
from libs.providers.model import Address, OutboundEmail

DOMAIN = "mail.example.com"
SELECTOR = "esp1"


@functools.cache
def _key(algorithm: str) -> tuple[DkimKey, str]:
    pem, record = generate_key(algorithm)  # type: ignore[arg-type]
    return DkimKey(DOMAIN, SELECTOR, pem), record


def _dns(record: str) -> Callable[..., bytes | None]:
    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return record.encode() if name == f"{SELECTOR}._domainkey.{DOMAIN}.".encode() else None
    return lookup


def _verifies(message: bytes, record: str) -> bool:
    return bool(dkimpy.verify(message, dnsfunc=_dns(record)))


MESSAGE = (b"From: Ada <ada@mail.example.com>\r\nTo:  bob@example.org\r\nSubject: Hello   there\r\n"
           b"\tfolded on\r\nDate: Mon, 07 Dec 2026 10:00:00 +0000\r\nMessage-ID: <1@mail.example.com>\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
           b"Hi Bob,  \r\n\r\nsee   you\t soon.\r\n\r\n\r\n")


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_a_signed_message_verifies_with_dkimpy(algorithm: str) -> None:
    key, record = _key(algorithm)
    assert _verifies(sign(MESSAGE, key), record)


def test_the_signature_names_the_domain_selector_and_algorithm() -> None:
    key, _ = _key("rsa-sha256")
    header = sign(MESSAGE, key).split(b"\r\n\r\n")[0].decode()
    assert header.startswith("DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=mail.example.com; s=esp1;")
    assert "h=from:from:subject:date:message-id:to:mime-version:content-type;" in header


def test_a_changed_body_fails_verification() -> None:
    key, record = _key("rsa-sha256")
    signed = sign(MESSAGE, key)
    assert not _verifies(signed.replace(b"see   you", b"pay  you"), record)


def test_a_changed_signed_header_fails_verification() -> None:
    key, record = _key("rsa-sha256")
    signed = sign(MESSAGE, key)
    assert not _verifies(signed.replace(b"Subject: Hello", b"Subject: Jello"), record)


def test_a_second_from_added_on_the_way_fails_verification() -> None:
    key, record = _key("rsa-sha256")
    signed = sign(MESSAGE, key)
    assert not _verifies(signed.replace(b"To:", b"From: mallory@evil.example\r\nTo:", 1), record)


def test_whitespace_changes_relaxed_canonicalization_forgives_still_verify() -> None:
    key, record = _key("rsa-sha256")
    signed = sign(MESSAGE, key)
    assert _verifies(signed.replace(b"Hi Bob,  \r\n", b"Hi   Bob,\r\n") + b"\r\n\r\n", record)


def test_a_message_built_by_the_mime_encoder_verifies() -> None:
    key, record = _key("rsa-sha256")
    email = OutboundEmail(
        message_id="m-1", tenant_id="acme", message_class="bulk", sender=Address("news@mail.example.com", "News"),
        to=(Address("ada@example.org"),),
        subject="Grüße — a long subject line that the encoder will fold over more than one line of the header",
        text="Plain text\nwith lines\n", html="<p>HTML <b>body</b></p>\n")
    document = build_mime(email)
    raw = b"".join(segment for segment in document.segments if isinstance(segment, bytes))
    assert _verifies(sign(raw, key), record)


@given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=8),
       st.integers(min_value=1, max_value=17))
def test_the_body_hash_is_the_same_whatever_the_chunks(lines: list[bytes], chunk: int) -> None:
    body = b"\r\n".join(lines) + b"\r\n\r\n"
    whole = BodyHash()
    whole.update(body)
    pieces = BodyHash()
    for start in range(0, len(body), chunk):
        pieces.update(body[start:start + chunk])
    assert pieces.digest() == whole.digest()


@given(st.lists(st.text(alphabet=" \tab", max_size=12), max_size=6))
def test_the_body_hash_agrees_with_dkimpys_relaxed_canonicalization(lines: list[str]) -> None:
    # Bodies as they cross SMTP: ending in CRLF. (For a last line without one, dkimpy keeps its trailing
    # whitespace; we hash what the receiver will see once the transport ended the line.)
    body = "".join(line + "\r\n" for line in lines).encode()
    ours = BodyHash()
    ours.update(body)
    reference = dkimpy.canonicalization.Relaxed.canonicalize_body(body)
    assert ours.digest() == hashlib.sha256(reference).digest()
