"""One-click unsubscribe (RFC 8058): the signed, opaque per-recipient token in the URL, and the two headers.

The campaign expander signs a token per recipient and puts ``<base_url>/u/<token>`` in ``List-Unsubscribe``;
reports verifies it when the mail client POSTs there and suppresses the address.

Token format, version 1 (base64url without padding)::

    0x01 | key id (1 byte) | AES-SIV(key, plaintext, associated data = purpose label, version, key id)

with the plaintext ``len(tenant) | tenant | len(campaign) | campaign | len(topic) | topic | address`` (lengths one
byte each, UTF-8). Why this shape:

- **Opaque and tamper-proof**: AES-SIV (RFC 5297) encrypts and authenticates, so the address is not readable from
  the URL (which ends up in access logs and referrers) and a changed byte fails verification.
- **Deterministic**: AES-SIV needs no nonce, so the token is 12 bytes shorter than AES-GCM's and the same
  recipient of the same campaign always gets the same URL: a crash-restarted expansion renders identical mail.
  Equal tokens reveal only that two links are for the same recipient and list.
- **Rotatable**: the key id names the key that signed; verification accepts every configured key, signing uses
  the first. Add the new key first and keep the old ones for the life of the mail already sent.
- **No expiry**: RFC 8058 links must work for as long as the mail is kept; the version byte lets the format change.

A typical token (tenant id, 26-character campaign id, a topic, a 25-character address) is about 140 characters.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from libs.common.errors import InvalidArgument

__all__ = [
    "KEY_BYTES",
    "LIST_UNSUBSCRIBE_POST",
    "MAX_TOKEN_LENGTH",
    "ONE_CLICK_BODY",
    "InvalidUnsubscribeToken",
    "UnsubscribeTarget",
    "UnsubscribeTokens",
    "list_unsubscribe_headers",
    "new_key_entry",
    "unsubscribe_url",
]

ONE_CLICK_BODY = "List-Unsubscribe=One-Click"
"""The form body a mail client POSTs (RFC 8058 section 3.2)."""
LIST_UNSUBSCRIBE_POST = ONE_CLICK_BODY
"""The value of the ``List-Unsubscribe-Post`` header."""
KEY_BYTES = 64
"""Length of a signing key (AES-256-SIV takes two 256-bit keys)."""
MAX_TOKEN_LENGTH = 1024
"""Longer strings are refused before any decoding (a header line should stay far below 998 characters anyway)."""

_VERSION = 1
_PURPOSE = b"esp-mesh/unsubscribe"
_MAX_FIELD_BYTES = 255
_MAX_ADDRESS_BYTES = 320
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_-]+")
_LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost"}


class InvalidUnsubscribeToken(InvalidArgument):
    """The token is malformed, tampered with, of an unknown version, or signed by a key no longer configured.

    The message never says which: that would help whoever is guessing.
    """

    default_reason = "UNSUBSCRIBE_TOKEN_INVALID"

    def __init__(self) -> None:
        super().__init__("invalid unsubscribe token")


@dataclass(frozen=True)
class UnsubscribeTarget:
    """Who unsubscribes from what: what a token carries."""

    tenant_id: str
    email: str
    """The recipient address as the campaign had it."""
    campaign_id: str = ""
    """The campaign the mail belonged to, or empty."""
    topic: str = ""
    """The topic (list) the recipient leaves, or empty for everything the tenant sends."""

    def __post_init__(self) -> None:
        problems = [f"{name} must be at most {_MAX_FIELD_BYTES} bytes"
                    for name in ("tenant_id", "campaign_id", "topic")
                    if len(getattr(self, name).encode()) > _MAX_FIELD_BYTES]
        if not self.tenant_id:
            problems.append("tenant_id must not be empty")
        local, at, domain = self.email.rpartition("@")
        if (not (local and at and domain) or len(self.email.encode()) > _MAX_ADDRESS_BYTES
                or any(c.isspace() for c in self.email)):
            problems.append("email must be an address of at most 320 bytes, without spaces")
        if problems:
            raise ValueError("; ".join(problems))


class UnsubscribeTokens:
    """Signs and verifies unsubscribe tokens with a set of keys; the first signs, every one verifies."""

    def __init__(self, keys: Mapping[int, bytes], signing_key_id: int) -> None:
        if signing_key_id not in keys:
            raise ValueError("the signing key id must be one of the keys")
        for key_id, key in keys.items():
            if not 0 <= key_id <= 255 or len(key) != KEY_BYTES:
                raise ValueError(f"key {key_id}: ids are 0-255 and keys {KEY_BYTES} bytes")
        self._ciphers = {key_id: AESSIV(key) for key_id, key in keys.items()}
        self._signing_key_id = signing_key_id

    @classmethod
    def from_entries(cls, entries: Sequence[str]) -> UnsubscribeTokens:
        """Keys from settings entries ``<id>:<base64url key>`` (see :func:`new_key_entry`); the first one signs.

        Raises ValueError naming every bad entry by position, never quoting key material.
        """
        keys: dict[int, bytes] = {}
        problems: list[str] = []
        for position, entry in enumerate(entries, start=1):
            key_id_text, colon, encoded = entry.strip().partition(":")
            if not colon or not key_id_text.isdigit() or not 0 <= int(key_id_text) <= 255:
                problems.append(f"entry {position}: expected <key id 0-255>:<base64url key>")
                continue
            key = _decode_base64url(encoded.strip())
            if key is None or len(key) != KEY_BYTES:
                problems.append(f"entry {position}: the key must be {KEY_BYTES} bytes, base64url-encoded")
                continue
            if int(key_id_text) in keys:
                problems.append(f"entry {position}: key id {key_id_text} appears twice")
                continue
            keys[int(key_id_text)] = key
        if not entries:
            problems.append("no key given")
        if problems:
            raise ValueError("; ".join(problems))
        first_id = int(entries[0].strip().partition(":")[0])
        return cls(keys, first_id)

    @property
    def signing_key_id(self) -> int:
        """The id of the key new tokens are signed with."""
        return self._signing_key_id

    def sign(self, target: UnsubscribeTarget) -> str:
        """The token for ``target`` (URL-safe; the same target always gets the same token)."""
        header = bytes((_VERSION, self._signing_key_id))
        plaintext = b"".join((
            _field(target.tenant_id), _field(target.campaign_id), _field(target.topic), target.email.encode(),
        ))
        sealed = self._ciphers[self._signing_key_id].encrypt(plaintext, [_PURPOSE, header])
        return base64.urlsafe_b64encode(header + sealed).rstrip(b"=").decode("ascii")

    def verify(self, token: str) -> UnsubscribeTarget:
        """What ``token`` names; :class:`InvalidUnsubscribeToken` when it is not a token of ours."""
        if len(token) > MAX_TOKEN_LENGTH or not _TOKEN_CHARS.fullmatch(token):
            raise InvalidUnsubscribeToken()
        raw = _decode_base64url(token)
        if raw is None or len(raw) < 2 + 16 or raw[0] != _VERSION:
            raise InvalidUnsubscribeToken()
        header, sealed = raw[:2], raw[2:]
        cipher = self._ciphers.get(header[1])
        if cipher is None:
            raise InvalidUnsubscribeToken()
        try:
            plaintext = cipher.decrypt(sealed, [_PURPOSE, header])
            tenant_id, rest = _take_field(plaintext)
            campaign_id, rest = _take_field(rest)
            topic, rest = _take_field(rest)
            return UnsubscribeTarget(tenant_id, rest.decode(), campaign_id, topic)
        except (InvalidTag, ValueError):  # UnicodeDecodeError is a ValueError
            raise InvalidUnsubscribeToken() from None


def new_key_entry(key_id: int) -> str:
    """A fresh random key as a settings entry ``<id>:<base64url key>`` (for ``ESP_UNSUBSCRIBE_KEYS``)."""
    if not 0 <= key_id <= 255:
        raise ValueError("key ids are 0-255")
    return f"{key_id}:" + base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).rstrip(b"=").decode("ascii")


def unsubscribe_url(base_url: str, token: str) -> str:
    """The one-click URL reports serves: ``<base_url>/u/<token>``."""
    return f"{base_url.rstrip('/')}/u/{token}"


def list_unsubscribe_headers(url: str, mailto: str = "") -> dict[str, str]:
    """The RFC 8058 headers for a message: ``List-Unsubscribe`` (the https URL first, then the optional mailto)
    and ``List-Unsubscribe-Post``. Both must be covered by the message's DKIM signature.

    Args:
        url: the one-click URL (:func:`unsubscribe_url`); https, except for a loopback host in development.
        mailto: an address, or a ``mailto:`` URI, for clients that only send mail; empty for none.

    Raises:
        ValueError: the URL is not https, or either value would break the header's ``<…>, <…>`` syntax.
    """
    parts = urlsplit(url)
    if parts.scheme != "https" and not (parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS):
        raise ValueError("the one-click unsubscribe URL must be https (RFC 8058 section 3.1)")
    uris = [url]
    if mailto:
        uris.append(mailto if mailto.lower().startswith("mailto:") else f"mailto:{mailto}")
    for uri in uris:
        if any(c in uri for c in "<>,\"") or any(c.isspace() or not c.isprintable() for c in uri):
            raise ValueError("an unsubscribe URI must not contain spaces, control characters, quotes, <, > or ,")
    return {
        "List-Unsubscribe": ", ".join(f"<{uri}>" for uri in uris),
        "List-Unsubscribe-Post": LIST_UNSUBSCRIBE_POST,
    }


def _field(value: str) -> bytes:
    encoded = value.encode()
    return bytes((len(encoded),)) + encoded


def _take_field(data: bytes) -> tuple[str, bytes]:
    if not data:
        raise ValueError("truncated")
    length = data[0]
    if len(data) < 1 + length:
        raise ValueError("truncated")
    return data[1:1 + length].decode(), data[1 + length:]


def _decode_base64url(text: str) -> bytes | None:
    if len(text) % 4 == 1 or not _TOKEN_CHARS.fullmatch(text):
        return None
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
