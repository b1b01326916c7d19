"""Secrets sealed at rest: envelope encryption with AES-256-GCM under key-encryption keys from the environment.

Provider credentials, provider webhook signing secrets and the like are stored (Postgres) and broadcast (the NATS
KV catalog) only sealed; a service opens them in memory when it needs them. The key-encryption keys (KEKs) come
from one setting, ``ESP_SECRETS_KEYS`` (a Kubernetes Secret in production, a fresh key per run in the dev mesh)::

    <key id>:<base64 32 bytes>[,<key id>:<base64 32 bytes>...]

The first key seals; every listed key opens. Rotate a KEK by putting the new one first and keeping the old ones
until everything sealed with them has been sealed again (:meth:`SecretBox.needs_reseal` says which values).

Sealed format, version 1 (bytes)::

    0x01 | len(key id) (1 byte) | key id (ASCII)
         | data-key nonce (12) | AES-GCM(KEK, data key (32), aad = label | key id | context) (48)
         | value nonce (12)    | AES-GCM(data key, plaintext, aad = label | context)

Why this shape:

- **A data key per value**: a KEK only ever encrypts 32 random bytes, so it never approaches AES-GCM's limits on
  data per key, and re-sealing under a new KEK needs only the data key re-wrapped (it is re-sealed whole here for
  simplicity: values are small).
- **The context is associated data**: ``seal(..., context="router.provider_credentials/ses-eu")`` opens only with
  the same context, so a ciphertext copied onto another row (or another provider) does not open there.
- **Fingerprints are keyed**: :meth:`SecretBox.fingerprint` is an HMAC-SHA256 under a key derived (HKDF) from a
  KEK, so a stored fingerprint of something holding a secret (a create request's credentials) cannot be checked
  offline against guessed values. It names the KEK it was made with, so it still verifies after a rotation while
  that key is listed; once the key is dropped it no longer verifies (:meth:`SecretBox.fingerprint_matches` says
  False), which the caller must treat as "different", never as "same".
- **Nothing leaks in errors**: :class:`SecretUnreadable` never says whether the key, the context or the bytes were
  wrong, and :meth:`SecretBox.from_setting` never quotes key material.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "KEY_BYTES",
    "SecretBox",
    "SecretUnreadable",
    "generate_key_setting",
    "optional_secret_box",
]

KEY_BYTES = 32
"""Length of a key-encryption key and of each data key (AES-256)."""

_VERSION = 1
_NONCE_BYTES = 12
_TAG_BYTES = 16
_WRAPPED_BYTES = KEY_BYTES + _TAG_BYTES
_LABEL = b"esp-mesh/secret-box/v1"
_KEY_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class SecretUnreadable(Exception):
    """A sealed value does not open: wrong or unknown key, wrong context, truncated or tampered with.

    The message never says which (nor quotes the value): the caller logs the context it asked for, nothing more.
    """

    def __init__(self, context: str = "") -> None:
        super().__init__(f"sealed secret unreadable (context {context!r})" if context else "sealed secret unreadable")


class SecretBox:
    """Seals and opens secrets with a set of key-encryption keys; the first (active) one seals, every one opens."""

    def __init__(self, keys: dict[str, bytes], active_key_id: str) -> None:
        if active_key_id not in keys:
            raise ValueError("the active key id must be one of the keys")
        for key_id, key in keys.items():
            if not _KEY_ID.fullmatch(key_id):
                raise ValueError(f"key id {key_id!r}: 1-64 characters of A-Z a-z 0-9 _ . -")
            if len(key) != KEY_BYTES:
                raise ValueError(f"key {key_id!r}: must be {KEY_BYTES} bytes")
        self._keks = {key_id: AESGCM(key) for key_id, key in keys.items()}
        self._fingerprint_keys = {key_id: _fingerprint_key(key_id, key) for key_id, key in keys.items()}
        self._active = active_key_id

    def __repr__(self) -> str:
        return f"SecretBox(active={self._active!r}, keys={sorted(self._keks)!r})"

    @classmethod
    def from_setting(cls, keys: str) -> SecretBox:
        """Keys from the ``ESP_SECRETS_KEYS`` format, ``<id>:<base64 32 bytes>`` separated by commas, first active.

        Raises ValueError naming every bad entry by position (and id), never quoting key material.
        """
        entries = [entry.strip() for entry in keys.split(",") if entry.strip()]
        parsed: dict[str, bytes] = {}
        problems: list[str] = []
        for position, entry in enumerate(entries, start=1):
            key_id, colon, encoded = entry.partition(":")
            key_id = key_id.strip()
            if not colon or not _KEY_ID.fullmatch(key_id):
                problems.append(f"entry {position}: expected <key id>:<base64 key>, the id 1-64 characters of "
                                "A-Z a-z 0-9 _ . -")
                continue
            key = _decode_base64(encoded.strip())
            if key is None or len(key) != KEY_BYTES:
                problems.append(f"entry {position} (key id {key_id}): the key must be {KEY_BYTES} bytes, "
                                "base64-encoded")
                continue
            if key_id in parsed:
                problems.append(f"entry {position}: key id {key_id} appears twice")
                continue
            parsed[key_id] = key
        if not entries:
            problems.append("no key given")
        if problems:
            raise ValueError("; ".join(problems))
        return cls(parsed, entries[0].partition(":")[0].strip())

    @property
    def active_key_id(self) -> str:
        """The id of the key new values are sealed with."""
        return self._active

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Every configured key id, the active one first."""
        return (self._active, *sorted(k for k in self._keks if k != self._active))

    def seal(self, plaintext: bytes, *, context: str) -> bytes:
        """``plaintext`` sealed under a fresh data key wrapped by the active KEK, bound to ``context``."""
        key_id = self._active.encode("ascii")
        data_key = AESGCM.generate_key(bit_length=KEY_BYTES * 8)
        wrap_nonce = secrets.token_bytes(_NONCE_BYTES)
        wrapped = self._keks[self._active].encrypt(wrap_nonce, data_key, _wrap_aad(key_id, context))
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = AESGCM(data_key).encrypt(nonce, plaintext, _value_aad(context))
        return b"".join((bytes((_VERSION, len(key_id))), key_id, wrap_nonce, wrapped, nonce, sealed))

    def open(self, sealed: bytes, *, context: str) -> bytes:
        """The plaintext of ``sealed``; :class:`SecretUnreadable` unless it was sealed by one of our keys for
        exactly this ``context`` and is intact."""
        key_id, rest = _split_header(sealed, context)
        kek = self._keks.get(key_id.decode("ascii"))
        if kek is None or len(rest) < _NONCE_BYTES + _WRAPPED_BYTES + _NONCE_BYTES + _TAG_BYTES:
            raise SecretUnreadable(context)
        wrap_nonce, rest = rest[:_NONCE_BYTES], rest[_NONCE_BYTES:]
        wrapped, rest = rest[:_WRAPPED_BYTES], rest[_WRAPPED_BYTES:]
        nonce, ciphertext = rest[:_NONCE_BYTES], rest[_NONCE_BYTES:]
        try:
            data_key = kek.decrypt(wrap_nonce, wrapped, _wrap_aad(key_id, context))
            return AESGCM(data_key).decrypt(nonce, ciphertext, _value_aad(context))
        except InvalidTag:
            raise SecretUnreadable(context) from None

    def sealed_key_id(self, sealed: bytes) -> str:
        """The id of the KEK ``sealed`` was sealed with (no decryption; :class:`SecretUnreadable` if malformed)."""
        return _split_header(sealed, "")[0].decode("ascii")

    def needs_reseal(self, sealed: bytes) -> bool:
        """Whether ``sealed`` was sealed by a key other than the active one (re-seal it to finish a rotation)."""
        return self.sealed_key_id(sealed) != self._active

    def fingerprint(self, data: bytes, *, context: str) -> bytes:
        """A keyed digest of ``data`` for ``context``: equal inputs, equal fingerprints under the same key, and
        nothing a guess of ``data`` can be checked against without a KEK.

        Format, under the active key (compare with :meth:`fingerprint_matches`, which uses the key it names)::

            0x01 | len(key id) | key id | HMAC-SHA256(HKDF(KEK, label | key id), len(context) | context | data)
        """
        return self._fingerprint_with(self._active, data, context)

    def fingerprint_matches(self, fingerprint: bytes, data: bytes, *, context: str) -> bool:
        """Whether ``fingerprint`` is :meth:`fingerprint` of ``data`` for ``context`` under any configured key
        (the one it names). False, never an error, for one made by a key no longer configured, an unkeyed or
        malformed value, or different data: the caller must treat "cannot tell" as "different"."""
        try:
            key_id, _ = _split_header(fingerprint, context)
        except SecretUnreadable:
            return False
        name = key_id.decode("ascii")
        if name not in self._fingerprint_keys:
            return False
        return hmac.compare_digest(fingerprint, self._fingerprint_with(name, data, context))

    def _fingerprint_with(self, key_id: str, data: bytes, context: str) -> bytes:
        encoded_id = key_id.encode("ascii")
        encoded_context = context.encode()
        message = b"".join((len(encoded_context).to_bytes(4, "big"), encoded_context, data))
        mac = hmac.new(self._fingerprint_keys[key_id], message, hashlib.sha256)
        return b"".join((bytes((_VERSION, len(encoded_id))), encoded_id, mac.digest()))


def generate_key_setting(key_id: str = "k1") -> str:
    """A fresh random key as an ``ESP_SECRETS_KEYS`` entry ``<id>:<base64 32 bytes>`` (dev mesh, tests)."""
    if not _KEY_ID.fullmatch(key_id):
        raise ValueError("key ids are 1-64 characters of A-Z a-z 0-9 _ . -")
    return f"{key_id}:" + base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode("ascii")


def optional_secret_box(keys: str) -> SecretBox | None:
    """The box of an ``ESP_SECRETS_KEYS`` value, or None when it is empty (a service that only reads sealed values
    where it can); ValueError prefixed with the setting's name when it is malformed."""
    if not keys.strip():
        return None
    try:
        return SecretBox.from_setting(keys)
    except ValueError as exc:
        raise ValueError(f"ESP_SECRETS_KEYS: {exc}") from None


def _split_header(sealed: bytes, context: str) -> tuple[bytes, bytes]:
    if len(sealed) < 2 or sealed[0] != _VERSION:
        raise SecretUnreadable(context)
    length = sealed[1]
    key_id = sealed[2:2 + length]
    if length == 0 or len(key_id) != length or not key_id.isascii() or not _KEY_ID.fullmatch(key_id.decode()):
        raise SecretUnreadable(context)
    return key_id, sealed[2 + length:]


def _fingerprint_key(key_id: str, key: bytes) -> bytes:
    """The HMAC key of fingerprints made under one KEK: never the KEK itself, so a fingerprint says nothing
    about what it seals."""
    info = b"\x00".join((_LABEL, b"fingerprint", key_id.encode("ascii")))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(key)


def _wrap_aad(key_id: bytes, context: str) -> bytes:
    return b"\x00".join((_LABEL, b"kek", key_id, context.encode()))


def _value_aad(context: str) -> bytes:
    return b"\x00".join((_LABEL, b"value", context.encode()))


def _decode_base64(text: str) -> bytes | None:
    """Standard or URL-safe base64, padded or not; None when it is not base64."""
    normalised = text.replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(normalised + "=" * (-len(normalised) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
