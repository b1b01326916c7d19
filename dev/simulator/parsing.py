"""Reading what clients send: multipart/form-data, MIME messages, address lists."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import getaddresses

from dev.simulator.model import AttachmentInfo, SimMessage

ESP_HEADER = "x-esp-message-id"
_ADDRESS = re.compile(r"^[^@\s<>(),;:\"\[\]]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)+$")
_PARAM = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def is_valid_address(address: str) -> bool:
    """A plain syntactic check of an addr-spec, as strict as the providers' first-line validation."""
    return bool(_ADDRESS.match(address.strip()))


def split_addresses(value: str) -> list[tuple[str, str]]:
    """``(name, email)`` pairs from a comma-separated address list (``"A, B" <a@x>, b@y``)."""
    return [(name, email) for name, email in getaddresses([value]) if email or name]


@dataclass(frozen=True)
class FormFile:
    """An uploaded file part."""

    filename: str
    content_type: str
    data: bytes


def parse_form_data(body: bytes, content_type: str) -> list[tuple[str, str | FormFile]]:
    """Fields of a ``multipart/form-data`` body in order; raises ``ValueError`` when it is malformed."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        raise ValueError("multipart body without a boundary")
    delimiter = b"--" + match.group(1).encode()
    if not body.startswith(delimiter):
        raise ValueError("multipart body does not start with its boundary")
    fields: list[tuple[str, str | FormFile]] = []
    for chunk in body.split(b"\r\n" + delimiter):
        part = chunk.removeprefix(delimiter)
        if part.startswith(b"--"):
            break
        part = part.removeprefix(b"\r\n")
        head, separator, data = part.partition(b"\r\n\r\n")
        if not separator:
            raise ValueError("multipart part without headers")
        headers: dict[str, str] = {}
        for line in head.decode("utf-8").split("\r\n"):
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        params = dict(_PARAM.findall(headers.get("content-disposition", "")))
        name = params.get("name")
        if name is None:
            raise ValueError("multipart part without a name")
        if "filename" in params:
            fields.append((name, FormFile(params["filename"], headers.get("content-type", ""), data)))
        else:
            fields.append((name, data.decode("utf-8")))
    return fields


def attachment_info(
    filename: str, content_type: str, data: bytes, *, content_id: str | None = None, inline: bool = False
) -> AttachmentInfo:
    """An attachment reduced to what tests compare (size and SHA-256)."""
    return AttachmentInfo(
        filename=filename,
        content_type=content_type,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        content_id=content_id,
        inline=inline,
    )


def parse_mime(raw: bytes, *, envelope_recipients: list[str] | None = None) -> SimMessage:
    """A ``SimMessage`` from a MIME document (SMTP DATA, SES raw content)."""
    message = BytesParser(policy=policy.default).parsebytes(raw)
    if not isinstance(message, EmailMessage):
        raise ValueError("not a MIME message")
    sender_pairs = split_addresses(str(message.get("From", "")))
    to_pairs = split_addresses(str(message.get("To", "")))
    cc = [email for _, email in split_addresses(str(message.get("Cc", "")))]
    to = [email for _, email in to_pairs]
    bcc: list[str] = []
    if envelope_recipients is not None:
        # The envelope decides who receives a copy: header addresses not in it were refused; envelope
        # addresses not in the headers are Bcc.
        envelope = {address.lower() for address in envelope_recipients}
        to_pairs = [(name, email) for name, email in to_pairs if email.lower() in envelope]
        to = [email for _, email in to_pairs]
        cc = [email for email in cc if email.lower() in envelope]
        listed = {address.lower() for address in [*to, *cc]}
        bcc = [rcpt for rcpt in envelope_recipients if rcpt.lower() not in listed]
    text_part = message.get_body(preferencelist=("plain",))
    html_part = message.get_body(preferencelist=("html",))
    attachments = []
    for part in message.walk():
        if part.is_multipart() or part in (text_part, html_part):
            continue
        disposition = part.get_content_disposition()
        if disposition not in {"attachment", "inline"} and part.get_filename() is None:
            continue
        data = part.get_payload(decode=True) or b""
        content_id = part.get("Content-ID")
        attachments.append(
            attachment_info(
                part.get_filename() or "",
                part.get_content_type(),
                data if isinstance(data, bytes) else b"",
                content_id=str(content_id).strip("<>") if content_id else None,
                inline=disposition == "inline",
            )
        )
    headers = {name: str(value) for name, value in message.items()}
    return SimMessage(
        sender=sender_pairs[0][1] if sender_pairs else "",
        sender_name=sender_pairs[0][0] if sender_pairs else "",
        to=to,
        to_names=[name for name, _ in to_pairs],
        cc=cc,
        bcc=bcc,
        subject=str(message.get("Subject", "")),
        text=text_part.get_content() if isinstance(text_part, EmailMessage) else None,
        html=html_part.get_content() if isinstance(html_part, EmailMessage) else None,
        headers=headers,
        esp_message_id=_header(headers, ESP_HEADER),
        attachments=attachments,
    )


def _header(headers: dict[str, str], wanted: str) -> str | None:
    for name, value in headers.items():
        if name.lower() == wanted:
            return value
    return None
