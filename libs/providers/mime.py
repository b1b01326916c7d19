"""Streaming encoders for ``OutboundEmail``: MIME documents and HTTP bodies with streamed attachments.

SMTP and SES carry the whole email as one MIME document. Attachments can be up to 150 MB, so the document is
kept as a list of segments — small rendered byte strings plus attachments whose base64 is produced while their
bytes stream in — and its exact size is known up front (base64 sizes follow from the raw sizes), which is what
the size cap and Content-Length need.

Sizes live here too, next to the layout they measure: ``mime_size`` is the one measure every adapter compares with
``Capabilities.max_message_bytes`` (exact for SMTP and SES, which carry this MIME; an upper bound for JSON
providers, whose base64 has no line breaks); ``mime_size_bound`` bounds it in microseconds, and
``fits_size_cap`` uses the bound first and renders only when the bound does not already prove the email fits.

Headers and text bodies are rendered by the standard library's ``email`` package (RFC 2047 encoded words,
RFC 2231 parameters, quoted-printable bodies, line folding); this module only lays out the multipart tree.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage, MIMEPart
from email.utils import format_datetime

from libs.providers.dkim import DEFAULT_SIGNED_HEADERS, BodyHash, DkimKey, Signatures, signatures, split_message
from libs.providers.errors import AttachmentSizeMismatch, InvalidMessage
from libs.providers.model import (
    ESP_MESSAGE_ID_HEADER,
    PLACEHOLDER_PATTERN,
    Address,
    Attachment,
    OutboundEmail,
    personalize,
    recipient_values,
)

__all__ = [
    "MimeDocument",
    "StreamedBody",
    "StreamedPart",
    "base64_chunks",
    "base64_encoded_size",
    "build_mime",
    "check_header_fields",
    "fits_size_cap",
    "mime_size",
    "mime_size_bound",
    "raw_chunks",
    "sign_document",
    "streamed_form_data",
    "streamed_json",
]

#: Base64 line length in MIME bodies (RFC 2045): 57 raw bytes become one 76-character line.
BASE64_LINE_CHARS = 76
_RAW_BYTES_PER_LINE = 57
#: Lines per encoded block when streaming: about 1 MiB of base64 per yield.
_LINES_PER_BLOCK = 13_797

#: Headers the writer sets itself; an email's own ``headers`` may not override them.
RESERVED_HEADERS = frozenset(
    {"from", "to", "cc", "bcc", "reply-to", "subject", "date", "message-id", "mime-version",
     "content-type", "content-transfer-encoding", ESP_MESSAGE_ID_HEADER.lower()}
)


def base64_encoded_size(raw_size: int, *, line_length: int | None = None) -> int:
    """Bytes of base64 for ``raw_size`` bytes; with ``line_length``, every line ends in CRLF."""
    encoded = 4 * ((raw_size + 2) // 3)
    if line_length is None or encoded == 0:
        return encoded
    lines = (encoded + line_length - 1) // line_length
    return encoded + 2 * lines


async def base64_chunks(attachment: Attachment, *, line_breaks: bool) -> AsyncIterator[bytes]:
    """Base64 of the attachment's bytes, streamed; with ``line_breaks`` as 76-character CRLF-terminated lines.

    Raises ``AttachmentSizeMismatch`` when the stream length differs from ``attachment.size`` (the caller has
    already announced sizes derived from it).
    """
    block_raw = _RAW_BYTES_PER_LINE * _LINES_PER_BLOCK
    pending = bytearray()
    seen = 0
    async for chunk in attachment.chunks():
        seen += len(chunk)
        pending += chunk
        if len(pending) >= block_raw:
            usable = len(pending) - len(pending) % _RAW_BYTES_PER_LINE
            yield _encode(bytes(pending[:usable]), line_breaks)
            del pending[:usable]
    if seen != attachment.size:
        raise AttachmentSizeMismatch(
            f"attachment {attachment.filename!r} declared {attachment.size} bytes but streamed {seen}"
        )
    if pending:
        yield _encode(bytes(pending), line_breaks)


def _encode(raw: bytes, line_breaks: bool) -> bytes:
    encoded = base64.b64encode(raw)
    if not line_breaks:
        return encoded
    lines = [encoded[i : i + BASE64_LINE_CHARS] for i in range(0, len(encoded), BASE64_LINE_CHARS)]
    return b"\r\n".join(lines) + b"\r\n"


@dataclass(frozen=True)
class MimeDocument:
    """A rendered MIME message whose attachment bodies are produced on demand."""

    segments: tuple[bytes | Attachment, ...]
    size: int
    """Exact size in bytes of what ``stream`` yields."""

    async def stream(self) -> AsyncIterator[bytes]:
        """The document's bytes (CRLF line endings), streaming attachment bodies."""
        for segment in self.segments:
            if isinstance(segment, bytes):
                yield segment
            else:
                async for block in base64_chunks(segment, line_breaks=True):
                    yield block

    async def read(self) -> bytes:
        """The whole document in memory (for APIs that take nothing else, e.g. boto3)."""
        buffer = bytearray()
        async for block in self.stream():
            buffer += block
        return bytes(buffer)


def _header_address(address: Address) -> HeaderAddress:
    try:
        return HeaderAddress(display_name=address.name, addr_spec=address.email)
    except (ValueError, IndexError) as exc:
        raise InvalidMessage(f"invalid address {address.email!r}: {exc}") from exc


def _leaf(text: str, subtype: str) -> bytes:
    part = MIMEPart(policy=policy.SMTP)
    part.set_content(text, subtype=subtype, charset="utf-8", cte="quoted-printable")
    return part.as_bytes()


def _attachment_headers(attachment: Attachment) -> bytes:
    part = MIMEPart(policy=policy.SMTP)
    part["Content-Type"] = attachment.content_type or "application/octet-stream"
    part.set_param("name", attachment.filename)
    disposition = "inline" if attachment.is_inline else "attachment"
    part.add_header("Content-Disposition", disposition, filename=attachment.filename)
    if attachment.content_id is not None:
        part["Content-ID"] = f"<{attachment.content_id.strip('<>')}>"
    part["Content-Transfer-Encoding"] = "base64"
    return part.as_bytes()


def _top_headers(
    email: OutboundEmail, extra_headers: Sequence[tuple[str, str]], include_bcc: bool, date: datetime
) -> bytes:
    message = EmailMessage(policy=policy.SMTP)
    message["From"] = _header_address(email.sender)
    if email.to:
        message["To"] = [_header_address(a) for a in email.to]
    if email.cc:
        message["Cc"] = [_header_address(a) for a in email.cc]
    if include_bcc and email.bcc:
        message["Bcc"] = [_header_address(a) for a in email.bcc]
    if email.reply_to:
        message["Reply-To"] = [_header_address(a) for a in email.reply_to]
    message["Subject"] = email.subject
    message["Date"] = format_datetime(date)
    # A stable Message-ID: a retry of the same email carries the same id, so receivers can spot duplicates.
    domain = email.sender.email.rpartition("@")[2] or "esp.invalid"
    message["Message-ID"] = f"<{email.message_id}@{domain}>"
    message["MIME-Version"] = "1.0"
    message[ESP_MESSAGE_ID_HEADER] = email.message_id
    try:
        for name, value in [*email.headers.items(), *extra_headers]:
            if name.lower() in RESERVED_HEADERS:
                raise InvalidMessage(f"header {name!r} is set by the platform and cannot be overridden")
            message[name] = value
        rendered = message.as_bytes()
    except (ValueError, TypeError) as exc:
        raise InvalidMessage(f"invalid header in email {email.message_id}: {exc}") from exc
    # as_bytes ends the header block with an empty line; the body part supplies its own headers after it.
    return rendered.removesuffix(b"\r\n")


def build_mime(
    email: OutboundEmail,
    *,
    extra_headers: Sequence[tuple[str, str]] = (),
    include_bcc: bool = False,
    date: datetime | None = None,
) -> MimeDocument:
    """Lay out ``email`` as MIME: alternative(text, html) inside related(inline…) inside mixed(attachments…).

    Bcc recipients are left out of the headers unless ``include_bcc`` (they travel in the SMTP envelope or the
    API's destination list). Deterministic boundaries derived from the message id keep sizes reproducible.
    """
    segments: list[bytes | Attachment] = []
    token = email.message_id.replace("-", "")

    def open_multipart(subtype: str, level: str) -> bytes:
        boundary = f"=_esp_{level}_{token}"
        segments.append(f'Content-Type: multipart/{subtype};\r\n boundary="{boundary}"\r\n\r\n'.encode())
        return boundary.encode()

    def body_parts() -> None:
        if email.text is not None and email.html is not None:
            boundary = open_multipart("alternative", "alt")
            for text, subtype in ((email.text, "plain"), (email.html, "html")):
                segments.append(b"--" + boundary + b"\r\n" + _leaf(text, subtype))
            segments.append(b"--" + boundary + b"--\r\n")
        elif email.html is not None:
            segments.append(_leaf(email.html, "html"))
        else:
            segments.append(_leaf(email.text or "", "plain"))

    def attachment_part(boundary: bytes, attachment: Attachment) -> None:
        segments.append(b"--" + boundary + b"\r\n" + _attachment_headers(attachment))
        segments.append(attachment)

    def related_parts() -> None:
        inline = [a for a in email.attachments if a.is_inline]
        if not inline:
            body_parts()
            return
        boundary = open_multipart("related", "rel")
        segments.append(b"--" + boundary + b"\r\n")
        body_parts()
        for attachment in inline:
            attachment_part(boundary, attachment)
        segments.append(b"--" + boundary + b"--\r\n")

    segments.append(_top_headers(email, extra_headers, include_bcc, date or datetime.now(UTC)))
    files = [a for a in email.attachments if not a.is_inline]
    if files:
        boundary = open_multipart("mixed", "mix")
        segments.append(b"--" + boundary + b"\r\n")
        related_parts()
        for attachment in files:
            attachment_part(boundary, attachment)
        segments.append(b"--" + boundary + b"--\r\n")
    else:
        related_parts()

    merged = _merge_bytes(segments)
    size = sum(
        len(s) if isinstance(s, bytes) else base64_encoded_size(s.size, line_length=BASE64_LINE_CHARS)
        for s in merged
    )
    return MimeDocument(tuple(merged), size)


def _merge_bytes(segments: list[bytes | Attachment]) -> list[bytes | Attachment]:
    """Join neighbouring byte segments so streaming yields fewer, larger writes."""
    merged: list[bytes | Attachment] = []
    for segment in segments:
        if isinstance(segment, bytes) and merged and isinstance(merged[-1], bytes):
            merged[-1] = merged[-1] + segment
        else:
            merged.append(segment)
    return merged


def mime_size(email: OutboundEmail) -> int:
    """The exact size of the email's MIME as it is sent: ``build_mime`` of it rendered with its recipient's values
    (``personalize``; the Date header has a fixed width)."""
    return build_mime(personalize(email), date=datetime(2000, 1, 1, tzinfo=UTC)).size


#: Worst-case growth of one UTF-8 byte of header text: RFC 2047 "Q" words write a byte as three characters, and
#: each encoded word (at most 75 characters) adds 12 characters of delimiters plus folding, so a header made of
#: many short non-ASCII words can exceed 3x; 8x leaves margin for every such layout.
_HEADER_EXPANSION = 8
#: Worst-case growth of body text: quoted-printable writes a byte as ``=XX`` plus a soft break every 76
#: characters, and a bare CR or LF becomes CRLF; all of it stays under 4x.
_BODY_EXPANSION = 4
#: Bytes of a header line beyond its encoded name and value (": ", CRLF, folding of the name).
_HEADER_LINE_OVERHEAD = 16
#: The headers a part carries that do not depend on the email (Content-Type with charset, transfer encoding,
#: MIME-Version, Date), generously.
_PART_OVERHEAD = 256
#: The top-level headers that do not depend on the email's strings (Date, MIME-Version, the Message-ID layout).
_MESSAGE_OVERHEAD = 512


def _utf8_length(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def mime_size_bound(email: OutboundEmail) -> int:
    """An upper bound of ``mime_size(email)`` computed in microseconds, without rendering anything.

    Building the MIME message costs milliseconds; almost every email is orders of magnitude below any provider's
    size cap, so the exact size is only worth computing when this bound does not already prove the email fits
    (``fits_size_cap``). Every header string is counted at its worst-case encoded growth, bodies at
    quoted-printable's, attachments at their exact base64 size plus their headers' worst case.
    """

    def header(name: str, value: str) -> int:
        return _HEADER_EXPANSION * (_utf8_length(name) + _utf8_length(value)) + _HEADER_LINE_OVERHEAD

    def addresses(items: Sequence[Address]) -> int:
        return sum(header(item.name or "", item.email) + 8 for item in items) + _HEADER_LINE_OVERHEAD

    identifier = _utf8_length(email.message_id)
    size = _MESSAGE_OVERHEAD + _HEADER_EXPANSION * 3 * identifier  # Message-ID (with the domain), X-ESP-Message-Id
    size += addresses((email.sender,)) + addresses(email.to) + addresses(email.cc) + addresses(email.bcc)
    size += addresses(email.reply_to) + header("Subject", email.subject)
    size += sum(header(name, value) for name, value in email.headers.items())
    parts = 0
    for body in (email.text, email.html):
        if body is not None:
            size += _BODY_EXPANSION * _utf8_length(body) + _PART_OVERHEAD
            parts += 1
    for attachment in email.attachments:
        size += base64_encoded_size(attachment.size, line_length=BASE64_LINE_CHARS) + _PART_OVERHEAD
        size += 2 * header("filename", attachment.filename) + header("type", attachment.content_type)
        size += header("Content-ID", attachment.content_id or "")
        parts += 1
    # Up to three multipart containers: each has a Content-Type header and a closing delimiter, and every part
    # opens with a delimiter line; each carries a boundary derived from the message id.
    boundary = identifier + 32
    size += (3 * 2 + parts + 1) * (boundary + _HEADER_LINE_OVERHEAD) + 3 * _PART_OVERHEAD
    return size + _placeholder_growth(email)


def _placeholder_growth(email: OutboundEmail) -> int:
    """How much rendering the recipient's values can add at most: each placeholder's value, grown as a header's or
    a body's bytes grow (a regex pass per text, a few microseconds for 10 KB of HTML)."""
    values = recipient_values(email)
    if not values:
        return 0

    def added(text: str) -> int:
        if "{" not in text:
            return 0
        return sum(_utf8_length(values.get(name, "")) for name in PLACEHOLDER_PATTERN.findall(text))

    headers = added(email.subject) + sum(added(value) for value in email.headers.values())
    bodies = sum(added(body) for body in (email.text, email.html) if body is not None)
    return _HEADER_EXPANSION * headers + _BODY_EXPANSION * bodies


#: NUL, and every character ``str.splitlines`` breaks at (the ``email`` package refuses all of them in headers).
_CONTROL_CHARACTERS = frozenset("\x00\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


def check_header_fields(email: OutboundEmail) -> None:
    """The header problems ``build_mime`` would raise ``InvalidMessage`` for, checked without rendering.

    Reserved names, names outside RFC 5322's printable ASCII, and CR, LF or NUL anywhere (header injection), also
    in a recipient's value for a placeholder of the subject or a header value (it would be rendered into the header
    here, or substituted by the provider). Address syntax itself is ingest's to validate; here an address only has
    to be free of line breaks.
    """
    for name, value in email.headers.items():
        if name.lower() in RESERVED_HEADERS:
            raise InvalidMessage(f"header {name!r} is set by the platform and cannot be overridden")
        if not name or not name.isascii() or not name.isprintable() or ":" in name or " " in name:
            raise InvalidMessage(f"invalid header name {name!r} in email {email.message_id}")
        if not _CONTROL_CHARACTERS.isdisjoint(value):
            raise InvalidMessage(f"invalid header {name!r} in email {email.message_id}: line break or NUL")
    texts = [email.subject, email.message_id]
    for address in (email.sender, *email.to, *email.cc, *email.bcc, *email.reply_to):
        texts += (address.email, address.name or "")
    for text in texts:
        if not _CONTROL_CHARACTERS.isdisjoint(text):
            raise InvalidMessage(f"invalid header in email {email.message_id}: line break or NUL in {text!r}")
    values = recipient_values(email)
    if values:
        for template in (email.subject, *email.headers.values()):
            for match in PLACEHOLDER_PATTERN.finditer(template):
                if not _CONTROL_CHARACTERS.isdisjoint(values.get(match.group(1), "")):
                    raise InvalidMessage(f"invalid header in email {email.message_id}: line break or NUL in the "
                                         f"value of {match.group(0)}")


def fits_size_cap(email: OutboundEmail, cap: int) -> tuple[bool, int]:
    """Whether the email's MIME size is at most ``cap``, and the size it was judged by.

    The size is the cheap upper bound when that already fits, the exact ``mime_size`` otherwise.
    """
    bound = mime_size_bound(email)
    if bound <= cap:
        return True, bound
    exact = mime_size(email)
    return exact <= cap, exact


# ---------------------------------------------------------------------------------------------------------------
# HTTP request bodies with streamed attachments (JSON with base64 strings, multipart/form-data)
# ---------------------------------------------------------------------------------------------------------------


async def raw_chunks(attachment: Attachment) -> AsyncIterator[bytes]:
    """The attachment's bytes as they stream in; ``AttachmentSizeMismatch`` if the length is not as declared."""
    seen = 0
    async for chunk in attachment.chunks():
        seen += len(chunk)
        yield chunk
    if seen != attachment.size:
        raise AttachmentSizeMismatch(
            f"attachment {attachment.filename!r} declared {attachment.size} bytes but streamed {seen}"
        )


@dataclass(frozen=True)
class StreamedPart:
    """An attachment's bytes inside a request body, raw (multipart) or base64 without line breaks (JSON)."""

    attachment: Attachment
    base64: bool

    @property
    def size(self) -> int:
        """Bytes this part contributes to the body."""
        return base64_encoded_size(self.attachment.size) if self.base64 else self.attachment.size

    def stream(self) -> AsyncIterator[bytes]:
        """The part's bytes."""
        if self.base64:
            return base64_chunks(self.attachment, line_breaks=False)
        return raw_chunks(self.attachment)


@dataclass(frozen=True)
class StreamedBody:
    """A request body of known length whose attachment bytes are produced while it is sent.

    At most one attachment chunk (about 1 MiB, or its base64) is in memory at a time, so base64-in-JSON providers
    never hold even one whole encoded copy. ``stream`` can be called again for a fresh pass.
    """

    segments: tuple[bytes | StreamedPart, ...]
    content_type: str

    @property
    def size(self) -> int:
        """Exact body length, for Content-Length."""
        return sum(len(s) if isinstance(s, bytes) else s.size for s in self.segments)

    async def stream(self) -> AsyncIterator[bytes]:
        """The body's bytes."""
        for segment in self.segments:
            if isinstance(segment, bytes):
                yield segment
            else:
                async for chunk in segment.stream():
                    yield chunk

    async def read(self) -> bytes:
        """The whole body in memory (tests, small bodies)."""
        return b"".join([chunk async for chunk in self.stream()])


_SENTINEL = "\x00esp-base64-{}\x00"


def streamed_json(payload: object) -> StreamedBody:
    """Serialise ``payload`` as JSON where every ``Attachment`` value becomes its base64 string, streamed.

    The payload is serialised once with placeholders; the placeholders' JSON form is then replaced by the
    attachment's quoted base64 at send time (base64 needs no JSON escaping).
    """
    attachments: list[Attachment] = []

    def substitute(value: object) -> object:
        if isinstance(value, Attachment):
            attachments.append(value)
            return _SENTINEL.format(len(attachments) - 1)
        if isinstance(value, dict):
            return {key: substitute(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [substitute(item) for item in value]
        return value

    serialised = json.dumps(substitute(payload), ensure_ascii=False, separators=(",", ":")).encode()
    segments: list[bytes | StreamedPart] = []
    position = 0
    for index, attachment in enumerate(attachments):
        marker = json.dumps(_SENTINEL.format(index)).encode()
        start = serialised.index(marker, position)
        segments.append(serialised[position:start] + b'"')
        segments.append(StreamedPart(attachment, base64=True))
        position = start + len(marker)
        segments.append(b'"')
    segments.append(serialised[position:])
    return StreamedBody(tuple(_merge_parts(segments)), "application/json")


def streamed_form_data(
    fields: Sequence[tuple[str, str | tuple[str, Attachment]]], *, boundary: str | None = None
) -> StreamedBody:
    """``multipart/form-data`` (RFC 7578) of text fields and ``(filename, attachment)`` file fields.

    File bytes are streamed raw; names and filenames are UTF-8 in quoted parameters, as browsers send them.
    """
    boundary = boundary or f"esp-{secrets.token_hex(16)}"
    delimiter = f"--{boundary}\r\n".encode()
    segments: list[bytes | StreamedPart] = []
    for name, value in fields:
        if isinstance(value, str):
            segments.append(
                delimiter
                + f'Content-Disposition: form-data; name="{_quote_param(name)}"\r\n\r\n'.encode()
                + value.encode()
                + b"\r\n"
            )
        else:
            filename, attachment = value
            segments.append(
                delimiter
                + (
                    f'Content-Disposition: form-data; name="{_quote_param(name)}"; '
                    f'filename="{_quote_param(filename)}"\r\n'
                    f"Content-Type: {attachment.content_type or 'application/octet-stream'}\r\n\r\n"
                ).encode()
            )
            segments.append(StreamedPart(attachment, base64=False))
            segments.append(b"\r\n")
    segments.append(f"--{boundary}--\r\n".encode())
    return StreamedBody(tuple(_merge_parts(segments)), f"multipart/form-data; boundary={boundary}")


def _quote_param(value: str) -> str:
    # RFC 7578 §4.2 / the WHATWG form encoder: escape quote and line breaks rather than RFC 2231-encoding.
    return value.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def _merge_parts(segments: list[bytes | StreamedPart]) -> list[bytes | StreamedPart]:
    merged: list[bytes | StreamedPart] = []
    for segment in segments:
        if isinstance(segment, bytes) and merged and isinstance(merged[-1], bytes):
            merged[-1] = merged[-1] + segment
        elif not (isinstance(segment, bytes) and not segment):
            merged.append(segment)
    return merged


async def sign_document(document: MimeDocument, keys: Sequence[DkimKey], *,
                        signed_headers: Iterable[str] = DEFAULT_SIGNED_HEADERS,
                        timestamp: int | None = None) -> tuple[MimeDocument, Signatures]:
    """``document`` with a ``DKIM-Signature`` field of each key before its headers, and what was signed.

    The body is hashed as the document streams (its attachments are read once here, and again when it is sent);
    the document's header block must end in its first bytes segment, as ``build_mime`` lays documents out. Keys
    that cannot sign are left out (:attr:`Signatures.failed`); with none left the document comes back unchanged.
    Nothing may change the document's headers or body after this: the signature is the last thing done to it.
    """
    first = document.segments[0] if document.segments else b""
    end = first.find(b"\r\n\r\n") if isinstance(first, bytes) else -1
    if not isinstance(first, bytes) or end < 0:
        raise ValueError("the document's header block does not end in its first segment")
    fields, _ = split_message(first[:end + 4])
    body_hash = BodyHash()
    started = False
    async for chunk in document.stream():
        # The first chunk streamed is the first segment: its body part starts after the header block.
        body_hash.update(chunk if started else chunk[end + 4:])
        started = True
    made = signatures(keys, fields, body_hash.digest(), signed_headers=signed_headers, timestamp=timestamp)
    if not made.fields:
        return document, made
    signed = MimeDocument((made.fields + first, *document.segments[1:]), document.size + len(made.fields))
    return signed, made
