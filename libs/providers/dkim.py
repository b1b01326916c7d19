"""DKIM signatures (RFC 6376) made by the mesh, with OpenSSL doing the public-key work.

The send path runs at ~2,000 emails/s on two cores; dkimpy (the reference implementation, which the tests verify
our signatures with) does its RSA in Python and signs a few hundred emails a second, so it would become the
bottleneck. Here canonicalization is byte regexes and the signature is ``cryptography``'s (OpenSSL):
``make bench BENCH=dkim`` measures both.

What is implemented is what the mesh signs with: ``rsa-sha256`` (RSA 2048) and ``ed25519-sha256`` (RFC 8463),
``relaxed/relaxed`` canonicalization, the whole body (no ``l=``). The body hash is computed incrementally
(:class:`BodyHash`), so a MIME document whose attachments stream in can be hashed as it streams, once, before its
headers are sent; :func:`sign` does the whole thing for a message in memory (``libs.providers.mime.sign_document``
for a streamed document as the adapters that send raw MIME hold it; several keys sign one body hash: RFC 8463's
dual RSA + Ed25519 signing).
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

__all__ = [
    "DEFAULT_SIGNED_HEADERS",
    "MAX_SIGNATURE_BYTES",
    "Algorithm",
    "BodyHash",
    "DkimKey",
    "Signatures",
    "generate_key",
    "sign",
    "signature_header",
    "signatures",
    "split_message",
]

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]

DEFAULT_SIGNED_HEADERS: tuple[str, ...] = (
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc", "mime-version", "content-type",
    "content-transfer-encoding", "list-unsubscribe", "list-unsubscribe-post", "list-id", "feedback-id",
)
"""Headers signed when present, in this order. ``from`` is signed once more than it appears (RFC 6376 8.15):
a second From added on the way would break the signature instead of being shown to the reader."""

MAX_SIGNATURE_BYTES = 1024
"""What one ``DKIM-Signature`` field adds to a message at most (RSA-2048 with every default header signed: about
800 bytes), for size caps measured before signing."""

_WSP_RUN = re.compile(rb"[ \t]{2,}|\t")
"""Whitespace that relaxed canonicalization changes: runs, and tabs (a lone space stays; matching every one of a
body's thousands of spaces cost more than the signature)."""
_WSP_BEFORE_EOL = re.compile(rb" +\r\n")
"""Whitespace at a line's end, once ``_WSP_RUN`` made every run of it one space."""
_FOLD = re.compile(rb"\r\n(?=[ \t])")
_HEADER = re.compile(rb"^([^:\s]+)[ \t]*:(.*?)\r\n(?![ \t])", re.S | re.M)


@dataclass(frozen=True, repr=False)
class DkimKey:
    """A signing key with the domain and selector its public half is published under
    (``<selector>._domainkey.<domain>``)."""

    domain: str
    selector: str
    private_key_pem: bytes

    @property
    def algorithm(self) -> Algorithm:
        """The ``a=`` tag its signatures carry."""
        return "ed25519-sha256" if isinstance(self._private_key, ed25519.Ed25519PrivateKey) else "rsa-sha256"

    @property
    def _private_key(self) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
        return _load_private_key(self.private_key_pem)

    def __repr__(self) -> str:  # never the key
        return f"DkimKey(domain={self.domain!r}, selector={self.selector!r})"


_LOADED: dict[bytes, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey] = {}


def _load_private_key(pem: bytes) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    # Parsing a PEM RSA key (and its consistency check) costs more than a signature: once per key per process.
    key = _LOADED.get(pem)
    if key is None:
        loaded = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(loaded, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
            raise ValueError(f"a DKIM key is RSA or Ed25519, not {type(loaded).__name__}")
        if len(_LOADED) > 10_000:
            _LOADED.clear()
        key = _LOADED[pem] = loaded
    return key


def generate_key(algorithm: Algorithm = "rsa-sha256") -> tuple[bytes, str]:
    """A new private key (PEM, unencrypted: the caller seals it) and the DNS TXT record value that publishes its
    public half (``v=DKIM1; k=rsa; p=...``)."""
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == "rsa-sha256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = private.public_key().public_bytes(serialization.Encoding.DER,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo)
        kind = "rsa"
    else:
        private = ed25519.Ed25519PrivateKey.generate()
        public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        kind = "ed25519"
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return pem, f"v=DKIM1; k={kind}; p={base64.b64encode(public).decode()}"


class BodyHash:
    """SHA-256 of a body in ``relaxed`` canonicalization (RFC 6376 3.4.4), fed in chunks of any size.

    Whitespace runs become one space, whitespace at line ends goes, empty lines at the end go, and a non-empty
    body ends with CRLF. Lines are processed once complete; empty lines are held back until a non-empty line shows
    they were not the body's last."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._partial = b""
        self._held_empty_lines = 0
        self._closed = False

    def update(self, chunk: bytes) -> None:
        """Feed the next bytes of the body."""
        data = self._partial + chunk
        end = data.rfind(b"\r\n")
        # A chunk ending in CR may continue with LF: keep the incomplete line (and that CR) for the next chunk.
        if end < 0:
            self._partial = data
            return
        self._partial = data[end + 2:]
        self._lines(data[:end + 2])

    def _lines(self, complete: bytes) -> None:
        canonical = _relaxed_lines(complete)
        stripped = canonical.rstrip(b"\r\n")
        trailing = (len(canonical) - len(stripped)) // 2  # CRLFs after the last non-empty line
        if stripped:
            self._hash.update(b"\r\n" * self._held_empty_lines)
            self._hash.update(stripped + b"\r\n")
            self._held_empty_lines = trailing - 1
        else:
            self._held_empty_lines += trailing

    def digest(self) -> bytes:
        """The body hash; the body is complete (no more ``update``)."""
        if not self._closed:
            self._closed = True
            if self._partial:  # a last line without CRLF gets one
                partial, self._partial = self._partial, b""
                self._lines(partial + b"\r\n")
        return self._hash.digest()


def _relaxed_lines(lines: bytes) -> bytes:
    # The regexes scan at a fraction of the speed of ``in`` (memchr and friends), and most bodies (base64,
    # quoted-printable, generated HTML) hold nothing for them to change: look first.
    if b"\t" in lines or b"  " in lines:
        lines = _WSP_RUN.sub(b" ", lines)
    if b" \r\n" in lines:
        lines = _WSP_BEFORE_EOL.sub(b"\r\n", lines)
    return lines


def _relaxed_header(name: bytes, value: bytes) -> bytes:
    unfolded = _FOLD.sub(b"", value)
    return name.lower().strip() + b":" + _WSP_RUN.sub(b" ", unfolded).strip(b" \t\r\n")


def split_message(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The header fields (name, raw value with its folds) and the body of a CRLF message."""
    end = message.find(b"\r\n\r\n")
    head, body = (message, b"") if end < 0 else (message[:end + 2], message[end + 4:])
    return [(m.group(1), m.group(2)) for m in _HEADER.finditer(head)], body


def signature_header(key: DkimKey, fields: Sequence[tuple[bytes, bytes]], body_hash: bytes, *,
                     signed_headers: Iterable[str] = DEFAULT_SIGNED_HEADERS, timestamp: int | None = None) -> bytes:
    """The ``DKIM-Signature`` field (folded, CRLF-terminated) for a message with header ``fields`` (name, raw
    value) and ``body_hash`` (:class:`BodyHash`). Of each name in ``signed_headers`` the fields present are
    signed, last first as RFC 6376 5.4.2 pairs them; ``from`` once more than it appears."""
    by_name: dict[bytes, list[bytes]] = {}
    for field_name, value in fields:
        by_name.setdefault(field_name.lower(), []).append(value)
    names: list[str] = []
    hashed: list[bytes] = []
    for name in signed_headers:
        for value in reversed(by_name.get(name.encode(), [])):
            names.append(name)
            hashed.append(_relaxed_header(name.encode(), value) + b"\r\n")
        if name == "from":
            names.append(name)  # the absent extra From: nothing is hashed for it
    when = int(time.time()) if timestamp is None else timestamp
    tags = (f"v=1; a={key.algorithm}; c=relaxed/relaxed; d={key.domain}; s={key.selector}; t={when};\r\n"
            f"\th={':'.join(names)};\r\n\tbh={base64.b64encode(body_hash).decode()};\r\n\tb=")
    unsigned = b"DKIM-Signature: " + tags.encode()
    data = b"".join(hashed) + _relaxed_header(b"dkim-signature", unsigned.split(b":", 1)[1])
    private = key._private_key
    if isinstance(private, rsa.RSAPrivateKey):
        signature = private.sign(data, padding.PKCS1v15(), hashes.SHA256())
    else:
        signature = private.sign(hashlib.sha256(data).digest())
    encoded = base64.b64encode(signature)
    folded = b"\r\n\t".join(encoded[i:i + 72] for i in range(0, len(encoded), 72))
    return unsigned + folded + b"\r\n"


def sign(message: bytes, *keys: DkimKey, signed_headers: Iterable[str] = DEFAULT_SIGNED_HEADERS,
         timestamp: int | None = None) -> bytes:
    """``message`` (CRLF line ends) with a ``DKIM-Signature`` field of each key prepended, in the order given (the
    body is hashed once). Raises what a key that cannot sign raises (``ValueError``)."""
    fields, body = split_message(message)
    body_hash = BodyHash()
    body_hash.update(body)
    digest = body_hash.digest()
    headers = tuple(signed_headers)
    return b"".join(signature_header(key, fields, digest, signed_headers=headers, timestamp=timestamp)
                    for key in keys) + message


@dataclass(frozen=True)
class Signatures:
    """The ``DKIM-Signature`` fields made for one message, and the keys that could not sign it."""

    fields: bytes
    """The fields, each folded and CRLF-terminated, to put before the message's own."""
    algorithms: tuple[Algorithm, ...]
    """The ``a=`` of each field made, in order."""
    failed: tuple[tuple[DkimKey, str], ...] = ()
    """Each key that did not sign, with why (a key that does not load, an algorithm OpenSSL refuses)."""


def signatures(keys: Iterable[DkimKey], fields: Sequence[tuple[bytes, bytes]], body_hash: bytes, *,
               signed_headers: Iterable[str] = DEFAULT_SIGNED_HEADERS, timestamp: int | None = None) -> Signatures:
    """A signature of each key over header ``fields`` and ``body_hash``; a key that cannot sign is left out and
    named in :attr:`Signatures.failed` (the others still sign)."""
    headers = tuple(signed_headers)
    made: list[bytes] = []
    algorithms: list[Algorithm] = []
    failed: list[tuple[DkimKey, str]] = []
    for key in keys:
        try:
            made.append(signature_header(key, fields, body_hash, signed_headers=headers, timestamp=timestamp))
            algorithms.append(key.algorithm)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            failed.append((key, f"{type(exc).__name__}: {exc}"))
    return Signatures(b"".join(made), tuple(algorithms), tuple(failed))
