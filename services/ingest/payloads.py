"""Encoding accepted emails as the JetStream payloads (SendTask, EventEnvelope) and the idempotency hash."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from esp.internal.v1 import queue_pb2
from esp.v1 import messages_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from libs.common.message_classes import MessageClass
from libs.common.timestamps import to_timestamp
from services.ingest.model import EmailDraft, Mailbox, StoredAttachment

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def request_fingerprint(draft: EmailDraft) -> bytes:
    """sha256 of the request's content, request_id excluded: equal requests have equal fingerprints."""

    def boxes(items: tuple[Mailbox, ...]) -> list[list[str]]:
        return [[b.email, b.name] for b in items]

    content: list[object] = [
        draft.message_class, [draft.sender.email, draft.sender.name], boxes(draft.to), boxes(draft.cc),
        boxes(draft.bcc), boxes(draft.reply_to), draft.subject, draft.text_body, draft.html_body,
        sorted(draft.headers.items()), list(draft.tags), sorted(draft.metadata.items()), list(draft.attachment_ids)]
    if draft.send_time is not None:  # only then: requests without one keep the fingerprints they always had
        content.append((draft.send_time - _EPOCH) // timedelta(microseconds=1))
    return hashlib.sha256(json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()).digest()


LINK_BYTES = 2048
"""Room one attachment takes as a download link (a pre-signed URL in the text and the HTML body)."""


def estimated_message_bytes(draft: EmailDraft, attachments: list[StoredAttachment], *,
                            as_links: bool = False) -> int:
    """Size of the MIME message as providers measure it: base64 grows attachments by 4/3, plus line breaks.

    With ``as_links`` the attachments count as the download links that replace them.
    """
    body = len(draft.text_body.encode()) + len(draft.html_body.encode()) + len(draft.subject.encode())
    if as_links:
        carried = LINK_BYTES * len(attachments)
    else:
        carried = sum((a.size_bytes + 2) // 3 * 4 * 78 // 76 for a in attachments)
    return 2048 + body * 4 // 3 + carried


def accepted_now() -> tuple[datetime, Timestamp]:
    """The current time as a datetime (for Postgres) and as the equal Timestamp (for the payloads), to the
    microsecond. Built from one clock reading: ``Timestamp.FromDatetime`` costs several µs of Python per email."""
    now_us = time.time_ns() // 1000
    seconds, micros = divmod(now_us, 1_000_000)
    return _EPOCH + timedelta(microseconds=now_us), Timestamp(seconds=seconds, nanos=micros * 1000)


def _add_addresses(field: Any, boxes: tuple[Mailbox, ...]) -> None:
    for box in boxes:
        address = field.add()
        address.email = box.email
        if box.name:
            address.name = box.name


# The payloads below are built field by field, setting only what is not empty: every accepted email builds three
# of them, and protobuf keyword construction with empty lists and maps costs about twice as much.


def build_send_task(message_id: uuid.UUID | str, tenant_id: str, draft: EmailDraft,
                    attachments: list[StoredAttachment], accepted_at: datetime | Timestamp, *,
                    attachments_as_links: bool = False) -> queue_pb2.SendTask:
    """The SEND stream payload: the whole email, so a sender needs no lookup. ``message_bytes`` is the size the
    providers will see (with links instead of attachments when ``attachments_as_links``)."""
    task = queue_pb2.SendTask(
        message_id=str(message_id), tenant_id=tenant_id, message_class=MessageClass(draft.message_class).proto,
        subject=draft.subject, text_body=draft.text_body, html_body=draft.html_body,
        message_bytes=estimated_message_bytes(draft, attachments, as_links=attachments_as_links),
        attachments_as_links=attachments_as_links)
    sender = getattr(task, "from")
    sender.email = draft.sender.email
    if draft.sender.name:
        sender.name = draft.sender.name
    _add_addresses(task.to, draft.to)
    _add_addresses(task.cc, draft.cc)
    _add_addresses(task.bcc, draft.bcc)
    _add_addresses(task.reply_to, draft.reply_to)
    if draft.headers:
        task.headers.update(draft.headers)
    if draft.tags:
        task.tags.extend(draft.tags)
    if draft.metadata:
        task.metadata.update(draft.metadata)
    for a in attachments:
        task.attachments.add(attachment_id=a.id, s3_key=a.s3_key, filename=a.filename,
                             content_type=a.content_type, size_bytes=a.size_bytes)
    task.accepted_time.CopyFrom(accepted_at if isinstance(accepted_at, Timestamp) else to_timestamp(accepted_at))
    return task


def queued_task(task: queue_pb2.SendTask, send_time: Timestamp) -> bytes:
    """The SEND stream payload of a scheduled email: its task with ``accepted_time`` = its send time. The sender
    counts a class's useful life (``RetryPolicy.max_age_s``: ten minutes for an OTP) from ``accepted_time``; a
    scheduled email's starts when it is handed over, not when it was accepted days before. (The stored task keeps
    the true acceptance time.)"""
    queued = queue_pb2.SendTask()
    queued.CopyFrom(task)
    queued.accepted_time.CopyFrom(send_time)
    payload: bytes = queued.SerializeToString()
    return payload


def cancelled_event(task: queue_pb2.SendTask, reason: str) -> queue_pb2.EventEnvelope:
    """The final CANCELLED event of a message withdrawn before any sender had it: reports records the state, the
    ledger releases the hold. Its id is the one a sender gives the CANCELLED event of a message it drops, so the
    stream keeps one whichever comes."""
    envelope = queue_pb2.EventEnvelope(tenant_id=task.tenant_id, message_id=task.message_id, final=True,
                                       message_class=task.message_class, hold_id=task.message_id)
    event = envelope.event
    event.event_id = f"{task.message_id}:cancelled"
    event.message = f"messages/{task.message_id}"
    event.type = messages_pb2.MESSAGE_EVENT_TYPE_CANCELLED
    event.reason = reason
    event.event_time.seconds, event.event_time.nanos = divmod(time.time_ns(), 1_000_000_000)
    return envelope
