"""Attachments sent as expiring download links, for emails too large for every provider.

Ingest decides at accept (tenant policy ``link``) and sets ``SendTask.attachments_as_links``; its
``message_bytes`` is then the size of the email with links, so routing finds a provider for it. The sender calls
:func:`link_attachments` before building the outbound email:

.. code-block:: python

    if task.attachments_as_links:
        linked = link_attachments(task, s3, bucket, ttl_s=settings.attachment_link_ttl_s)
        await events.emit(task, linked.event_type, event_id=linked.event_id, attributes=linked.event_attributes)
        task = linked.task          # bodies carry the links; no attachments left
    email = outbound_email(task, opener)

Each delivery makes fresh links (pre-signed S3 GET URLs, computed locally: no network call). The event id is the
same on every delivery, so a re-delivery's event is dropped as a duplicate downstream; its attributes record when
the links expire and which files they carry (never the URLs: they grant access to the files).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from esp.internal.v1 import queue_pb2
from esp.v1 import messages_pb2

MAX_LINK_TTL_S = 7 * 86_400
"""The longest a SigV4 pre-signed URL can live (S3 refuses longer)."""
DEFAULT_LINK_TTL_S = MAX_LINK_TTL_S


@dataclass(frozen=True)
class AttachmentLink:
    """One attachment as a download link."""

    filename: str
    content_type: str
    size_bytes: int
    url: str


@dataclass(frozen=True)
class LinkedAttachments:
    """The email with its attachments replaced by links, and the event the sender emits about it."""

    task: queue_pb2.SendTask
    """A copy of the task: links appended to the text and HTML bodies, no attachments."""
    links: tuple[AttachmentLink, ...]
    expires_at: datetime

    @property
    def event_type(self) -> int:
        """Emit this event type (``MESSAGE_EVENT_TYPE_ATTACHMENTS_LINKED``) ..."""
        return int(messages_pb2.MESSAGE_EVENT_TYPE_ATTACHMENTS_LINKED)

    @property
    def event_id(self) -> str:
        """... with this id (the same on every delivery of the message) ..."""
        return f"{self.task.message_id}:attachments_linked"

    @property
    def event_attributes(self) -> dict[str, str]:
        """... and these attributes."""
        return {
            "links_expire_at": self.expires_at.isoformat(timespec="seconds"),
            "attachments": ", ".join(link.filename for link in self.links),
            "attachment_bytes": str(sum(link.size_bytes for link in self.links)),
        }


def link_attachments(task: queue_pb2.SendTask, s3: Any, bucket: str, *, ttl_s: int = DEFAULT_LINK_TTL_S,
                     now: datetime | None = None) -> LinkedAttachments:
    """Replace ``task``'s attachments by pre-signed download links valid for ``ttl_s`` seconds.

    Args:
        task: the queued email (``task.attachments`` name the S3 objects).
        s3: a boto3 S3 client whose endpoint the recipients can reach (it signs the URLs).
        bucket: the attachments bucket.
        ttl_s: link lifetime, 1 s to 7 days (the SigV4 maximum).
        now: the signing time, for the expiry shown in the email (defaults to now).

    Returns:
        :class:`LinkedAttachments`: the rewritten task (``attachments`` empty, ``attachments_as_links`` kept), the
        links, their expiry, and the event to emit (``event_type``, ``event_id``, ``event_attributes``).
    """
    if not 1 <= ttl_s <= MAX_LINK_TTL_S:
        raise ValueError(f"link lifetime must be 1 to {MAX_LINK_TTL_S} seconds, got {ttl_s}")
    expires_at = (now or datetime.now(UTC)) + timedelta(seconds=ttl_s)
    links = tuple(
        AttachmentLink(a.filename, a.content_type, a.size_bytes, s3.generate_presigned_url(
            "get_object", ExpiresIn=ttl_s, Params={
                "Bucket": bucket, "Key": a.s3_key,
                # The browser saves the file under its own name and type, not the object key.
                "ResponseContentDisposition": f"attachment; filename*=UTF-8''{quote(a.filename, safe='')}",
                "ResponseContentType": a.content_type or "application/octet-stream",
            }))
        for a in task.attachments)
    linked = queue_pb2.SendTask()
    linked.CopyFrom(task)
    del linked.attachments[:]
    if task.text_body or not task.html_body:
        linked.text_body = task.text_body + _text_block(links, expires_at)
    if task.html_body:
        linked.html_body = _with_html_block(task.html_body, links, expires_at)
    return LinkedAttachments(linked, links, expires_at)


def _size(size_bytes: int) -> str:
    for unit, scale in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if size_bytes >= scale:
            return f"{size_bytes / scale:.1f} {unit}"
    return f"{size_bytes} bytes"


def _expiry(expires_at: datetime) -> str:
    return expires_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _text_block(links: Sequence[AttachmentLink], expires_at: datetime) -> str:
    lines = ["", "", f"Attachments (download links, valid until {_expiry(expires_at)}):"]
    lines += [f"- {link.filename} ({_size(link.size_bytes)}): {link.url}" for link in links]
    return "\n".join(lines) + "\n"


def _with_html_block(body: str, links: Sequence[AttachmentLink], expires_at: datetime) -> str:
    items = "".join(
        f'<li><a href="{html.escape(link.url, quote=True)}">{html.escape(link.filename)}</a> '
        f"({_size(link.size_bytes)})</li>" for link in links)
    block = (f'<div class="esp-attachment-links"><p>Attachments (download links, valid until '
             f"{_expiry(expires_at)}):</p><ul>{items}</ul></div>")
    # Inside the document when it has a body element, so the block renders as part of the page.
    closing = body.lower().rfind("</body>")
    if closing == -1:
        return body + block
    return body[:closing] + block + body[closing:]
